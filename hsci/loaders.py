"""Feeding a `Data` bundle to the device: DataLoaders, and the on-device step from a batch to model input."""

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


def make_loader(dataset: Dataset, batch_size: int, num_workers: int | str, device: torch.device, *,
                train: bool, seed: int) -> DataLoader:
    """A DataLoader; the training one shuffles in an order fixed by `seed` and drops a ragged last batch."""
    workers = min(8, os.cpu_count() or 1) if num_workers == "auto" else int(num_workers)
    return DataLoader(
        dataset, batch_size, shuffle=train, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        drop_last=train and len(dataset) > batch_size,  # a batch of one breaks batch norm
        generator=torch.Generator().manual_seed(seed))


def input_fn(mean: tuple | None, std: tuple | None, device: torch.device, *, size: int | None = None,
             channels: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The on-device step from a loader's batch to the model's input.

    uint8 images (B, C, H, W) become floats normalised with `mean`/`std`; `channels` and `size` adapt
    them to pretrained weights (grayscale repeated to RGB, resized). Tables pass through unchanged.
    """
    if mean is None:
        return lambda x: x
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def to_input(x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        if channels and x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)
        if size and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (x - mean_t) / std_t

    return to_input
