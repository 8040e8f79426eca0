"""Types for the top-level keys, `trainer.*` and `logger.*`, so a wrong value fails in Hydra before any work, and the
keys hsci reads there (hsci/parts/keys.py refuses any other); and the values that compose but cannot work, refused
before a run directory is made (no torch needed to tell)."""

import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
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
    limit_batches: Any = MISSING  # a number of batches, or a fraction of them (checked below)
    log_every: int = MISSING
    channels_last: Any = MISSING  # auto, true or false (checked by hsci/parts/build.py)
    compile: Any = MISSING  # false, true or max-autotune
    deterministic: bool = MISSING
    monitor: str = "auto"  # or a recorded validation value (checked below); runs saved before it existed: auto
    # Runs saved before these existed ran one process: their defaults.
    devices: Any = 1  # processes on this machine, one per GPU (or CPU processes): N or auto
    sync_batchnorm: bool = False
    dist_timeout_s: float = 300
    # The loop's controls (hsci/loop/pace.py); runs saved before they existed ran without them.
    accumulate_grad_batches: int = 1
    val_every_epochs: int = 1
    val_check_interval: Any = 1.0  # a fraction of an epoch (float) or a number of optimizer steps (int)
    max_time: Any = None  # DD:HH:MM:SS or seconds
    min_epochs: Optional[int] = None
    limit_train_batches: Any = None  # null: limit_batches
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    overfit_batches: int = 0
    # Runs saved before these existed kept best.pt and last.pt, showed no layer table and ran no debugging aid.
    save_top_k: int = 1  # the K best epochs' checkpoints (hsci/record/kept.py); 1: best.pt alone
    save_every_n_epochs: Optional[int] = None  # checkpoints/epoch_NNN.pt every N epochs
    summary_depth: Optional[int] = 1  # the model's layer table to this depth (hsci/loop/layers.py); 0 or null: none
    profile: bool = False  # torch.profiler over a few steps of the first epoch (hsci/loop/profile.py)
    detect_anomaly: bool = False  # torch's anomaly mode around the step: names the backward op that gave NaN
    fast_dev_run: Any = False  # true or N: N batches of train, validation and test, then the run folder goes


@dataclass
class TensorBoard:
    flush_secs: int = MISSING


@dataclass
class MLflow:
    tracking_uri: str = MISSING
    experiment_name: Optional[str] = MISSING
    run_name: Optional[str] = MISSING
    tags: dict[str, str] = MISSING


@dataclass
class Loggers:
    """conf/logger/*: where a run is watched from besides its own records (hsci/integrations/); one or both."""
    tensorboard: Optional[TensorBoard] = None
    mlflow: Optional[MLflow] = None


@dataclass
class Config:
    seed: int = MISSING
    name: str = MISSING
    resume: Optional[str] = None  # a run directory to continue (set by `hsci train resume=...`)
    init_from: Optional[str] = None  # a run directory whose best weights a new run starts from
    tags: list[str] = field(default_factory=list)  # labels for `hsci runs tag=...`; runs saved before them: none
    trainer: Trainer = MISSING
    logger: Optional[Loggers] = None  # none, or logger=tensorboard, logger=mlflow, logger=[tensorboard,mlflow]
    # The groups below have one schema per option, so they are typed by their own YAML.
    data: Any = MISSING
    model: Any = MISSING
    loss: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING


def register() -> None:
    """Make the schema available to `conf/config.yaml` as `hsci_schema`."""
    ConfigStore.instance().store(name="hsci_schema", node=Config)


# The validation values each task records (hsci/loop/evaluate.py's make_metrics; val_top5 past 10 classes): what
# trainer.monitor may name. A task is known before any work from its loss (hsci/parts/build.py refuses a mismatch).
MONITORS = {"multiclass": ("val_loss", "val_acc", "val_precision", "val_recall", "val_f1", "val_top5"),
            "binary": ("val_loss", "val_acc", "val_precision", "val_recall", "val_f1"),
            "regression": ("val_loss", "val_mse", "val_mae", "val_r2")}
