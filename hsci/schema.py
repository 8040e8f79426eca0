"""Types for the top-level keys and `trainer.*`, so a wrong value fails in Hydra before any work; and the
values that compose but cannot work, refused before a run directory is made (no torch needed to tell)."""

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from hsci import UserError


class Precision(Enum):
    auto = "auto"  # bf16 on CUDA devices that support it, else fp32
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16
    fp16 = "fp16"  # autocast to float16 with a grad scaler


@dataclass
class Trainer:
    epochs: int = MISSING
    device: str = MISSING
    precision: Precision = MISSING
    grad_clip: Optional[float] = MISSING
    early_stop_patience: Optional[int] = MISSING
    limit_batches: Optional[int] = MISSING
    log_every: int = MISSING
    channels_last: Any = MISSING  # auto, true or false (checked by hsci/build.py)
    compile: Any = MISSING  # false, true or max-autotune
    deterministic: bool = MISSING


@dataclass
class Config:
    seed: int = MISSING
    name: str = MISSING
    resume: Optional[str] = None  # a run directory to continue (set by `hsci train resume=...`)
    trainer: Trainer = MISSING
    # The groups below have one schema per option, so they are typed by their own YAML.
    data: Any = MISSING
    model: Any = MISSING
    loss: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING


def register() -> None:
    """Make the schema available to `conf/config.yaml` as `hsci_schema`."""
    ConfigStore.instance().store(name="hsci_schema", node=Config)


# Values that compose but cannot train: (key, test, what the value must be).
CHECKS = [("seed", lambda v: 0 <= v < 2**32, "between 0 and 2**32 - 1 (4294967295)"),
          ("trainer.epochs", lambda v: v >= 1, "at least 1"),
          ("trainer.device", lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v),
           "a device hsci trains on: auto, cpu, cuda, cuda:N or mps"),
          ("data.batch_size", lambda v: v >= 1, "at least 1"), ("optimizer.lr", lambda v: v > 0, "above 0"),
          ("data.num_workers", lambda v: v == "auto" or isinstance(v, int) and v >= 0, "auto or 0 or more"),
          ("data.val_fraction", lambda v: 0 < v < 1, "between 0 and 1"),
          ("data.test_fraction", lambda v: 0 < v < 1, "between 0 and 1"),
          ("data.loader", lambda v: v in ("auto", "torch", "gpu"), "auto, torch or gpu"),
          ("trainer.log_every", lambda v: v >= 1, "at least 1"),
          ("trainer.limit_batches", lambda v: v is None or v >= 1, "at least 1, or null"),
          ("trainer.early_stop_patience", lambda v: v is None or v >= 1, "at least 1, or null"),
          ("trainer.grad_clip", lambda v: v is None or v > 0, "above 0, or null"),
          ("trainer.channels_last", lambda v: v in ("auto", True, False), "auto, true or false"),
          ("trainer.compile", lambda v: v in (False, True, "max-autotune"), "false, true or max-autotune"),
          ("data.random_crop_padding", lambda v: v >= 0, "0 or more"),
          ("data.image_size", lambda v: v >= 1, "at least 1"),
          ("data.channels", lambda v: v in (1, 3), "1 (grayscale) or 3 (RGB)"),
          ("data.num_classes", lambda v: v >= 1, "at least 1"),
          ("data.train_size", lambda v: v >= 2, "at least 2"),
          ("data.test_size", lambda v: v >= 1, "at least 1"),
          ("optimizer.weight_decay", lambda v: v >= 0, "0 or more"),
          ("optimizer.momentum", lambda v: 0 <= v < 1, "at least 0 and below 1"),
          ("loss.label_smoothing", lambda v: 0 <= v <= 1, "between 0 and 1"),
          ("scheduler.warmup_epochs", lambda v: v >= 0, "0 or more"),
          ("scheduler.step_epochs", lambda v: v >= 1, "at least 1"),
          ("scheduler.gamma", lambda v: v > 0, "above 0"),
          ("scheduler.final_fraction", lambda v: 0 <= v <= 1, "between 0 and 1"),
          ("scheduler.div_factor", lambda v: v > 0, "above 0"),
          ("scheduler.final_div_factor", lambda v: v > 0, "above 0")]


def check_values(cfg: DictConfig, skip: tuple[str, ...] = ()) -> None:
    """Refuse values that compose but cannot train, and keys left without a value, before any work; keys in
    `skip`, and keys under them, are left to the jobs of a sweep that sets them."""
    def skipped(key: str) -> bool:
        return any(key == s or key.startswith(s + ".") for s in ("hydra", *skip))

    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not skipped(k))
    if missing:
        raise UserError(f"{', '.join(missing)} must be set: add {' '.join(k + '=...' for k in missing)} to the command")
    for key, ok, requirement in CHECKS:
        value = "absent" if skipped(key) else OmegaConf.select(cfg, key, default="absent")
        try:
            valid = value == "absent" or ok(value)
        except TypeError:  # a value of another type (a user's own config): a string where a number belongs
            valid = False
        if not valid:
            raise UserError(f"{key}={value} is invalid: it must be {requirement}")
    data = cfg.data
    if skipped("data.mean") or skipped("data.std") or skipped("data.channels") or skipped("data.image_shape"):
        return
    channels = data.get("channels") or (data.get("image_shape") or [None])[0]
    for key in ("mean", "std") if channels and "mean" in data else ():
        values = list(data[key])
        if len(values) != channels:
            raise UserError(f"data.{key}={values} has {len(values)} value(s) but the images have {channels} "
                            f"channel(s): give one per channel, e.g. data.{key}=[{', '.join(['0.5'] * channels)}]")
    if channels and "std" in data and min(data.std) <= 0:
        raise UserError(f"data.std={list(data.std)} is invalid: every value must be above 0")
