"""Datasets as their publishers store them: MNIST-style idx files and CIFAR python batches in
torchvision's layout, fetched when asked and missing, read without running code from them; and a user's
own image files in class folders, read as what they hold. torchvision and Pillow are imported here when a
dataset's files are read, not before."""

import contextlib
import io
import logging
import os
import pickle
import socket
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from hsci import UserError, flat
from hsci.parts.datasets import Carving, CropFlip, Images, augmented

log = logging.getLogger("hsci")


def idx_files(cls, name: str, root: str, download: bool) -> Images:
    """The images of an MNIST-style dataset stored as idx files; `cls` is torchvision's dataset class."""
    root = Path(root).expanduser().resolve()
    folder = root / cls.__name__ / "raw"
    files = [Path(url).stem for url, _ in cls.resources]  # the .gz archives unpack to these
    _require(name, folder, files, download, lambda: cls(root, train=True, download=True))
    try:
        train, test = cls(root, train=True), cls(root, train=False)
    except (RuntimeError, ValueError, AssertionError, OSError) as e:  # torchvision's reader on a cut or foreign file
        raise UserError(f"data={name}: the idx files in {folder} are not readable ({flat(e)}): delete them and "
                        "download again (data.download=true)") from e
    return Images(name, train.data.unsqueeze(1), train.targets, test.data.unsqueeze(1), test.targets,  # (N, 1, 28, 28)
                  list(cls.classes))


def cifar(cls, name: str, root: str, download: bool, label_key: str) -> Images:
    """The images of a CIFAR dataset stored as python-pickle batches; `cls` is torchvision's dataset class."""
    from torchvision.datasets.utils import download_and_extract_archive

    root = Path(root).expanduser().resolve()
    folder = root / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list]
    _require(name, folder, files, download,
             lambda: download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5))
    return Images(name, *_cifar_batches(name, folder, cls.train_list, label_key),
                  *_cifar_batches(name, folder, cls.test_list, label_key), _cifar_classes(folder, cls.meta))


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


def _cifar_classes(folder: Path, meta: dict) -> list[str] | None:
    """The class names in a CIFAR folder's meta file (batches.meta, meta), read as a data file; None without it."""
    try:
        with open(folder / meta["filename"], "rb") as f:
            return [str(name) for name in _ArraysOnly(f, encoding="latin1").load()[meta["key"]]]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError):
        return None


def _require(name: str, folder: Path, files: list[str], download: bool, fetch: Callable[[], object]) -> None:
    """Fail in one line, naming the folder and the files, unless all `files` are in `folder`."""
    missing = [f for f in files if not (folder / f).is_file()]
    why = "data.download=false"
    if missing and download:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # fail in seconds, not minutes, without a network
        printed = io.StringIO()  # torchvision prints each mirror it tries: kept for train.log
        try:
            with contextlib.redirect_stdout(printed):
                fetch()
            why = "the download did not produce them"
        except Exception as e:  # any failure to fetch is reported the same way below
            why = f"download failed: {type(e).__name__}: {flat(e)}"
        finally:
            socket.setdefaulttimeout(previous)
            log.info("data=%s: download: %s", name, printed.getvalue().strip())
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(f"data={name}: missing {', '.join(missing)} in {folder} ({why}); put the files there, "
                        "set data.root to the folder that holds them, or download with network access")


