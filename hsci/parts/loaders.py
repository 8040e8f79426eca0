"""Feeding a `Data` bundle to the device: DataLoaders or the on-device loader, and the on-device step from a batch
to model input."""

import atexit
import gc
import multiprocessing
import os
import signal
import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler, Subset

from hsci import UserError
from hsci.parts.datasets import Data, Loading, Tensors, crop_flip
from hsci.parts.world import SINGLE, World


def share(batch, rank: int, ranks: int):
    """Rank `rank`'s share of a global batch (a list or a tensor): the `rank`-th of `ranks` consecutive, equal
    parts, so the ranks' shares side by side are the batch one process would take."""
    n = len(batch)
    return batch[n * rank // ranks:n * (rank + 1) // ranks]


class EpochSampler(Sampler):
    """The training batches: a permutation, and a seed per sample, that are functions of (run seed, epoch).

    So a run restarted at any epoch and batch sees exactly the data it would have seen, with any number
    of worker processes or of ranks (each takes its `share` of every batch). Yields lists of keys: indices,
    or (index, seed) pairs for datasets that augment. Without `shuffle`, the same batches in order every epoch.
    """

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, with_seeds: bool, rank: int = 0,
                 ranks: int = 1, shuffle: bool = True):
        self.n, self.batch_size, self.drop_last, self.seed, self.with_seeds = n, batch_size, drop_last, seed, with_seeds
        self.rank, self.ranks, self.shuffle = rank, ranks, shuffle
        self.epoch, self.first = 1, 0

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Serve `epoch`'s batches from its `first_batch` on (a resumed epoch skips what it has done)."""
        self.epoch, self.first = epoch, first_batch

    def __len__(self) -> int:
        return (self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)) - self.first

    def __iter__(self) -> Iterator[list]:
        g = epoch_generator(self.seed, self.epoch, torch.device("cpu"))
        keys = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        if self.with_seeds:
            keys = list(zip(keys, torch.randint(2**62, (self.n,), generator=g).tolist()))
        for b in range(self.first, self.first + len(self)):
            yield share(keys[b * self.batch_size:(b + 1) * self.batch_size], self.rank, self.ranks)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator an epoch's order and augmentation are drawn from: a function of (seed, epoch) alone."""
    entropy = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(entropy))


class DeviceLoader:
    """Batches from a dataset held whole on the device, as uint8: each epoch's order, crops and flips are
    drawn at once from (seed, epoch) and applied there in whole batches, so no CPU worker stands between the
    data and the model.

    The training loader gives the same stream on every device, in the order `EpochSampler` gives (by
    position: an interrupted epoch resumes exactly), and the same distribution of augmented images as
    `CropFlip` per sample. With several ranks, each takes its `share` of every training batch; an evaluation
    split is given already cut to the rank's part. Not `train`, the batches come in order, as they are (an
    evaluation split's, or trainer.overfit_batches' training batches)."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, *, train: bool, seed: int,
                 rank: int = 0, ranks: int = 1, drop_last: bool = False):
        self.x, self.y = dataset.x.to(device), dataset.y.to(device)
        self.augment = dataset.augment if train else None
        self.batch_size, self.train, self.seed, self.device = batch_size, train, seed, device
        self.rank, self.ranks = rank, ranks
        self.drop_last = train and drop_last
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        self.epoch, self.start = epoch, first_batch * self.batch_size

    def __len__(self) -> int:
        n = len(self.x) - self.start
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        order, offsets, flips = torch.arange(n, device=self.device), None, None
        if self.train:  # drawn on the CPU (a millisecond for 50,000 images): CUDA's generator draws other numbers
            g = epoch_generator(self.seed, self.epoch, torch.device("cpu"))
            order = torch.randperm(n, generator=g).to(self.device)
            if self.augment:
                offsets = torch.randint(2 * self.augment.padding + 1, (n, 2), generator=g).to(self.device)
                flips = (torch.rand(n, generator=g) < 0.5).to(self.device)
        for i in range(self.start, self.start + len(self) * self.batch_size, self.batch_size):
            mine = share(range(i, min(i + self.batch_size, n)), self.rank, self.ranks)  # this rank's positions
            batch = order[mine.start:mine.stop]
            x = self.x[batch]
            if self.augment:
                x = crop_flip(x, self.augment.padding, offsets[mine.start:mine.stop],
                              flips[mine.start:mine.stop] & self.augment.flip)
            yield x, self.y[batch]


def pick_loader(choice: str, data: Data, device: torch.device) -> str:
    """`gpu` or `torch` for data.loader=`choice`; `auto` takes gpu on CUDA when the set is held in memory and
    fits within a quarter of the device's free memory."""
    in_memory = all(isinstance(split, Tensors) for split in (data.train, data.val, data.test))
    if choice == "gpu" and not in_memory:
        raise UserError("data.loader=gpu needs a dataset held in memory, and this one reads files on demand: "
                        "use data.loader=torch or auto")
    if choice != "auto":
        return choice
    if device.type != "cuda" or not in_memory:
        return "torch"
    size = sum(t.nbytes for split in (data.train, data.val, data.test) for t in (split.x, split.y))
    gc.collect()  # what an earlier job of this process left (a sweep's) is not counted against this one
    torch.cuda.empty_cache()
    return "gpu" if size < torch.cuda.mem_get_info(device)[0] / 4 else "torch"