LOSS_TASK = {"torch.nn.CrossEntropyLoss": "multiclass", "torch.nn.BCEWithLogitsLoss": "binary",
             "torch.nn.MSELoss": "regression"}

LIMITS = ("limit_batches", "limit_train_batches", "limit_val_batches", "limit_test_batches")
LIMIT = "a whole number of batches, at least 1, or a fraction of them above 0 and at most 1.0, or null"


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _limit(value) -> bool:
    """A number of batches (or steps), at least 1, or a fraction of them in (0, 1]."""
    return _whole(value) and value >= 1 or isinstance(value, float) and 0 < value <= 1


def max_time_s(value: int | float | str) -> float:
    """trainer.max_time in seconds: a number of seconds, or DD:HH:MM:SS as Lightning's `max_time` takes it; -1 for
    anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    found = re.fullmatch(r"(\d+):(\d{1,2}):(\d{1,2}):(\d{1,2})", str(value).strip())
    if not found:
        return -1.0
    days, hours, minutes, seconds = map(int, found.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


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
          ("data.drop_last", lambda v: v in ("auto", True, False), "auto, true or false"),
          ("trainer.log_every", lambda v: v >= 1, "at least 1"),
          *((f"trainer.{key}", lambda v: v is None or _limit(v), LIMIT) for key in LIMITS),
          ("trainer.early_stop_patience", lambda v: v is None or v >= 1, "at least 1, or null"),
          ("trainer.grad_clip", lambda v: v is None or v > 0, "above 0, or null"),
          ("trainer.channels_last", lambda v: v in ("auto", True, False), "auto, true or false"),
          ("trainer.compile", lambda v: v in (False, True, "max-autotune"), "false, true or max-autotune"),
          ("trainer.devices", lambda v: v == "auto" or isinstance(v, int) and v >= 1, "auto or 1 or more"),
          ("trainer.dist_timeout_s", lambda v: v > 0, "above 0"),
          ("trainer.accumulate_grad_batches", lambda v: _whole(v) and v >= 1, "a whole number, at least 1"),
          ("trainer.val_every_epochs", lambda v: _whole(v) and v >= 1, "a whole number, at least 1"),
          ("trainer.val_check_interval", _limit, "a fraction of an epoch above 0 and at most 1.0 (0.25: four times an "
           "epoch), or a whole number of optimizer steps, at least 1"),
          ("trainer.max_time", lambda v: v is None or max_time_s(v) > 0,
           "a time above 0 as DD:HH:MM:SS (00:04:00:00 for four hours) or seconds, or null"),
          ("trainer.min_epochs", lambda v: v is None or _whole(v) and v >= 1, "a whole number, at least 1, or null"),
          ("trainer.overfit_batches", lambda v: _whole(v) and v >= 0, "a whole number of batches, or 0 (off)"),
          ("trainer.save_top_k", lambda v: v >= 1, "at least 1 (1: best.pt alone)"),
          ("trainer.save_every_n_epochs", lambda v: v is None or v >= 1, "at least 1, or null"),
          ("trainer.summary_depth", lambda v: v is None or v >= -1, "a depth of 1 or more, -1 (every layer), 0 or "
                                                                    "null (no table)"),
          ("trainer.fast_dev_run", lambda v: v in (False, True) or isinstance(v, int) and v >= 1,
           "true (one batch), a number of batches, or false"),
          ("logger.tensorboard.flush_secs", lambda v: v >= 1, "at least 1"),
          ("trainer.monitor", lambda v: v == "auto" or any(v in names for names in MONITORS.values()),
           "auto or a validation value: " + ", ".join(dict.fromkeys(sum(MONITORS.values(), ())))),
          ("model.pretrained", lambda v: isinstance(v, bool), "true or false (a weights file goes in model.weights=<file>)"),
          ("model.weights", lambda v: v is None or isinstance(v, str), "a file, or null"),
          ("model.freeze", lambda v: v in (None, "backbone"), "backbone (train the head only), or null"),
          ("model.unfreeze_at_epoch", lambda v: v is None or isinstance(v, int) and v >= 2,
           "an epoch of 2 or more (from it the whole model trains), or null"),
          ("model.backbone_lr_scale", lambda v: v > 0, "above 0"),
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
    _check_monitor(cfg, skipped)
    _check_devices(cfg, skipped)
    _check_tuning(cfg, skipped)
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


SYNC_BATCHNORM_CUDA = ("trainer.sync_batchnorm=true needs CUDA devices (torch synchronises batch norm only there): "
                       "set it to false on the CPU")


def _check_devices(cfg: DictConfig, skipped) -> None:
    """Several processes split the global batch evenly; synchronised batch norm needs CUDA. Started as a rank
    (torchrun), the processes are torchrun's."""
    trainer = cfg.trainer
    if any(skipped(key) for key in ("trainer.devices", "data.batch_size", "trainer.device", "trainer.sync_batchnorm")):
        return
    ranks = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    n = int(os.environ["WORLD_SIZE"]) if ranks else trainer.devices
    named = f"the {n} processes torchrun started" if ranks else f"trainer.devices={n}"
    batch = OmegaConf.select(cfg, "data.batch_size", default=None)
    if isinstance(n, int) and n > 1 and isinstance(batch, int) and batch % n:
        raise UserError(f"data.batch_size={batch} does not split evenly over {named}: it is the global batch; use a "
                        f"multiple of {n}, e.g. data.batch_size={batch // n * n or n}")
    if trainer.sync_batchnorm and trainer.device == "cpu" and n != 1:
        raise UserError(SYNC_BATCHNORM_CUDA)