def read_image_folder(root: str, look: tuple[int, int], carving: Carving,
                      augment: CropFlip | None) -> tuple[Dataset, Dataset, Dataset, list[str]]:
    """The train, val and test splits of <root>/{train,val,test}/<class>/ as `ImageFiles` of `look` (channels,
    size), and the class names; a split without its folder is carved from train/ (test first)."""
    root_dir = Path(root).expanduser().resolve()
    train_dir = root_dir / "train"
    if not train_dir.is_dir():
        raise UserError(f"data=imagefolder: {train_dir} does not exist; expected {root_dir}/train/<class>/*.png|jpg "
                        "(val/ and test/ optional): set data.root to that folder")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"data=imagefolder: {train_dir} has no class folders; put each class's images in "
                        f"{train_dir}/<class>/")
    samples = image_folders(root_dir, classes)
    train = samples["train"]
    carved = [split for split in ("test", "val") if split not in samples]  # each needs an image of every class
    counts = Counter(label for _, label in train)
    few = next((c for i, c in enumerate(classes) if counts[i] < 1 + len(carved)), None)
    if few:
        raise UserError(f"data=imagefolder: class {few} has {counts[classes.index(few)]} image(s) in train/, too few "
                        f"to carve {' and '.join(carved)} from it (each class needs {1 + len(carved)}): add images to "
                        f"{train_dir / few}, or give {' and '.join(split + '/' for split in carved)} folders")
    if "test" not in samples:
        rest, held = carving.test([label for _, label in train])
        train, samples["test"] = [train[i] for i in rest], [train[i] for i in held]
    if "val" not in samples:
        rest, held = carving.val([label for _, label in train])
        train, samples["val"] = [train[i] for i in rest], [train[i] for i in held]
    channels, size = look
    held = [ImageFiles(samples[split], size, channels, None, classes) for split in ("val", "test")]
    return ImageFiles(train, size, channels, augment, classes), *held, classes


class ImageFiles(Dataset):
    """Image files read on demand, resized and centre-cropped to `size`, as uint8 (C, size, size); keys as
    hsci/parts/datasets.py's `Tensors` takes them; `classes` names the labels (the class folders)."""

    def __init__(self, samples: list[tuple[str, int]], size: int, channels: int, augment: CropFlip | None = None,
                 classes: list[str] | None = None):
        from torchvision.transforms import v2

        self.samples, self.mode, self.augment, self.classes = samples, "L" if channels == 1 else "RGB", augment, classes
        self.resize = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        x = self.resize(read_image(path, self.mode))
        return augmented(x, self.augment, seed), label


def labelled_folder(root: str, classes: list[str], look: tuple[int, int]) -> ImageFiles:
    """The images of a labelled folder, <root>/<class>/ without splits, as one `ImageFiles` of `look` (channels,
    size), labelled by their class's place in `classes` (a run's, matched by name): a class folder that `classes`
    lacks is an error, a class without a folder is not."""
    root_dir = Path(root).expanduser().resolve()
    found = folder_classes(root_dir) or []
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise UserError(f"data.root={root}: the model does not know the classes {', '.join(unknown)} (it knows "
                        f"{', '.join(classes)}): remove those folders, or evaluate on a folder of its classes")
    if not found:
        raise UserError(f"data.root={root}: no <class>/ folders of images (.png, .jpg ...) there: give a folder that "
                        "holds one folder of images per class")
    samples = image_folders(root_dir, classes, splits=("",))[""]  # the folder itself is the one split
    channels, size = look
    return ImageFiles(samples, size, channels, None, classes)


