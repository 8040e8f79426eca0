"""The training step and what it carries: the epoch under way (`Epoch`), the optimizer with its schedule and grad
scaler (hsci/parts/build.py's `Optim`), and the readings taken every `trainer.log_every` steps (`Readings`). A step
is an optimizer step: with trainer.accumulate_grad_batches it takes several batches.

`hsci train` (hsci/loop/train.py) runs its epochs through `train_epoch`; `hsci bench` and benchmarks/ time the
very same function. The loss stays on the device and is read at readings only.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn
from torch.utils.data import default_collate

from hsci.parts.build import Optim, Parts
from hsci.parts.world import SINGLE, World
from hsci.record import rundir
from hsci.record.resume import Position

if TYPE_CHECKING:
    from hsci.loop.pace import Pace


@dataclass
class Epoch:
    """An epoch under way: its `number`, its `stop` optimizer steps, the `step`s done, their loss sum (on the device)
    and the samples `seen`; `seen_first`, the samples it had seen when this session took it up. Each step takes
    `accumulate` of the epoch's `batches` (by default, as many as its steps need), its last what is left."""

    number: int
    stop: int
    step: int
    loss_sum: torch.Tensor
    seen: int
    seen_first: int
    batches: int | None = None
    accumulate: int = 1

    @classmethod
    def start(cls, number: int, stop: int, device: torch.device) -> Epoch:
        """Epoch `number` from its first step, a batch a step."""
        return cls(number, stop, 0, torch.zeros((), device=device), 0, 0)

    @classmethod
    def after(cls, position: Position, pace: Pace, device: torch.device) -> Epoch:
        """The epoch after the last complete one at `position`, from the step it stopped after (a resumed run) or
        from its start, at `pace`."""
        return cls(position.epoch + 1, pace.steps, position.step, torch.tensor(position.loss_sum, device=device),
                   position.seen, position.seen, pace.batches, pace.accumulate)

    def group(self, step: int) -> int:
        """How many batches step `step` (from 0) takes."""
        batches = self.stop * self.accumulate if self.batches is None else self.batches
        return max(0, min(self.accumulate, batches - step * self.accumulate))


class Diverged(Exception):
    """The loss became NaN or infinite."""


DIVERGED_HINT = ("lower optimizer.lr, set trainer.grad_clip (e.g. 1.0), or use trainer.precision=bf16 instead of "
                 "fp16; the last good checkpoint stays in checkpoints/")


def train_epoch(parts: Parts, *, optim: Optim, batches: Iterable, epoch: Epoch, readings: Readings,
                until: int | None = None, deadline: float | None = None) -> int | str | None:
    """Carry `epoch` on from its step reached to step `until` (its last, by default), updating it as it goes; stops
    after the current step when a signal asks any rank to, and returns that signal, or TIME_UP once `deadline`
    (time.monotonic()'s) has passed on any rank. The loss stays on the device: it is read at readings only (then
    over all ranks).

    A step of several batches (`epoch.group`) divides each batch's loss by their number, so that its summed
    gradient is the one step on all of them at once would take; under DDP the ranks average it once, in the
    step's last backward pass (`no_sync` before it). Clipping, the grad scaler and the readings act once a step."""
    parts.model.train()
    first, losses = epoch.step, torch.empty(epoch.stop, device=parts.device)  # kept to name the step that went NaN
    batches = iter(batches)  # the caller's iterator, if it passes one: the next call takes the batches that follow
    for step in range(epoch.step, epoch.stop if until is None else until):
        group, loss = epoch.group(step), None
        for i, (x, y) in zip(range(group), batches):
            x, y = parts.to_input(x.to(parts.device, non_blocking=True)), y.to(parts.device, non_blocking=True)
            with parts.model.no_sync() if i + 1 < group and hasattr(parts.model, "no_sync") else nullcontext():
                with parts.amp():
                    part = parts.loss_fn(parts.model(x), y)
                optim.scaler.scale(part / group if group > 1 else part).backward()
            loss = part.detach() if loss is None else loss + part.detach()
            epoch.seen += len(y)
        if loss is None:  # the batches ran out
            break
        loss = loss / group if group > 1 else loss
        reading = readings.due(step + 1)
        grad_norm = clip_or_measure(parts.model, optim) if optim.grad_clip or reading else None
        lr = optim.opt.param_groups[0]["lr"]
        optim.scaler.step(optim.opt)
        optim.scaler.update()
        optim.opt.zero_grad(set_to_none=True)
        optim.sched.step()
        epoch.loss_sum += loss.float()
        losses[step] = loss
        epoch.step = step + 1
        readings.advance()
        stop = parts.world.stop(late=deadline is not None and time.monotonic() >= deadline)
        if reading or stop:
            loss_sum = (readings.take(lr, grad_norm, optim.sched.last_epoch) if reading
                        else parts.world.mean(epoch.loss_sum).item())
            if not math.isfinite(loss_sum):  # on any rank: every rank reads the same sum
                bad = (~torch.isfinite(losses[first:epoch.step])).nonzero().flatten().tolist()
                where = (f"became {losses[first + bad[0]].item()} at epoch {epoch.number}, step {first + bad[0] + 1}"
                         if bad else f"became {loss_sum} on another rank by epoch {epoch.number}, step {epoch.step}")
                raise Diverged(f"the loss {where}: {DIVERGED_HINT}")
        if stop:
            return stop
    return None


