"""Feeding a `Data` bundle to the device: DataLoaders, and the on-device step from a batch to model input."""

import atexit
import multiprocessing
import os
import signal
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler):
    """The training order: a permutation, and a seed per sample, that are functions of (run seed, epoch).

    So a run restarted at any epoch and batch sees exactly the data it would have seen, with any number
    of worker processes. Datasets with an `augment` attribute (hsci's own) receive (index, seed) keys.
    """

    def __init__(self, n: int, seed: int, with_seeds: bool):
        self.n, self.seed, self.with_seeds = n, seed, with_seeds
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Serve `epoch`'s order from its `start`-th sample on (a resumed epoch skips what it has done)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n - self.start

    def __iter__(self) -> Iterator:
        entropy = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(entropy))
        order = torch.randperm(self.n, generator=g)[self.start:].tolist()
        if not self.with_seeds:
            return iter(order)
        seeds = torch.randint(2**62, (self.n,), generator=g)[self.start:].tolist()
        return iter(zip(order, seeds))


def make_loader(dataset: Dataset, batch_size: int, num_workers: int | str, device: torch.device, *,
                train: bool, seed: int) -> DataLoader:
    """A DataLoader; the training one draws its order from an `EpochSampler` and drops a ragged last batch."""
    workers = min(8, os.cpu_count() or 1) if num_workers == "auto" else int(num_workers)
    sampler = EpochSampler(len(dataset), seed, hasattr(dataset, "augment")) if train else None
    return DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, worker_init_fn=_worker_init,
        drop_last=train and len(dataset) > batch_size,  # a batch of one breaks batch norm
        generator=torch.Generator().manual_seed(seed))  # worker seeds; keeps the global generator untouched


def _worker_init(worker_id: int) -> None:
    # Ctrl-C and a scheduler's SIGTERM reach every process of the job; the main process handles them (it
    # finishes the step and saves, which may need the workers) and ends the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register
def _end_workers() -> None:
    """Workers still alive at exit (a run that failed mid-epoch) ignore SIGTERM, which is how multiprocessing
    would end them: kill them instead. Registered after multiprocessing's own exit hook, so it runs first."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a worker failure
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()


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
