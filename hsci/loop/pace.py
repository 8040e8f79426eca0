"""A run's rhythm (`Pace`): how many training batches an epoch takes and how many of them make an optimizer step
(trainer.limit_train_batches, accumulate_grad_batches), after which steps it validates (trainer.val_every_epochs,
val_check_interval), by when it must end (trainer.max_time); and when early stopping may end it (`stopping_early`).

hsci/loop/train.py asks it where each epoch's training pauses: at each validation point, and at the epoch's end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from omegaconf import DictConfig

from hsci.parts.build import stage_limit
from hsci.parts.loaders import limited
from hsci.parts.schema import max_time_s
from hsci.record.resume import Position


@dataclass(frozen=True)
class Pace:
    """An epoch's `batches` and the `accumulate` of them each optimizer step takes (its last takes what is left);
    validation every `interval` optimizer steps of an epoch that validates (None: at its end only), in every
    `every_epochs`-th of the run's `epochs` and in its last; `max_time_s`, the seconds it may train (None: any)."""

    epochs: int
    batches: int
    accumulate: int
    every_epochs: int
    interval: int | None
    max_time_s: float | None

    @classmethod
    def of(cls, trainer: DictConfig, train_batches: int) -> Pace:
        """The pace `trainer` sets for a training loader of `train_batches` batches."""
        batches = limited(stage_limit(trainer, "train"), train_batches)
        accumulate = trainer.accumulate_grad_batches
        steps = -(-batches // accumulate)
        check = trainer.val_check_interval  # a fraction of the epoch's steps (as Lightning takes it), or a number
        interval = max(1, int(steps * check)) if isinstance(check, float) else check
        limit = max_time_s(trainer.max_time) if trainer.max_time is not None else None
        return cls(trainer.epochs, batches, accumulate, trainer.val_every_epochs, interval if interval < steps else None,
                   limit)

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch: what the learning-rate schedule and the readings count."""
        return -(-self.batches // self.accumulate)

    def validates(self, epoch: int) -> bool:
        """Whether epoch `epoch` (from 1) validates: every `every_epochs`-th, and the run's last."""
        return epoch % self.every_epochs == 0 or epoch == self.epochs

    def checks(self, epoch: int, reached: int, due: bool) -> list[int]:
        """Where epoch `epoch`'s training pauses from step `reached` on: after each validation point to come (and
        at `reached` itself when a validation is `due` there: a stop came before it ran), and at the epoch's end."""
        points = range(self.interval, self.steps, self.interval) if self.interval and self.validates(epoch) else ()
        return [p for p in points if p > reached or p == reached and due] + [self.steps]

    def deadline(self) -> float | None:
        """When training must stop, on time.monotonic()'s clock, counted from now: a resumed run has the whole of
        trainer.max_time again."""
        return None if self.max_time_s is None else time.monotonic() + self.max_time_s


def stopping_early(position: Position, trainer: DictConfig) -> bool:
    """Whether early stopping ends the run at `position`: trainer.early_stop_patience validations in a row without
    a better monitored value, and at least trainer.min_epochs epochs complete."""
    patience = trainer.early_stop_patience
    return bool(patience) and position.stale >= patience and position.epoch >= (trainer.min_epochs or 0)