def train_loader(dataset: Dataset, loading: Loading, device: torch.device, seed: int, kind: str = "torch",
                 world: World = SINGLE, shuffle: bool = True) -> DataLoader | DeviceLoader:
    """The training batches: a DeviceLoader for kind `gpu`, else a DataLoader whose batches come from an
    `EpochSampler`; either leaves out the incomplete last batch where `drops` says so. `loading.batch_size` is
    the global batch: each rank of `world` takes its `share` of every batch. Without `shuffle`, the same batches
    in the split's order every epoch."""
    drop_last = drops(len(dataset), loading.batch_size, loading.drop_last, world.size)
    if kind == "gpu":
        return DeviceLoader(dataset, loading.batch_size, device, train=shuffle, seed=seed, rank=world.rank,
                            ranks=world.size, drop_last=drop_last)
    batches = EpochSampler(len(dataset), loading.batch_size, drop_last, seed,
                           getattr(dataset, "augment", None) is not None, world.rank, world.size, shuffle)
    return _data_loader(dataset, batches, loading, device, seed)


def drops(n: int, batch_size: int, choice: bool | str, ranks: int = 1) -> bool:
    """Whether an epoch of `n` training samples leaves out its incomplete last batch (data.drop_last=`choice`).

    `auto` drops it only where that is harmless: when it holds under a tenth of the split (each epoch draws a new
    order, so every sample still trains in most epochs), or when each of the `ranks` processes would get fewer
    than 2 of its samples (batch norm needs 2; a process with none would have no loss). A split no larger than
    one batch is that batch."""
    left = n % batch_size
    if n < batch_size or not left:
        if choice is True and n < batch_size:
            raise UserError(f"data.drop_last=true leaves no batch: the training split holds {n} samples, fewer than "
                            f"data.batch_size={batch_size}; use a smaller batch, or data.drop_last=auto")
        return False
    if choice == "auto":
        return left < 0.1 * n or left < 2 * ranks
    if not choice and left < ranks:
        raise UserError(f"data.drop_last=false keeps a last batch of {left} samples, fewer than one for each of the "
                        f"{ranks} processes: use data.drop_last=auto or true, or another data.batch_size")
    return bool(choice)


def dropped(loader: DataLoader | DeviceLoader) -> tuple[int, int]:
    """The samples each epoch of a training loader leaves out (its incomplete last batch), and the split's size."""
    if isinstance(loader, DataLoader):
        loader = loader.batch_sampler or loader.sampler  # the EpochSampler, however the loader holds it
    n, batch_size = (loader.n, loader.batch_size) if isinstance(loader, EpochSampler) else (len(loader.x),
                                                                                            loader.batch_size)
    return (n % batch_size if loader.drop_last else 0), n


