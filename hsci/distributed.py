"""One run on many devices: the ranks of a DDP run and the few places where they must agree.

`hsci train trainer.devices=N` starts N worker processes with torch.distributed's elastic launcher (the one
behind `torchrun`); `torchrun ... -m hsci train` or a cluster's task ranks start them from outside. Either
way every rank runs the same loop (hsci/train.py) on its own share of each batch, and rank 0 alone writes
the run directory and the console. What the ranks agree on lives here, next to the value each collective
reduces: when to stop, the losses, and which run directory they share.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hsci import UserError, interrupt

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

    def stop(self) -> int | None:
        """The stop signal all ranks act on after this step, if any of them received one (the highest-numbered,
        should they differ); one small exchange between processes, on the CPU: the device is not waited for."""
        signum = interrupt.requested()
        if self.backend is None or self.size == 1:
            return signum
        flag = torch.tensor(signum or 0)
        dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.control)
        agreed = int(flag) or None
        if agreed and not signum:  # another rank got it: this one stops as if it had
            interrupt.received.append(agreed)
        return agreed

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

    def blame(self, error: str) -> str:
        """The run's error, in one line, given this rank's: its own when it failed first, else the error of the
        rank that did (the others fail in their next exchange with it), which each rank that fails writes first
        into the store the ranks met through."""
        mine = f"rank {self.rank} failed: {error}"
        if self.size == 1:
            return error
        try:
            if _store().add(_key("failures"), 1) == 1:
                _store().set(_key("first_failure"), mine)
                return mine
            return _store().get(_key("first_failure")).decode()
        except Exception:  # the store went with the rank that hosted it: this rank's own error, then
            return mine

    @contextmanager
    def rank_0_first(self, what: str) -> Iterator[None]:
        """Rank 0 does `what` before the others start it (a download into a folder they share)."""
        if self.size > 1 and not self.main:
            _store().wait([_key(what)], timedelta(hours=2))
        yield
        if self.size > 1 and self.main:
            _store().set(_key(what), "done")

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.control)

    def same_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch norm's running statistics) on every rank, as DDP's next forward would give
        them: the model validated on each rank's share is the one rank 0 saves."""
        if self.size > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model as the training step runs it: under DDP, which averages the gradients in buckets during the
        backward pass, whenever ranks are in play (even one, under torchrun)."""
        if self.backend is None:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True, static_graph=True)


SINGLE = World()


def started_as_rank() -> bool:
    """Whether this process was started as a rank of a larger job (torchrun, or a cluster that sets RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def devices(choice: int | str, device: str) -> int:
    """How many processes `trainer.devices` asks for on this machine: `auto` is every visible GPU (one on the
    CPU); N GPUs must be visible."""
    on_cuda = _on_cuda(device)
    count = torch.cuda.device_count() if on_cuda else 1
    n = count if choice == "auto" else int(choice)
    if n > 1 and device.startswith("cuda:"):
        raise UserError(f"trainer.device={device} names one GPU but trainer.devices={choice}: use trainer.device=cuda "
                        "(each rank takes cuda:<local rank>), or trainer.devices=1")
    if n > 1 and device == "mps":
        raise UserError(f"trainer.devices={choice} on mps: one MPS device trains one process; use trainer.devices=1")
    if n > 1 and on_cuda and n > count:
        raise UserError(f"trainer.devices={choice} but {count} CUDA device(s) are visible: use trainer.devices="
                        f"{count} or auto, or trainer.device=cpu for CPU processes")
    return n


def join(device: str, timeout_s: float) -> World:
    """Join the job this process was started in as a rank (RANK, WORLD_SIZE, MASTER_ADDR... set by the elastic
    launcher, torchrun or a cluster): NCCL on CUDA, gloo on the CPU; each rank on GPU <local rank>."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    backend = "nccl" if _on_cuda(device) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:  # the processes share the cores this machine gives the job
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_size))
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=dist.PrefixStore(_key("group"), _store()), rank=rank, world_size=size,
                            timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return World(rank, size, local_rank, local_size, backend, control, timeout_s)


def _on_cuda(device: str) -> bool:
    return device.startswith("cuda") or device == "auto" and torch.cuda.is_available()


def cluster_tasks() -> bool:
    """Whether this job runs as several tasks of a cluster job that submitit started (nodes, or tasks per node):
    then each task is a rank, and submitit's own account of them is exported as torch.distributed reads it
    (RANK, WORLD_SIZE, MASTER_ADDR ...), each task keeping every GPU of its node in sight."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    import submitit

    if submitit.JobEnvironment().num_tasks == 1:
        return False
    if not started_as_rank():
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def announce(run_dir: Path | None, resumed: bool = False) -> None:
    """Rank 0 (of ranks started from outside: torchrun, a cluster): tell the others the run directory it made
    and whether the run carries on from its last.pt; or None, that there is no run for them (rank 0 refused it,
    or stopped first, and says why). Said once: later calls change nothing."""
    if not _announced:
        _announced.append(run_dir)
        _store().set(_key("run_dir"), json.dumps({"run_dir": run_dir and str(run_dir), "resumed": resumed}))


_announced: list = []


def run_of_rank_0() -> tuple[Path | None, bool]:
    """The run directory rank 0 made, and whether it resumes (waiting until rank 0 says): its saved config tells
    the other ranks what to build. None: there is no run to take part in."""
    said = json.loads(_store().get(_key("run_dir")).decode())
    return said["run_dir"] and Path(said["run_dir"]), said["resumed"]


_stores: list = []


def _store() -> dist.Store:
    """The key-value store the ranks meet through: the launcher's (torchrun and the elastic launcher keep one for
    their ranks), else one that rank 0 keeps, at MASTER_ADDR:MASTER_PORT."""
    if not _stores:
        by_launcher = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        _stores.append(dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                     int(os.environ["WORLD_SIZE"]), is_master=not by_launcher and os.environ["RANK"] == "0",
                                     timeout=timedelta(minutes=30), wait_for_workers=False))
    return _stores[0]


def _key(name: str) -> str:
    """A key of this attempt of the job (torchrun may restart the ranks: each attempt meets anew)."""
    return f"hsci/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/{name}"


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _stores.clear()


class RankFailed(UserError):
    """The run's error as a rank found it (`World.blame`), in one line, on its way to the launcher or summary.json."""


def rank_logging(world: World, log_file: Path) -> None:
    """A worker's output: rank 0 logs to the run's train.log as the launcher does and prints as a single run
    would; every other rank is silent, save for warnings and errors, which go to train.log under its rank."""
    prefix = "" if world.main else f"[rank {world.rank}] "
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = logging.INFO if world.main else logging.WARNING
    root.setLevel(level)
    handler.setLevel(level)  # what other loggers pass up, too (submitit's, at INFO)
    if not world.main:
        logging.captureWarnings(True)
        from hsci import report

        quiet = open(os.devnull, "w")
        report.console.file = report.errors.file = quiet
        sys.stdout = sys.stderr = quiet
