"""Shared test helpers: compose the real configs, run the real CLI, write datasets in their real formats."""

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from hsci.parts import schema
from hsci.cli import config_dir


@pytest.fixture
def cfg_of():
    """compose(overrides) -> the composed config, as `hsci train` would see it (hydra node removed)."""
    schema.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()


def hsci(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would, with stdout a pipe (plain output)."""
    offline = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    env = {**os.environ, "HYDRA_FULL_ERROR": "", **offline, **(env or {})}  # no downloads, network or not
    return subprocess.run([sys.executable, "-m", "hsci", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run (digits, cnn) to resume, evaluate and copy; tests that change it copy it first."""
    cwd = tmp_path_factory.mktemp("finished")
    assert hsci("train", "experiment=smoke", cwd=cwd).returncode == 0
    return run_dirs(cwd)[0]


def run_dirs(cwd: Path) -> list[Path]:
    """The single-run directories under cwd/outputs/<date>/, oldest first."""
    return sorted(p for p in (cwd / "outputs").glob("*/*") if p.parent.name != "multirun" and p.is_dir())


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def write_idx(root: Path, folder: str, n_train: int = 120, n_test: int = 40) -> None:
    """MNIST-style idx files (big-endian header, uint8 payload) in <root>/<folder>/raw, as torchvision keeps them."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_cifar(root: Path, hundred: bool = False, per_batch: int = 40) -> None:
    """CIFAR python-pickle batches (dicts of a uint8 (N, 3072) array and label lists) as the real tarball unpacks."""
    rng = np.random.default_rng(0)
    classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = "fine_labels" if hundred else "labels"
    for name in names:
        n = per_batch * (5 if name == "train" else 1)
        batch = {"batch_label": name, key: [int(i % classes) for i in range(n)],
                 "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "filenames": [f"img_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {"fine_label_names": [str(i) for i in range(100)]} if hundred else {"label_names": [str(i) for i in range(10)]}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)


def write_imagefolder(root: Path, splits=("train",), classes=("cat", "dog", "fox"), per_class: int = 12) -> None:
    """<root>/<split>/<class>/*.png|jpg with images of varied sizes and modes."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = (20 + 3 * i, 16 + 2 * c)
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(pixels).convert("L" if i % 3 == 0 else "RGB").save(folder / f"{i}.{ext}")