def folder_classes(root: Path) -> list[str] | None:
    """The class folders of a labelled folder, <root>/<class>/*.png|jpg without a train/ folder, sorted; None
    for any other folder (an image folder's train/ and its splits, MNIST's raw files)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not root.is_dir() or (root / "train").is_dir():
        return None
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    holding = [c for c in classes if any(f.name.lower().endswith(IMG_EXTENSIONS) for f in (root / c).iterdir())]
    return classes if holding else None


def image_folders(root: Path, classes: list[str],
                  splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, list[tuple[str, int]]]:
    """(path, label) of every image under <root>/<split>/<class>/ for the `splits` present (train, val, test;
    "" for a labelled folder, <root>/<class>/, whose classes `classes` names).

    Links are followed, but no folder is entered twice, so a link back up (a loop) or into another class
    or split adds nothing; one file (however reached: links, hard links) may sit in one split and one class
    only. A class folder without images is an error, not a class that can never be predicted."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    splits = [split for split in splits if (root / split).is_dir()]
    class_dirs = {(split, c): root / split / c for split in splits for c in classes if (root / split / c).is_dir()}
    reals = sorted((os.path.realpath(d) + os.sep, d) for d in class_dirs.values())  # a folder inside another: next
    for (outer, a), (inner, b) in zip(reals, reals[1:]):
        if inner.startswith(outer):
            raise UserError(f"data=imagefolder: {b} and {a} hold the same images (one is, or links into, the other): "
                            "give each class of each split a folder of its own")
    class_reals = {real.removesuffix(os.sep) for real, _ in reals}
    entered = {os.path.realpath(d) for d in (root, *(root / split for split in splits))} | class_reals
    first_seen: dict[tuple[int, int], tuple[str, str]] = {}  # a file (device, inode) -> (split/class, path found)
    samples = {}
    for split in splits:
        folder = root / split
        strangers = sorted({d.name for d in folder.iterdir() if d.is_dir()} - set(classes))
        if strangers:
            raise UserError(f"data=imagefolder: {folder} has class folders that train/ lacks ({', '.join(strangers)}): "
                            "every class needs training images")
        if not any((split, c) in class_dirs for c in classes):
            raise UserError(f"data=imagefolder: no images ({', '.join(IMG_EXTENSIONS)}) under {folder}/<class>/: "
                            "add some, or remove the folder to carve this split from train/")
        samples[split] = []
        for label, c in enumerate(classes):
            if (split, c) not in class_dirs:
                continue
            where = os.path.join(split, c)  # split/class; the class alone in a labelled folder
            found = _images_under(class_dirs[split, c], entered, os.path.realpath(root), class_reals,
                                   IMG_EXTENSIONS)
            if not found:
                raise UserError(f"data=imagefolder: {class_dirs[split, c]} holds no images "
                                f"({', '.join(IMG_EXTENSIONS)}): add some, or remove the folder")
            for path in found:
                stat = os.stat(path)
                real = (stat.st_dev, stat.st_ino)  # one file, however reached: links, hard links
                if real in first_seen:
                    if first_seen[real][0] == where:
                        continue  # one file reached twice within its own class: read once
                    raise UserError(f"data=imagefolder: {path} is the same file as {first_seen[real][1]} ({where} and "
                                    f"{first_seen[real][0]}): an image must sit in one split and one class; remove "
                                    "one of the two")
                first_seen[real] = (where, path)
                samples[split].append((path, label))
    return samples


def _images_under(folder: Path, entered: set[str], root: str, class_dirs: set[str],
                  extensions: tuple[str, ...]) -> list[str]:
    """Image files (ending in one of `extensions`) under `folder`, sorted; links are followed into folders not
    `entered` yet that lie neither above the dataset's `root` nor inside another class's folder (whose images are
    that class's)."""
    own = os.path.realpath(folder)
    others = class_dirs - {own}
    found = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(here, d))
            if (real in entered or os.path.commonpath([real, root]) == real
                    or any(os.path.commonpath([real, other]) == other for other in others)):
                log.warning("data=imagefolder: not entering %s: it leads to %s, which is read already, holds the "
                            "whole dataset or belongs to another class (a loop, or a link into another class)",
                            os.path.join(here, d), real)
                continue
            entered.add(real)
            keep.append(d)
        dirs[:] = keep
        found += [os.path.join(here, f) for f in files if f.lower().endswith(extensions)]
    return sorted(found)


def read_image(path: str, mode: str) -> "Image.Image":
    """An image file as a PIL image in `mode` ("L" or "RGB"), read as what it holds: pixels of more than 8 bits
    are scaled to 8 (their high byte, as Pillow reads 16-bit colour), never clipped to white."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):  # "I;16*": 16-bit grayscale (PNG, TIFF); "I": 32-bit integers
                pixels = np.asarray(img)
                if 32 in (getattr(img, "tag_v2", None) or {}).get(258, ()) or pixels.min() < 0 or pixels.max() > 65535:
                    raise UserError(f"data=imagefolder: {path} holds 32-bit integer pixels, whose range is not known: "
                                    "convert it to an 8- or 16-bit image")
                img = Image.fromarray((pixels.astype(np.uint32) >> 8).astype(np.uint8), "L")
            elif img.mode == "F":
                raise UserError(f"data=imagefolder: {path} holds floating-point pixels, whose range is not known: "
                                "convert it to an 8- or 16-bit image")
            return img.convert(mode)
    except Image.DecompressionBombError as e:
        raise UserError(f"data=imagefolder: {path} is too large to read safely ({e}): shrink it, or remove it") from e
    except (OSError, SyntaxError, ValueError) as e:  # corrupt or truncated: stop, naming the file
        raise UserError(f"data=imagefolder: cannot read image {path} ({flat(e)}): remove or replace the file") from e
