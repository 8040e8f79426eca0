"""Learning-rate schedules. Each `conf/scheduler/<name>.yaml` calls one function here.

All are stepped once per optimizer step and scale the optimizer's own `lr`. `warmup_epochs` ramps the
rate linearly from near zero; the run's length (`epochs`, `steps_per_epoch`) is passed by hsci/parts/build.py.
"""

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


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
    """The one-cycle policy: a linear warm-up from lr / div_factor to the optimizer's rate, then cosine
    decay to lr / (div_factor * final_div_factor). The warm-up is `warmup_epochs` long, or 30% of the run
    when 0 (torch's OneCycleLR default). Momentum is left as the optimizer has it."""
    total = epochs * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch) if warmup_epochs else round(0.3 * total)
    start, end = 1 / div_factor, 1 / (div_factor * final_div_factor)
    span = max(1, total - warmup)

    def factor(i: int) -> float:
        if i < warmup:
            return start + (1 - start) * i / warmup
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / span)))

    return LambdaLR(opt, factor)


def _warmup(steps: int, after: Callable[[int], float]) -> Callable[[int], float]:
    """A LambdaLR factor: linear from 1/steps to 1 over the first `steps` steps, then `after`."""
    return lambda i: (i + 1) / steps if i < steps else after(i)
