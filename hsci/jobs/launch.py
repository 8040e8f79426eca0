"""Starting a run's ranks on this machine (`trainer.devices=N`): torch.distributed's elastic launcher, the one
behind `torchrun`, with hsci keeping the stop signals: it passes them on to the ranks, which stop together."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable

from hsci import UserError, interrupt


class RankFailed(UserError):
    """The run's error as a rank found it (hsci/parts/world.py's `World.blame`), in one line, on its way to the
    launcher or summary.json."""


class Failed(Exception):
    """The run's ranks ended with an error (the message), or a signal ended one of them (`by_signal`)."""

    def __init__(self, message: str, by_signal: bool):
        super().__init__(message)
        self.by_signal = by_signal


def launch(nproc: int, worker: Callable, *args) -> None:
    """Run `worker(*args)` in `nproc` processes started by the elastic launcher on this machine (ranks 0..nproc-1
    over localhost). A rank that fails stops the others, and this raises `Failed` naming the first.

    Stop signals stay hsci's: the first is passed on to every rank, which all stop after the same step (rank 0
    saves); a second one ends them at once (SIGKILL) and raises KeyboardInterrupt here."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher leaves the stop signals to hsci: torch since about 2.8 takes `signals_to_handle`, older ones
    # read the variable.
    takes = "signals_to_handle" in LaunchConfig.__dataclass_fields__
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"hsci-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn", **({"signals_to_handle": "SIGQUIT"} if takes else {}))
    # What the launcher changes in this process, put back when it is done (a sweep runs further jobs here).
    handlers = {s: signal.getsignal(s) for s in (*interrupt.STOPS, signal.SIGQUIT)}
    logs = {name: logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")}
    kept_logs = {name: (log.propagate, list(log.handlers)) for name, log in logs.items()}
    kept_env = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    start_method = multiprocessing.get_start_method(allow_none=True)
    launching = threading.Event()
    try:
        for log in logs.values():  # the launcher's notes go to the run's log, not the console
            log.propagate, log.handlers = False, list(logging.getLogger().handlers)
        if not takes:
            os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGQUIT"
        if start_method not in (None, "spawn", "fork", "forkserver"):  # joblib's loky, which the ranks lack
            multiprocessing.set_start_method("spawn", force=True)
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
        for s, h in handlers.items():
            signal.signal(s, h)
        for name, (propagate, kept) in kept_logs.items():
            logs[name].propagate, logs[name].handlers = propagate, kept
        if kept_env is None:
            os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
        else:
            os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = kept_env
        if multiprocessing.get_start_method(allow_none=True) != start_method:
            multiprocessing.set_start_method(start_method, force=True)


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
                try:
                    os.kill(rank.pid, signum)
                except ProcessLookupError:  # it has just ended
                    pass
