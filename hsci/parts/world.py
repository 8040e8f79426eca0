"""This process's place among a run's processes (`World`): one process unless it was started as a rank of a DDP
run, and the few places where the ranks must agree, each next to the value it reduces: when to stop, the losses,
which rank's error is the run's, who downloads first. `join` and `leave` make and end the process group; the
store the ranks meet through is the launcher's (torchrun's, the elastic launcher's) or rank 0's.

Starting the ranks and following rank 0 live in hsci/jobs/ranks.py; every rank runs the same loop
(hsci/loop/train.py) on its own share of each batch, and rank 0 alone writes the run directory and the console.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hsci import interrupt


TIME_UP = "max_time"  # what `World.stop` says when trainer.max_time has passed


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes: one process, rank 0 of 1, unless started as a rank."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None  # nccl or gloo; None for one process without torch.distributed
    control: Any = None  # a gloo group for the stop flag, which must never wait for a device
    timeout_s: float = 300  # how long a rank waits for the others in an exchange (trainer.dist_timeout_s)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory and the console."""
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return self.size // self.local_size

    def stop(self, late: bool = False) -> int | str | None:
        """The stop signal all ranks act on after this step, if any of them received one (the highest-numbered,
        should they differ); else TIME_UP if any rank is `late` (trainer.max_time has passed by its clock). One
        small exchange between processes, on the CPU: the device is not waited for."""
        signum = interrupt.requested()
        if self.backend is None or self.size == 1:
            return signum or (TIME_UP if late else None)
        flags = torch.tensor([signum or 0, int(late)])
        dist.all_reduce(flags, dist.ReduceOp.MAX, group=self.control)
        agreed, late = int(flags[0]) or None, bool(flags[1])
        if agreed and not signum:  # another rank got it: this one stops as if it had
            interrupt.received.append(agreed)
        return agreed or (TIME_UP if late else None)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over the ranks (each holds its own share's)."""
        if self.size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.size

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the ranks."""
        if self.size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value

    def gather(self, value):
        """Every rank's `value` (any picklable object: these are the run's own processes), in rank order."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value, group=self.control)
        return values

    def blame(self, error: str) -> str:
        """The run's error, in one line, given this rank's: its own when it failed first, else the error of the
        rank that did (the others fail in their next exchange with it), which each rank that fails writes first
        into the store the ranks met through."""
        mine = f"rank {self.rank} failed: {error}"
        if self.size == 1:
            return error
        try:
            if store().add(key("failures"), 1) == 1:
                store().set(key("first_failure"), mine)
                return mine
            return store().get(key("first_failure")).decode()
        except Exception:  # the store went with the rank that hosted it: this rank's own error, then
            return mine

    @contextmanager
    def rank_0_first(self, what: str) -> Iterator[None]:
        """Rank 0 does `what` before the others start it (a download into a folder they share)."""
        if self.size > 1 and not self.main:
            store().wait([key(what)], timedelta(hours=2))
        yield
        if self.size > 1 and self.main:
            store().set(key(what), "done")

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.control)

    def same_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch norm's running statistics) on every rank, as DDP's next forward would give
        them: the model validated on each rank's share is the one rank 0 saves."""
        if self.size > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def wrap(self, model: nn.Module, device: torch.device, accumulating: bool = False) -> nn.Module:
        """The model as the training step runs it: under DDP, which averages the gradients in buckets during the
        backward pass, whenever ranks are in play (even one, under torchrun). A static graph lets DDP plan its
        buckets once, but it cannot skip an exchange: `accumulating` (no_sync between optimizer steps) goes without."""
        if self.backend is None:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True, static_graph=not accumulating)


SINGLE = World()


def started_as_rank() -> bool:
    """Whether this process was started as a rank of a larger job (torchrun, or a cluster that sets RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join(device: str, timeout_s: float) -> World:
    """Join the job this process was started in as a rank (RANK, WORLD_SIZE, MASTER_ADDR... set by the elastic
    launcher, torchrun or a cluster): NCCL on CUDA, gloo on the CPU; each rank on GPU <local rank>."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    backend = "nccl" if on_cuda(device) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:  # the processes share the cores this machine gives the job
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_size))
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=dist.PrefixStore(key("group"), store()), rank=rank, world_size=size,
                            timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return World(rank, size, local_rank, local_size, backend, control, timeout_s)


_stores: list = []


def store() -> dist.Store:
    """The key-value store the ranks meet through: the launcher's (torchrun and the elastic launcher keep one for
    their ranks), else one that rank 0 keeps, at MASTER_ADDR:MASTER_PORT."""
    if not _stores:
        by_launcher = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        _stores.append(dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                     int(os.environ["WORLD_SIZE"]), is_master=not by_launcher and os.environ["RANK"] == "0",
                                     timeout=timedelta(minutes=30), wait_for_workers=False))
    return _stores[0]


def key(name: str) -> str:
    """A key of this attempt of the job (torchrun may restart the ranks: each attempt meets anew)."""
    return f"hsci/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/{name}"


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _stores.clear()


def on_cuda(device: str) -> bool:
    """Whether `trainer.device` (auto, cpu, cuda, cuda:N, mps) trains on CUDA here."""
    return device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