def clip_or_measure(model: nn.Module, optim: Optim) -> torch.Tensor:
    """The global gradient norm, unscaled (fp16), on the device; clipped to `optim.grad_clip` when that is set."""
    optim.scaler.unscale_(optim.opt)  # what scaler.step would do anyway: the step is unchanged
    if optim.grad_clip:
        return nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    return nn.utils.get_total_norm([q.grad for q in model.parameters() if q.grad is not None])


class Readings:
    """The numbers of `epoch`'s steps, read off the device every `every` steps and at the epoch's last: the one
    place they are taken. Each reading is a line in steps.jsonl (when `path` is given), a line on `progress`
    (hsci/report.py's epoch_progress: the bar's text on a terminal, a printed line otherwise, and train.log) and
    what the chosen loggers get (`log`, hsci/integrations/loggers.py's Loggers)."""

    def __init__(self, every: int, epoch: Epoch, path: Path | None = None, progress=None, world: World = SINGLE,
                 log=None):
        self.every, self.epoch, self.path, self.progress, self.world = every, epoch, path, progress, world
        self.log = log
        # Where the last reading was taken (here, for the first one): loss sum, steps, samples, time.
        self.mark, self.step, self.seen, self.time = epoch.loss_sum.clone(), epoch.step, epoch.seen, time.perf_counter()

    def due(self, done: int) -> bool:
        """Whether the step that completes `done` steps of the epoch is read."""
        return done % self.every == 0 or done == self.epoch.stop

    def leave_out(self, seconds: float) -> None:
        """Leave `seconds` spent apart from training (a validation within the epoch) out of the next speed read."""
        self.time += seconds

    def advance(self) -> None:
        if self.progress:
            self.progress.advance(self.epoch.step)

    def take(self, lr: float, grad_norm: torch.Tensor | None, run_step: int) -> float:
        """Read the epoch's loss sum and the step's grad norm off the device at once (one sync; with several ranks,
        their mean), record the mean loss over the steps since the last reading, and return the loss sum."""
        epoch = self.epoch
        values = [epoch.loss_sum, self.mark] + ([grad_norm.float()] if grad_norm is not None else [])
        loss_sum, mark, *norm = self.world.mean(torch.stack(values)).tolist()  # the norm is the same on every rank
        now = time.perf_counter()
        record = {"step": run_step, "epoch": epoch.number, "train_loss": (loss_sum - mark) / (epoch.step - self.step),
                  "lr": lr, "img_per_s": (epoch.seen - self.seen) * self.world.size / (now - self.time),
                  "grad_norm": norm[0] if norm and math.isfinite(norm[0]) else None}  # inf: a step fp16 skipped
        self.mark, self.step, self.seen, self.time = epoch.loss_sum.clone(), epoch.step, epoch.seen, now
        if not math.isfinite(loss_sum):  # the run stops as diverged; summary.json names the step
            return loss_sum
        if self.path:
            rundir.append_jsonl(self.path, record)
        if self.progress:
            self.progress.show(epoch.step, record)
        if self.log:
            self.log.reading(record)
        return loss_sum


def warm_up(parts: Parts, batch_size: int) -> float:
    """Compile the training step on a first batch and return the seconds it took, leaving weights,
    buffers, gradients and random generators as they were, so compiling is kept out of the timings."""
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[parts.device] if parts.device.type == "cuda" else []):
        x, y = default_collate([parts.data.train[i] for i in range(min(batch_size, len(parts.data.train)))])
        x, y = x.to(parts.device), y.to(parts.device)
        with parts.amp():
            loss = parts.loss_fn(parts.model(parts.to_input(x)), y)
        loss.backward()
        loss.item()  # waits for the device
    seconds = time.perf_counter() - start
    parts.model.load_state_dict(before)
    parts.model.zero_grad(set_to_none=True)
    return seconds


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since the epoch began: the device's allocations on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1e9 if sys.platform == "darwin" else 1e6)
