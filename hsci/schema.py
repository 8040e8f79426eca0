"""Types for the top-level keys and `trainer.*`, so a wrong value fails in Hydra before any work."""

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


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
