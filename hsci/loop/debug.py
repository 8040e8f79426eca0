"""The trainer's debugging aids, each off unless asked for, and then wrapping only what it watches: torch's anomaly
mode around the training steps (`trainer.detect_anomaly`), a profile of a few steps (`trainer.profile`,
hsci/loop/profile.py), and a quick check of the whole pipeline that leaves no run behind (`trainer.fast_dev_run`).
"""

from __future__ import annotations

import copy
import re
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterable, Iterator

import torch
from omegaconf import DictConfig

from hsci import report
from hsci.loop.profile import Profile
from hsci.loop.step import DIVERGED_HINT, Diverged, Epoch

NAN_OP = re.compile(r"Function '(\w+)' returned nan values in its \w+ output")  # torch's anomaly error
FORWARD = "Traceback of forward call that caused the error"  # torch's warning that follows it
FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


class Watch:
    """What watches the training steps of a run: anomaly mode, and the profile of its first epoch's steps (written
    into `run_dir`, on the process that writes the run directory: None elsewhere)."""

    def __init__(self, trainer: DictConfig, run_dir: Path | None, device: torch.device):
        self.anomaly = bool(trainer.get("detect_anomaly"))
        self.profile = Profile(run_dir / "profile", device) if trainer.get("profile") and run_dir else None

    @contextmanager
    def epoch(self, epoch: Epoch, batches: Iterable) -> Iterator[Iterable]:
        """`epoch`'s batches as its steps should take them, while they run."""
        if not self.anomaly and not (self.profile and not self.profile.done):
            yield batches
            return
        try:
            with anomaly_mode(epoch) if self.anomaly else nullcontext():
                yield self.profile.steps(batches, epoch) if self.profile else batches
        finally:
            if self.profile:
                self.profile.finish()


@contextmanager
def anomaly_mode(epoch: Epoch) -> Iterator[None]:
    """torch's anomaly mode, checking every backward op for NaN: the first that returns one stops the run as
    diverged, its error naming the op and the forward call that made its input (its traceback in train.log)."""
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught, torch.autograd.set_detect_anomaly(True, check_nan=True):
            yield
    except RuntimeError as e:
        found = NAN_OP.search(str(e))
        if not found:
            raise
        trace = next((str(w.message) for w in caught if FORWARD in str(w.message)), "")
        report.log.error("trainer.detect_anomaly: %s\n%s", found.group(0), trace)
        raise Diverged(f"the backward pass gave NaN at epoch {epoch.number}, step {epoch.step + 1}: {found.group(0)}"
                       f"{forward_call(trace)} (trainer.detect_anomaly; the forward call's traceback is in train.log): "
                       f"{DIVERGED_HINT}") from e
    finally:
        for w in caught:  # the rest, as they would have been shown
            if FORWARD not in str(w.message):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def forward_call(trace: str) -> str:
    """Where the forward call of torch's anomaly traceback was made: its innermost frame outside torch."""
    frames = FRAME.findall(trace)
    torch_dir = str(Path(torch.__file__).parent)
    outside = [f for f in frames if not f[0].startswith(torch_dir)] or frames
    if not outside:
        return ""
    file, line, function, code = outside[-1]
    return f"; its forward call: {code.strip()} ({Path(file).name}:{line}, in {function})"


def dev_run(cfg: DictConfig) -> DictConfig:
    """With `trainer.fast_dev_run` (true or N), the config of a quick check: one epoch of N batches (1 for true),
    N batches of validation and of test, best.pt and last.pt only, no profile; `cfg` itself otherwise."""
    n = cfg.trainer.get("fast_dev_run")
    if not n:
        return cfg
    n = 1 if n is True else int(n)
    cfg = copy.deepcopy(cfg)
    t = cfg.trainer
    t.epochs, t.limit_batches, t.early_stop_patience = 1, n, None
    t.limit_train_batches = t.limit_val_batches = t.limit_test_batches = None  # n batches in every stage
    t.save_top_k, t.save_every_n_epochs, t.profile = 1, None, False
    report.say(f"fast_dev_run: {n} batch{'es' if n > 1 else ''} of training, validation and test, then the test of "
               "best.pt; a run that passes leaves no run directory")
    return cfg


def passed(run_dir: Path, summary: dict) -> None:
    """A quick check that passed: said, and its run directory removed (it holds no result)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    test = summary.get("test") or {}
    report.say("fast_dev_run passed: training, validation, checkpoints and test all ran"
               + (f" (test loss {test['loss']:.4f})" if "loss" in test else "")
               + (f"; {run_dir} could not be removed" if run_dir.exists() else f"; {run_dir} removed"))
