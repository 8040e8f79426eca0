"""`trainer.profile=true`: torch.profiler over a few training steps of the first epoch a session trains, after
steps that warm up (the first steps pay for lazy set-up, cuDNN's search and the allocator's growth). It writes the
trace to `<run>/profile/<host>_<pid>.<time>.pt.trace.json`, a Chrome trace that chrome://tracing, Perfetto
(ui.perfetto.dev) and TensorBoard's PyTorch profiler plugin open; torch's own table of every operator to
`profile/ops.txt`; and the operators that took the most time of their own to the console and train.log.

Only the steps it records are wrapped: the epoch's batches pass through `Profile.steps`, which starts the profiler
before the first step and stops it once the last recorded step is done; later epochs go unwrapped, and a run
without it never imports the profiler.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch

from hsci import report
from hsci.loop.step import Epoch

WAIT, WARMUP, ACTIVE = 2, 1, 3  # steps skipped, run under the profiler unrecorded, recorded
SHOWN = 8  # operators on the console


def window(n: int) -> tuple[int, int, int]:
    """(skipped, warm-up, recorded) steps of an epoch with `n` steps to go: 2, 1 and 3, fewer in a shorter epoch
    (one recorded at least)."""
    active = min(ACTIVE, max(1, n - 1))
    warmup = min(WARMUP, n - active)
    return max(0, min(WAIT, n - active - warmup)), warmup, active


class Profile:
    """The profile of one epoch's steps, written into `folder` (the run's profile/)."""

    def __init__(self, folder: Path, device: torch.device):
        self.folder, self.device = folder, device
        self.done, self.running, self.first, self.epoch = False, None, 0, None

    def steps(self, batches: Iterable, epoch: Epoch) -> Iterable:
        """`epoch`'s batches, the steps of its window profiled (the first time only; then `batches` as they are)."""
        if self.done:
            return batches
        self.done = True
        return self._recorded(iter(batches), epoch)

    def _recorded(self, batches: Iterator, epoch: Epoch) -> Iterator:
        from torch.profiler import ProfilerActivity, profile, schedule

        wait, warmup, active = window(epoch.stop - epoch.step)
        self.first, self.epoch = epoch.step + wait + warmup + 1, epoch
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.device.type != "cuda":  # kineto's ERROR that it found no GPU, on a machine without one: noise
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        with warnings.catch_warnings():  # torch's note that a window without warm-up can skew it: a short epoch's
            warnings.simplefilter("ignore")
            steps = schedule(wait=wait, warmup=warmup, active=active, repeat=1)
        self.running = profile(activities=activities, schedule=steps, on_trace_ready=self._ready)
        self.running.start()
        for _ in range(wait + warmup + active):
            batch = next(batches, None)
            if batch is None or self.running is None:  # the epoch ended, or it was stopped
                return
            yield batch
            self.running.step()  # the step is done: asked for the next batch
        self.finish()
        yield from batches

    def finish(self) -> None:
        """Stop the profiler, if it runs: what it recorded is written and shown."""
        running, self.running = self.running, None
        if running is not None:
            running.stop()

    def _ready(self, prof) -> None:
        """Write the trace and torch's table of operators; show the top operators."""
        from torch.profiler import tensorboard_trace_handler

        self.folder.mkdir(parents=True, exist_ok=True)
        tensorboard_trace_handler(str(self.folder))(prof)
        [trace] = sorted(self.folder.glob("*.pt.trace.json"), key=lambda p: p.stat().st_mtime)[-1:]
        device = self.device.type == "cuda"
        own = "self_device_time_total" if device else "self_cpu_time_total"
        ops = [op for op in prof.key_averages() if not op.key.startswith("ProfilerStep")]
        (self.folder / "ops.txt").write_text(prof.key_averages().table(sort_by=own, row_limit=-1) + "\n")
        total = sum(getattr(op, own) for op in ops) or 1
        top = sorted(ops, key=lambda op: getattr(op, own), reverse=True)[:SHOWN]
        last = max(self.first, self.epoch.step)
        report.table(f"profile: epoch {self.epoch.number}, steps {self.first}-{last}, operators by their own "
                     f"{'device' if device else 'CPU'} time (all of them: {self.folder / 'ops.txt'})",
                     ["operator", "own ms", "%", "calls"],
                     [[op.key, f"{getattr(op, own) / 1e3:.2f}", f"{100 * getattr(op, own) / total:.1f}",
                       str(op.count)] for op in top], right=(1, 2, 3))
        report.say(f"profile trace: {trace} (chrome://tracing, ui.perfetto.dev, or TensorBoard's profiler plugin: "
                   f"tensorboard --logdir {self.folder})")
