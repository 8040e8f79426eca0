"""What a dataset builder (hsci/data.py, or a user's own) returns, and the pieces it is made of.

A `Data` bundle holds the three splits, what a model needs to know of them (task, input shape, outputs), how
they are fed (`Loading`) and how their values are scaled (`Scaling`). Images are kept as uint8 (N, C, H, W)
and normalised on the device (hsci/parts/loaders.py); tables come standardised with the training split's
statistics. Splits that a dataset lacks are carved (`Carving`) with a fixed seed, so every run of a dataset
sees the same validation and test sets.
"""

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from hsci import UserError
from hsci.parts.splits import carve


@dataclass(frozen=True)
class Loading:
    """How a dataset's splits are fed to the model: `data.batch_size` (the global batch, shared by the
    processes of a run), `data.num_workers` ("auto" = one per CPU, at most 8), `data.loader` (auto, torch:
    a DataLoader, or gpu: the whole set on the device, augmented there) and `data.drop_last` (whether training
    leaves out the incomplete last batch: true, false or auto, hsci/parts/loaders.py's `drops`)."""

    batch_size: int
    num_workers: int | str = 0
    loader: str = "auto"
    drop_last: bool | str = "auto"


@dataclass(frozen=True)
class Scaling:
    """How values are scaled for the model: image pixels, scaled to [0, 1], are normalised per channel with
    `mean` and `std` on the device (None for tables, which come standardised: each feature with the training
    split's `feature_mean` and `feature_std`, which `hsci predict` applies to new rows); regression targets are
    standardised for training with `target_mean` and `target_std`, which the metrics undo."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0
    feature_mean: tuple[float, ...] | None = None
    feature_std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Carving:
    """How the splits a dataset lacks are carved from its training split, stratified: `val_fraction` of it for
    validation and, for a set without a test split of its own, `test_fraction` for testing first; drawn with
    `seed` (data.split_seed), not the run's seed."""

    val_fraction: float
    seed: int
    test_fraction: float | None = None

    def test(self, labels) -> tuple[np.ndarray, np.ndarray]:
        """Indices (kept, test) of a set without a test split."""
        return carve(labels, self.test_fraction, self.seed)

    def val(self, labels, stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Indices (train, val) of what remains for training."""
        return carve(labels, self.val_fraction, self.seed, stratify)


@dataclass
class Data:
    """The three splits of a dataset and what a model and a loader need to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    task: str  # multiclass, binary or regression
    input_shape: tuple[int, ...]  # (C, H, W) for images, (features,) for tables
    num_outputs: int  # classes for multiclass, 1 for binary and regression
    loading: Loading
    scaling: Scaling = Scaling()


@dataclass(frozen=True)
class CropFlip:
    """Train-time augmentation: a random crop of the original size from the image zero-padded by `padding`,
    then a horizontal flip with probability 1/2 when `flip`. hsci/parts/loaders.py applies the same to whole
    batches on the device."""

    padding: int
    flip: bool

    @classmethod
    def of(cls, padding: int, flip: bool) -> "CropFlip | None":
        """The augmentation that data.random_crop_padding and data.horizontal_flip ask for; None for none."""
        return cls(padding, flip) if padding or flip else None

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
    sample's augmentation, whichever worker process loads it. `classes` names the labels, if known.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: CropFlip | None = None,
                 classes: list[str] | None = None):
        self.x, self.y, self.augment, self.classes = x, y, augment, classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: int | tuple[int, int] | list):
        """One sample; or, for a list of keys, the whole batch with one gather, as the samples one by one
        would stack up (hsci/parts/loaders.py fetches in-memory sets this way)."""
        if isinstance(key, list):
            if key and isinstance(key[0], tuple):
                idx, seeds = map(list, zip(*key))
                return (self.augment.batch(self.x[idx], seeds) if self.augment else self.x[idx]), self.y[idx]
            return self.x[key], self.y[key]
        i, seed = key if isinstance(key, tuple) else (key, None)
        return augmented(self.x[i], self.augment, seed), self.y[i]


def augmented(x: torch.Tensor, augment: CropFlip | None, seed: int | None) -> torch.Tensor:
    """One image as `augment` makes it for a sample of this seed (none: as it is)."""
    if augment is None:
        return x
    if seed is None:  # indexed directly, outside hsci's sampler: draw from torch's generator
        seed = int(torch.randint(2**62, ()))
    return augment(x, seed)


@dataclass(frozen=True)
class Images:
    """Images in memory as their files hold them: uint8 (N, C, H, W) and labels, of the training and test
    splits; `name` is the dataset's option (data=...), `classes` the labels' names where the files give them."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str] | None = None

    def data(self, declared: tuple[list[int], int], loading: Loading, carving: Carving, scaling: Scaling,
             augment: CropFlip | None) -> Data:
        """A `Data` of these images, which must have the `declared` (data.image_shape, data.num_classes);
        validation is carved from the training split."""
        shape, classes = declared
        found, top = tuple(self.x_train.shape[1:]), max(int(self.y_train.max()), int(self.y_test.max()))
        if found != tuple(shape) or top >= classes:
            raise UserError(f"data={self.name}: the files hold images of shape {found} with labels up to {top}, not "
                            f"data.image_shape={list(shape)} and data.num_classes={classes}: check data.root, or "
                            "correct those two keys")
        keep, held = carving.val(self.y_train)
        names = self.classes
        return Data(Tensors(self.x_train[keep], self.y_train[keep], augment, names),
                    Tensors(self.x_train[held], self.y_train[held], classes=names),
                    Tensors(self.x_test, self.y_test, classes=names), "multiclass", found, classes, loading, scaling)


def table(x: np.ndarray, y: np.ndarray, task: str, loading: Loading, carving: Carving,
          classes: list[str] | None = None) -> Data:
    """A `Data` of feature vectors (N, F), standardised with the training split's mean and std; a regression
    target is standardised too. Test and validation are carved, stratified for classification; `classes` names
    a classification's labels."""
    stratify = task != "regression"
    rest, test = carve(y, carving.test_fraction, carving.seed, stratify)
    keep, held = carving.val(y[rest], stratify)
    train, val = rest[keep], rest[held]
    feature_mean, feature_std = x[train].mean(0), x[train].std(0)
    x = (x - feature_mean) / feature_std
    y = y.astype(np.float32)
    target_mean, target_std = (float(y[train].mean()), float(y[train].std())) if task == "regression" else (0.0, 1.0)
    y = (y - target_mean) / target_std
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float().unsqueeze(1)  # (N, F), (N, 1)
    splits = [Tensors(xt[i], yt[i], classes=classes) for i in (train, val, test)]
    scaling = Scaling(target_mean=target_mean, target_std=target_std, feature_mean=tuple(map(float, feature_mean)),
                      feature_std=tuple(map(float, feature_std)))
    return Data(*splits, task, (x.shape[1],), 1, loading, scaling)
