"""Datasets as their publishers store them: MNIST-style idx files and CIFAR python batches in
torchvision's layout, fetched when asked and missing, read without running code from them."""

import pickle
import socket
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision.datasets.utils import download_and_extract_archive

from hsci import UserError


def idx_files(cls, name: str, root: str, download: bool):
    """(x_train, y_train, x_test, y_test) of an MNIST-style dataset stored as idx files."""
    folder = Path(root).resolve() / cls.__name__ / "raw"
    files = [Path(url).stem for url, _ in cls.resources]  # the .gz archives unpack to these
    _require(name, folder, files, download, lambda: cls(root, train=True, download=True))
    train, test = cls(root, train=True), cls(root, train=False)
    return train.data.unsqueeze(1), train.targets, test.data.unsqueeze(1), test.targets  # (N, 1, 28, 28)


def cifar(cls, name: str, root: str, download: bool, label_key: str):
    """(x_train, y_train, x_test, y_test) of a CIFAR dataset stored as python-pickle batches."""
    folder = Path(root).resolve() / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list]
    _require(name, folder, files, download,
             lambda: download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5))
    return (*_cifar_batches(name, folder, cls.train_list, label_key),
            *_cifar_batches(name, folder, cls.test_list, label_key))


class _ArraysOnly(pickle.Unpickler):
    """Unpickles NumPy arrays and plain containers only, so a tampered data file cannot run code."""

    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data file")
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def _cifar_batches(name: str, folder: Path, files: list, label_key: str):
    xs, ys = [], []
    for file, _ in files:
        try:
            with open(folder / file, "rb") as f:
                batch = _ArraysOnly(f, encoding="latin1").load()
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # (N, C, H, W)
            ys.extend(batch[label_key])
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise UserError(f"data={name}: {folder / file} is not a readable CIFAR batch ({e}): delete {folder} "
                            "and download it again (data.download=true)") from e
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys)


def _require(name: str, folder: Path, files: list[str], download: bool, fetch: Callable[[], object]) -> None:
    """Fail in one line, naming the folder and the files, unless all `files` are in `folder`."""
    missing = [f for f in files if not (folder / f).is_file()]
    why = "data.download=false"
    if missing and download:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # fail in seconds, not minutes, without a network
        try:
            fetch()
            why = "the download did not produce them"
        except Exception as e:  # any failure to fetch is reported the same way below
            why = f"download failed: {type(e).__name__}: {e}"
        finally:
            socket.setdefaulttimeout(previous)
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(f"data={name}: missing {', '.join(missing)} in {folder} ({why}); put the files there, "
                        "set data.root to the folder that holds them, or download with network access")