def eval_loader(dataset: Dataset, loading: Loading, device: torch.device, seed: int, kind: str = "torch",
                limit: int | float | None = None, world: World = SINGLE) -> DataLoader | DeviceLoader:
    """An evaluation split in order: this rank's consecutive part of it (of its first `limit` batches, or that
    fraction of them: see `limited`), in batches of its share of the global batch, so that the ranks count each
    sample once."""
    mine = share(range(limited_samples(limit, len(dataset), loading.batch_size)), world.rank, world.size)
    if len(mine) < len(dataset):
        dataset = (Tensors(dataset.x[mine.start:mine.stop], dataset.y[mine.start:mine.stop])
                   if isinstance(dataset, Tensors) else Subset(dataset, mine))
    batch_size = max(1, loading.batch_size // world.size)
    if kind == "gpu":
        return DeviceLoader(dataset, batch_size, device, train=False, seed=seed)
    batches = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    return _data_loader(dataset, batches, loading, device, seed)


def limited(limit: int | float | None, batches: int) -> int:
    """How many of a loader's `batches` a stage takes under trainer.limit_*_batches: all for null, at most `limit`
    for a whole number, that fraction of them for a float (at least one)."""
    if limit is None:
        return batches
    if isinstance(limit, float):
        return min(batches, max(1, int(limit * batches)))
    return min(batches, limit)


def limited_samples(limit: int | float | None, n: int, batch_size: int) -> int:
    """The samples of an evaluation split of `n` that its first batches under `limit` hold."""
    return min(n, limited(limit, -(-n // batch_size)) * batch_size)


def _data_loader(dataset: Dataset, batches: Sampler, loading: Loading, device: torch.device, seed: int) -> DataLoader:
    """A DataLoader of `batches` (lists of keys); an in-memory set is fetched a whole batch at a time."""
    workers = min(8, os.cpu_count() or 1) if loading.num_workers == "auto" else int(loading.num_workers)
    common = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
              "worker_init_fn": _worker_init,
              "generator": torch.Generator().manual_seed(seed)}  # worker seeds; the global generator stays untouched
    if isinstance(dataset, Tensors):
        return DataLoader(dataset, batch_size=None, sampler=batches, **common)
    return DataLoader(dataset, batch_sampler=batches, **common)


def start_epoch(loader: DataLoader | DeviceLoader, epoch: int, first_batch: int = 0) -> None:
    """Point a training loader at `epoch`, from its `first_batch` on."""
    if isinstance(loader, DataLoader):
        loader = loader.batch_sampler or loader.sampler  # the EpochSampler, however the loader holds it
    loader.set_epoch(epoch, first_batch)


class Timed:
    """Iterates a loader and adds up, in `wait_s`, the seconds the consumer waited for each batch."""

    def __init__(self, loader):
        self.loader, self.wait_s = loader, 0.0

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.wait_s += time.perf_counter() - start
            if batch is None:
                return
            yield batch


def _worker_init(worker_id: int) -> None:
    # Ctrl-C, a scheduler's SIGTERM and a closed terminal's SIGHUP reach every process of the job; the main
    # process handles them (it finishes the step and saves, which may need the workers) and ends the workers.
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, signal.SIG_IGN)


@atexit.register
def _end_workers() -> None:
    """Workers still alive at exit (a run that failed mid-epoch) ignore SIGTERM, which is how multiprocessing
    would end them: kill them instead. Registered after multiprocessing's own exit hook, so it runs first."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a worker failure
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()


def input_fn(mean: tuple | None, std: tuple | None, device: torch.device, *, size: int | None = None,
             channels: int | None = None, channels_last: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The on-device step from a loader's batch to the model's input.

    uint8 images (B, C, H, W) become floats normalised with `mean`/`std`; `channels` and `size` adapt
    them to pretrained weights (grayscale repeated to RGB, resized); `channels_last` lays them out as
    (B, H, W, C) in memory for convolutions. Tables pass through unchanged.
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
        x = (x - mean_t) / std_t
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    return to_input