def _check_tuning(cfg: DictConfig, skipped) -> None:
    """Fine-tuning settings that cannot go together, and a weights file that is not there."""
    model = cfg.model
    if any(skipped(key) for key in ("model", "init_from")):
        return
    if model.get("unfreeze_at_epoch") is not None and model.get("freeze") != "backbone":
        raise UserError(f"model.unfreeze_at_epoch={model.unfreeze_at_epoch} unfreezes a frozen backbone: add "
                        "model.freeze=backbone, or remove it")
    if model.get("weights") and cfg.get("init_from"):
        raise UserError("model.weights and init_from both give the starting weights: keep one")
    if model.get("weights") and not Path(model.weights).expanduser().is_file():
        raise UserError(f"model.weights={model.weights} is not a file: give the path of a weights file (a state dict "
                        "or an hsci checkpoint)")


def _check_monitor(cfg: DictConfig, skipped) -> None:
    """trainer.monitor must name a value the task records (a loss hsci does not know leaves it to the run)."""
    task = LOSS_TASK.get(OmegaConf.select(cfg, "loss._target_", default=None))
    if skipped("trainer.monitor") or skipped("loss") or task is None or cfg.trainer.monitor == "auto":
        return
    if any(skipped(group) for group in ("data", "experiment")):  # a sweep's jobs may have other tasks: each checks
        return
    # Without data.num_classes (imagefolder: its folders tell), top-5 is checked when the data is read.
    few_classes = OmegaConf.select(cfg, "data.num_classes", default=11) <= 10
    recorded = [k for k in MONITORS[task] if not (k == "val_top5" and few_classes)]
    if cfg.trainer.monitor not in recorded:
        raise UserError(f"trainer.monitor={cfg.trainer.monitor} is not recorded for this {task} task: use auto or "
                        f"one of {', '.join(recorded)}")


# The model keys hsci reads itself for fine-tuning (conf/model/base/tuning.yaml); the builder never sees them.
TUNING = ("weights", "freeze", "unfreeze_at_epoch", "backbone_lr_scale")
