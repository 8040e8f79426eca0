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
import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

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

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory and the console."""
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return self.size // self.local_size

    def stop(self) -> int | None:
        """The stop signal all ranks act on after this step: the first any of them received (one small exchange
        between processes, on the CPU: the device is not waited for)."""
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
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


SINGLE = World()


def started_as_rank() -> bool:
    """Whether this process was started as a rank of a larger job (torchrun, or a cluster that sets RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def devices(choice: int | str, device: str) -> int:
    """How many processes `trainer.devices` asks for on this machine: `auto` is every visible GPU (one on the
    CPU); N GPUs must be visible."""
    on_cuda = device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
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
    on_cuda = device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
    backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(local_rank)
    else:  # the processes share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    dist.init_process_group(backend, store=dist.PrefixStore(_key("group"), _store()), rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    control = dist.new_group(backend="gloo") if backend != "gloo" else None
    return World(rank, size, local_rank, local_size, backend, control)


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


def announce(run_dir: Path, resumed: bool) -> None:
    """Rank 0 (of ranks started from outside: torchrun, a cluster): tell the others the run directory it made
    and whether the run carries on from its last.pt."""
    _store().set(_key("run_dir"), json.dumps({"run_dir": str(run_dir), "resumed": resumed}))


def run_of_rank_0() -> tuple[Path, bool]:
    """The run directory rank 0 made, and whether it resumes (waiting until rank 0 says): its saved config tells
    the other ranks what to build."""
    said = json.loads(_store().get(_key("run_dir")).decode())
    return Path(said["run_dir"]), said["resumed"]


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


def launch(nproc: int, worker: Callable, *args) -> None:
    """Run `worker(*args)` in `nproc` processes started by the elastic launcher on this machine (ranks 0..nproc-1
    over localhost). A rank that fails stops the others, and this raises `Failed` naming the first.

    Stop signals stay hsci's: the first is passed on to every rank, which all stop after the same step (rank 0
    saves); a second one ends them at once (SIGKILL) and raises KeyboardInterrupt here."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher leaves the stop signals to hsci (torch of 2.8 or so on takes `signals_to_handle`, older ones the
    # variable it sets).
    leave_stops = {"signals_to_handle": "SIGQUIT"} if "signals_to_handle" in LaunchConfig.__dataclass_fields__ else {}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"hsci-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn", **leave_stops)
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):  # the launcher's notes: to the run's log
        launcher_log = logging.getLogger(name)
        launcher_log.propagate, launcher_log.handlers = False, list(logging.getLogger().handlers)
    handlers = {s: signal.getsignal(s) for s in interrupt.STOPS}
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGQUIT"
    launching = threading.Event()
    try:
        for s in interrupt.STOPS:
            if not (s == signal.SIGTERM and interrupt.preemption()):  # in a submitit job, SIGTERM stays submitit's
                signal.signal(s, _stop_ranks)
        threading.Thread(target=_pass_on, args=(launching,), daemon=True).start()
        elastic_launch(config, worker)(*args)
    except ChildFailedError as e:
        rank, failure = min(e.failures.items(), key=lambda item: item[1].timestamp)
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message)
        if failure.exitcode < 0:
            raise Failed(f"rank {rank} was ended by {failure.signal_name()}", True) from None
        if message.startswith(f"{RankFailed.__name__}: "):  # the run's error, as the ranks found it
            raise Failed(message.removeprefix(f"{RankFailed.__name__}: "), False) from None
        raise Failed(f"rank {rank} failed (exit code {failure.exitcode}): {message}", False) from None
    finally:
        launching.set()
        os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
        for s, h in handlers.items():
            signal.signal(s, h)


def _stop_ranks(signum: int, frame) -> None:
    """The launcher's stop signals: the first is recorded (`_pass_on` passes it to the ranks); a second ends the
    ranks at once."""
    if not interrupt.requested():
        interrupt.received.append(signum)
        sys.stderr.write(f"\n{signal.Signals(signum).name}: every process stops after this step and rank 0 saves "
                         "(Ctrl-C again to quit at once)\n")
        return
    for rank in multiprocessing.active_children():
        rank.kill()
    raise KeyboardInterrupt


def _pass_on(done: threading.Event) -> None:
    """Give the launcher's stop signal to each rank, those started after it came as well."""
    told = set()
    while not done.wait(0.05):
        signum = interrupt.requested()
        for rank in multiprocessing.active_children() if signum else ():
            if rank.pid not in told:
                told.add(rank.pid)
                os.kill(rank.pid, signum)


class Failed(Exception):
    """The run's ranks ended with an error (the message), or a signal ended one of them (`by_signal`)."""

    def __init__(self, message: str, by_signal: bool):
        super().__init__(message)
        self.by_signal = by_signal


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
