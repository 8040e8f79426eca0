"""Learning-rate schedules. Each `conf/scheduler/<name>.yaml` calls one function here.

All are stepped once per optimizer step and scale the optimizer's own `lr`. `warmup_epochs` ramps the
rate linearly from near zero; the run's length (`epochs`, `steps_per_epoch`) is passed by hsci/train.py.
"""

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR


def none(opt: Optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float) -> LRScheduler:
    """A constant rate after the warm-up."""
    return LambdaLR(opt, _warmup(round(warmup_epochs * steps_per_epoch), lambda i: 1.0))


def cosine(opt: Optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float,
           final_fraction: float) -> LRScheduler:
    """Cosine decay after the warm-up, down to `final_fraction` of the rate at the last step."""
    warmup = round(warmup_epochs * steps_per_epoch)
    span = max(1, epochs * steps_per_epoch - warmup)

    def decay(i: int) -> float:
        t = min(1.0, (i - warmup) / span)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    return LambdaLR(opt, _warmup(warmup, decay))


def step(opt: Optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float, step_epochs: int,
         gamma: float) -> LRScheduler:
    """Multiply the rate by `gamma` every `step_epochs` epochs."""
    every = step_epochs * steps_per_epoch
    return LambdaLR(opt, _warmup(round(warmup_epochs * steps_per_epoch), lambda i: gamma ** (i // every)))


def onecycle(opt: Optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float, div_factor: float,
             final_div_factor: float) -> LRScheduler:
    """torch's one-cycle policy, peaking at the optimizer's rate.

    Its rising phase is the warm-up: `warmup_epochs` long, or torch's 30% of the run when 0. Momentum
    is left as the optimizer has it.
    """
    pct = min(0.99, warmup_epochs / epochs) if warmup_epochs else 0.3
    return OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=epochs * steps_per_epoch,
                      pct_start=pct, div_factor=div_factor, final_div_factor=final_div_factor,
                      cycle_momentum=False)


def _warmup(steps: int, after: Callable[[int], float]) -> Callable[[int], float]:
    """A LambdaLR factor: linear from 1/steps to 1 over the first `steps` steps, then `after`."""
    return lambda i: (i + 1) / steps if i < steps else after(i)
