"""Datasets. Each `conf/data/<name>.yaml` calls one function here, which returns a `Data` bundle; its
arguments are the file's keys (the image sets' common ones come from `conf/data/base/`).

Images are kept as uint8 (N, C, H, W) and normalised on the device (hsci/loaders.py); tables come
standardised with the training split's statistics. Splits that a dataset lacks are carved with a
fixed `split_seed`, so every run of a dataset sees the same validation and test sets.
"""

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from hsci import UserError
from hsci.datafiles import cifar, idx_files, image_folders, read_image

log = logging.getLogger("hsci")

@dataclass
class Data:
    """The three splits of a dataset and what a model and a loader need to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    task: str  # multiclass, binary or regression
    input_shape: tuple[int, ...]  # (C, H, W) for images, (features,) for tables
    num_outputs: int  # classes for multiclass, 1 for binary and regression
    batch_size: int
    num_workers: int | str  # "auto" = one per CPU, at most 8
    loader: str  # auto, torch (DataLoader) or gpu (the whole set on the device, augmented there)
    mean: tuple[float, ...] | None = None  # per channel, of images scaled to [0, 1]; None for tables
    std: tuple[float, ...] | None = None
    target_mean: float = 0.0  # regression targets are standardised for training; metrics undo it
    target_std: float = 1.0


@dataclass(frozen=True)
class CropFlip:
    """Train-time augmentation: a random crop of the original size from the image zero-padded by `padding`,
    then a horizontal flip with probability 1/2 when `flip`. hsci/loaders.py applies the same to whole
    batches on the device."""

    padding: int
    flip: bool

    def draw(self, seed: int) -> tuple[int, int, bool]:
        """The crop's row and column offsets and the flip for the sample with this seed."""
        rng = random.Random(seed)
        span = 2 * self.padding + 1
        return rng.randrange(span), rng.randrange(span), self.flip and rng.random() < 0.5

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """One uint8 (C, H, W) image."""
        h, w = x.shape[-2:]
        i, j, flip = self.draw(seed)
        if self.padding:
            p = self.padding
            x = F.pad(x, (p, p, p, p))[:, i:i + h, j:j + w]
        return x.flip(-1) if flip else x

    def batch(self, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """A uint8 batch (B, C, H, W), sample b as `self(x[b], seeds[b])` would make it, in a few tensor ops."""
        draws = torch.tensor([self.draw(seed) for seed in seeds], device=x.device)  # (B, 3)
        return crop_flip(x, self.padding, draws[:, :2], draws[:, 2].bool())


def crop_flip(x: torch.Tensor, padding: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """A whole uint8 batch (B, C, H, W) on its device: sample b cropped at row offsets[b, 0] and column
    offsets[b, 1] of the image zero-padded by `padding`, then mirrored where flips[b]."""
    b, _, h, w = x.shape
    if padding:
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = (offsets[:, :1] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (offsets[:, 1:] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        x = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    return torch.where(flips[:, None, None, None], x.flip(-1), x)


class Tensors(Dataset):
    """Samples in memory, uint8 images (N, C, H, W) or float rows (N, F), with labels and an optional
    per-sample augmentation.

    A key is an index, or (index, seed) from hsci's training sampler: the seed alone decides the
    sample's augmentation, whichever worker process loads it.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: CropFlip | None = None):
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: int | tuple[int, int] | list):
        """One sample; or, for a list of keys, the whole batch with one gather, as the samples one by one
        would stack up (hsci/loaders.py fetches in-memory sets this way)."""
        if isinstance(key, list):
            if key and isinstance(key[0], tuple):
                idx, seeds = map(list, zip(*key))
                return (self.augment.batch(self.x[idx], seeds) if self.augment else self.x[idx]), self.y[idx]
            return self.x[key], self.y[key]
        i, seed = key if isinstance(key, tuple) else (key, None)
        return _augmented(self.x[i], self.augment, seed), self.y[i]


class ImageFiles(Dataset):
    """Image files read on demand, resized and centre-cropped to `size`, as uint8 (C, size, size); keys as `Tensors`."""

    def __init__(self, samples: list[tuple[str, int]], size: int, channels: int, augment: CropFlip | None = None):
        self.samples, self.mode, self.augment = samples, "L" if channels == 1 else "RGB", augment
        self.resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        x = self.resize(pil_to_tensor(read_image(path, self.mode)))
        return _augmented(x, self.augment, seed), label


def _augmented(x: torch.Tensor, augment: CropFlip | None, seed: int | None) -> torch.Tensor:
    if augment is None:
        return x
    if seed is None:  # indexed directly, outside hsci's sampler: draw from torch's generator
        seed = int(torch.randint(2**62, ()))
    return augment(x, seed)


def digits(test_fraction: float, image_shape: list[int], num_classes: int, batch_size: int, num_workers: int | str,
           loader: str, val_fraction: float, split_seed: int, mean: list[float], std: list[float],
           random_crop_padding: int, horizontal_flip: bool) -> Data:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): real data that needs no network."""
    bunch = load_digits()
    x = torch.from_numpy(np.round(bunch.images * 255 / 16)).to(torch.uint8).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(bunch.target)
    rest, test = _split(y, test_fraction, split_seed)
    return _images("digits", x[rest], y[rest], x[test], y[test], image_shape=image_shape, num_classes=num_classes,
                   batch_size=batch_size, num_workers=num_workers, loader=loader, val_fraction=val_fraction,
                   split_seed=split_seed, mean=mean, std=std, random_crop_padding=random_crop_padding,
                   horizontal_flip=horizontal_flip)


def mnist(root: str, download: bool, image_shape: list[int], num_classes: int, batch_size: int,
          num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
          std: list[float], random_crop_padding: int, horizontal_flip: bool) -> Data:
    """MNIST in torchvision's layout: <root>/MNIST/raw/*-ubyte."""
    return _images("mnist", *idx_files(datasets.MNIST, "mnist", root, download), image_shape=image_shape,
                   num_classes=num_classes, batch_size=batch_size, num_workers=num_workers, loader=loader,
                   val_fraction=val_fraction, split_seed=split_seed, mean=mean, std=std,
                   random_crop_padding=random_crop_padding, horizontal_flip=horizontal_flip)


def fashion_mnist(root: str, download: bool, image_shape: list[int], num_classes: int, batch_size: int,
                  num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
                  std: list[float], random_crop_padding: int, horizontal_flip: bool) -> Data:
    """Fashion-MNIST in torchvision's layout: <root>/FashionMNIST/raw/*-ubyte."""
    return _images("fashion_mnist", *idx_files(datasets.FashionMNIST, "fashion_mnist", root, download),
                   image_shape=image_shape, num_classes=num_classes, batch_size=batch_size, num_workers=num_workers,
                   loader=loader, val_fraction=val_fraction, split_seed=split_seed, mean=mean, std=std,
                   random_crop_padding=random_crop_padding, horizontal_flip=horizontal_flip)


def cifar10(root: str, download: bool, image_shape: list[int], num_classes: int, batch_size: int,
            num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
            std: list[float], random_crop_padding: int, horizontal_flip: bool) -> Data:
    """CIFAR-10 in torchvision's layout: <root>/cifar-10-batches-py/."""
    return _images("cifar10", *cifar(datasets.CIFAR10, "cifar10", root, download, "labels"), image_shape=image_shape,
                   num_classes=num_classes, batch_size=batch_size, num_workers=num_workers, loader=loader,
                   val_fraction=val_fraction, split_seed=split_seed, mean=mean, std=std,
                   random_crop_padding=random_crop_padding, horizontal_flip=horizontal_flip)


def cifar100(root: str, download: bool, image_shape: list[int], num_classes: int, batch_size: int,
             num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
             std: list[float], random_crop_padding: int, horizontal_flip: bool) -> Data:
    """CIFAR-100 (fine labels) in torchvision's layout: <root>/cifar-100-python/."""
    return _images("cifar100", *cifar(datasets.CIFAR100, "cifar100", root, download, "fine_labels"),
                   image_shape=image_shape, num_classes=num_classes, batch_size=batch_size, num_workers=num_workers,
                   loader=loader, val_fraction=val_fraction, split_seed=split_seed, mean=mean, std=std,
                   random_crop_padding=random_crop_padding, horizontal_flip=horizontal_flip)


def fake(train_size: int, test_size: int, image_shape: list[int], num_classes: int, batch_size: int,
         num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
         std: list[float], random_crop_padding: int, horizontal_flip: bool) -> Data:
    """torchvision's FakeData: random images of any (C, H, W) and class count, for smoke runs and benchmarks."""

    def make(size: int, offset: int):
        ds = datasets.FakeData(size, tuple(image_shape), num_classes, transform=v2.PILToTensor(), random_offset=offset)
        pairs = [ds[i] for i in range(size)]
        return torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs])

    return _images("fake", *make(train_size, 0), *make(test_size, train_size), image_shape=image_shape,
                   num_classes=num_classes, batch_size=batch_size, num_workers=num_workers, loader=loader,
                   val_fraction=val_fraction, split_seed=split_seed, mean=mean, std=std,
                   random_crop_padding=random_crop_padding, horizontal_flip=horizontal_flip)


def imagefolder(root: str, image_size: int, channels: int, test_fraction: float, batch_size: int,
                num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
                std: list[float], random_crop_padding: int, horizontal_flip: bool) -> Data:
    """A user's own images: <root>/{train,val,test}/<class>/*.png|jpg; val/ and test/ are optional."""
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
        rest, held = _split([label for _, label in train], test_fraction, split_seed)
        train, samples["test"] = [train[i] for i in rest], [train[i] for i in held]
    if "val" not in samples:
        rest, held = _split([label for _, label in train], val_fraction, split_seed)
        train, samples["val"] = [train[i] for i in rest], [train[i] for i in held]
    shape = (channels, image_size, image_size)
    augment = _augment(random_crop_padding, horizontal_flip)
    return _data(ImageFiles(train, image_size, channels, augment), ImageFiles(samples["val"], image_size, channels),
                 ImageFiles(samples["test"], image_size, channels), shape, len(classes),
                 batch_size, num_workers, loader, mean, std)


def breast_cancer(batch_size: int, num_workers: int | str, loader: str, val_fraction: float, test_fraction: float,
                  split_seed: int) -> Data:
    """scikit-learn's Wisconsin breast cancer table (569 x 30): binary classification."""
    bunch = load_breast_cancer()
    return _table(bunch.data, bunch.target, "binary", batch_size=batch_size, num_workers=num_workers, loader=loader,
                  val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed)


def diabetes(batch_size: int, num_workers: int | str, loader: str, val_fraction: float, test_fraction: float,
             split_seed: int) -> Data:
    """scikit-learn's diabetes table (442 x 10): regression of disease progression."""
    bunch = load_diabetes()
    return _table(bunch.data, bunch.target, "regression", batch_size=batch_size, num_workers=num_workers,
                  loader=loader, val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed)


def _images(name: str, x_train, y_train, x_test, y_test, *, image_shape: list[int], num_classes: int,
            batch_size: int, num_workers: int | str, loader: str, val_fraction: float, split_seed: int,
            mean: list[float], std: list[float], random_crop_padding: int, horizontal_flip: bool) -> Data:
    """A `Data` of in-memory uint8 images of the declared shape and classes; validation is carved from the
    training split."""
    found = tuple(x_train.shape[1:])
    if found != tuple(image_shape) or max(int(y_train.max()), int(y_test.max())) >= num_classes:
        raise UserError(f"data={name}: the files hold images of shape {found} with labels up to "
                        f"{max(int(y_train.max()), int(y_test.max()))}, not data.image_shape={list(image_shape)} and "
                        f"data.num_classes={num_classes}: check data.root, or correct those two keys")
    keep, held = _split(y_train, val_fraction, split_seed)
    augment = _augment(random_crop_padding, horizontal_flip)
    return _data(Tensors(x_train[keep], y_train[keep], augment), Tensors(x_train[held], y_train[held]),
                 Tensors(x_test, y_test), tuple(x_train.shape[1:]), num_classes, batch_size, num_workers, loader,
                 mean, std)


def _data(train, val, test, shape, num_classes, batch_size, num_workers, loader, mean, std) -> Data:
    return Data(train, val, test, "multiclass", shape, num_classes, batch_size, num_workers, loader,
                tuple(mean), tuple(std))


def _table(x: np.ndarray, y: np.ndarray, task: str, *, batch_size: int, num_workers: int | str, loader: str,
           val_fraction: float, test_fraction: float, split_seed: int) -> Data:
    """A `Data` of feature vectors, standardised with the training split's mean and std."""
    stratify = task != "regression"
    rest, test = _split(y, test_fraction, split_seed, stratify)
    keep, held = _split(y[rest], val_fraction, split_seed, stratify)
    train, val = rest[keep], rest[held]
    x = (x - x[train].mean(0)) / x[train].std(0)
    y = y.astype(np.float32)
    target_mean, target_std = (float(y[train].mean()), float(y[train].std())) if task == "regression" else (0.0, 1.0)
    y = (y - target_mean) / target_std
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float().unsqueeze(1)  # (N, F), (N, 1)
    splits = [Tensors(xt[i], yt[i]) for i in (train, val, test)]
    return Data(*splits, task, (x.shape[1],), 1, batch_size, num_workers, loader,
                target_mean=target_mean, target_std=target_std)


def _split(labels, fraction: float, seed: int, stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out), with `fraction` of the samples held out, stratified by label."""
    if not 0 < fraction < 1:
        raise UserError(f"a split fraction must lie strictly between 0 and 1, got {fraction}: "
                        "set data.val_fraction / data.test_fraction to e.g. 0.1")
    labels = np.asarray(labels)
    idx = np.arange(len(labels))
    # Stratified, a held-out split holds at least one sample of every class.
    size = max(math.ceil(fraction * len(labels)), len(np.unique(labels))) if stratify else fraction
    try:
        kept, held = train_test_split(idx, test_size=size, random_state=seed, stratify=labels if stratify else None)
    except ValueError:  # too few samples per class to stratify: an unstratified split, same seed
        log.warning("split of %d samples: too few per class to stratify, splitting at random", len(labels))
        kept, held = train_test_split(idx, test_size=fraction, random_state=seed)
    return np.sort(kept), np.sort(held)


def _augment(padding: int, flip: bool) -> CropFlip | None:
    return CropFlip(padding, flip) if padding or flip else None
