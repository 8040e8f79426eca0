"""From a composed config to the parts of a run: device, data, loss, model, the input step and the loaders,
with the speed settings (precision, channels_last, compile, loader) resolved for the device at hand.
`hsci train`, `hsci eval` and `hsci bench` all build through here."""

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from hsci import UserError, config_dir, one_line, report, schema
from hsci.data import Data
from hsci.distributed import SINGLE, World
from hsci.loaders import input_fn, make_loader, pick_loader
from hsci.schema import check_values

# The loss each task trains with, as its config option name: a mismatch is a user error.
TASK_LOSS = {"multiclass": "cross_entropy", "binary": "bce", "regression": "mse"}
LOSS_TASK = {nn.CrossEntropyLoss: "multiclass", nn.BCEWithLogitsLoss: "binary", nn.MSELoss: "regression"}


@dataclass
class Parts:
    """A run's parts, built from its config."""

    device: torch.device
    data: Data
    loss_fn: nn.Module
    model: nn.Module
    to_input: Callable[[torch.Tensor], torch.Tensor]  # a loader's batch, on the device, to model input
    amp: Callable  # a fresh autocast context for the chosen precision
    precision: str  # fp32, bf16 or fp16
    channels_last: bool
    loader: str  # gpu or torch
    train_loader: object
    val_loader: object
    test_loader: object
    world: World = SINGLE  # this process's rank among the run's processes


def build(cfg: DictConfig, data: Data | None = None, world: World = SINGLE) -> Parts:
    """Build the parts of a run from `cfg` (with `data` in place of the configured dataset, if given) for this
    process's rank: every rank the same model (same seed), its own device and share of the data."""
    check_values(cfg)
    t = cfg.trainer
    device = pick_device(t.device)
    if device.type == "cuda" and world.backend:
        device = torch.device("cuda", world.local_rank)
    # Set for every run, never only switched on: a process that runs several jobs (a joblib sweep) starts each anew.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = not t.deterministic  # fastest kernels, picked per shape
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(t.deterministic, warn_only=True)

    loss_fn = instantiate(cfg.loss)
    downloads = world.size > 1 and bool(cfg.data.get("download"))  # one download, not one per process into a folder
    with world.rank_0_first("data") if downloads else nullcontext():
        data = data or instantiate(cfg.data)
    if world.size > 1 and len(data.train) <= data.batch_size:
        raise UserError(f"the training split ({len(data.train)} samples) is no larger than data.batch_size="
                        f"{data.batch_size}: {world.size} processes need full batches to take equal shares of; "
                        "use a smaller data.batch_size, or trainer.devices=1")
    check_loss(loss_fn, data.task)
    model = instantiate(cfg.model, input_shape=data.input_shape, num_outputs=data.num_outputs).to(device)
    if t.sync_batchnorm and world.size > 1:  # batch statistics over the global batch, not each rank's share
        if device.type != "cuda":
            raise UserError(schema.SYNC_BATCHNORM_CUDA)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    channels_last = convolutional and device.type == "cuda" if t.channels_last == "auto" else bool(t.channels_last)
    channels_last = channels_last and len(data.input_shape) == 3
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if t.compile:
        torch._dynamo.reset()  # an earlier job of this process (a sweep's) leaves its compiled graphs behind
        model.compile(mode="max-autotune" if t.compile == "max-autotune" else None)
    pretrained = getattr(model, "pretrained_input", {})  # the resize and normalisation the weights expect
    if pretrained:
        report.say(f"pretrained weights: inputs resized to {pretrained['size']} px and normalised with the "
                   "weights' mean/std")
    to_input = input_fn(**{"mean": data.mean, "std": data.std, **pretrained}, device=device,
                        channels_last=channels_last)
    precision = t.precision.value
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)
    kind = pick_loader(data.loader, data, device)
    loader = partial(make_loader, batch_size=data.batch_size, num_workers=data.num_workers, device=device,
                     seed=cfg.seed, kind=kind, rank=world.rank, ranks=world.size)
    return Parts(device, data, loss_fn, model, to_input, amp, precision, channels_last, kind,
                 loader(data.train, train=True), loader(data.val, train=False, limit=t.limit_batches),
                 loader(data.test, train=False, limit=t.limit_batches), world)



def pick_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a named device must exist."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"trainer.device={name} is not a device ({e}): use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but no CUDA device is visible: use trainer.device=auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"trainer.device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                        f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}, or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"trainer.device={name} but MPS is not available: use trainer.device=auto or cpu")
    return device


def check_loss(loss_fn: nn.Module, task: str) -> None:
    """The loss must fit the dataset's task (a loss hsci does not know is trusted)."""
    fits = LOSS_TASK.get(type(loss_fn), task)
    if fits != task:
        raise UserError(f"loss {type(loss_fn).__name__} is for {fits} tasks, but this dataset is a {task} task: "
                        f"use loss={TASK_LOSS[task]}")


def compose(overrides: list[str]) -> DictConfig:
    """The config `hsci train` would compose from `overrides`, for the verbs that make no run directory."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    schema.register()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(one_line(str(e))) from e
    schema.check_keys(cfg, cfg.hydra)
    HydraConfig.instance().set_config(cfg)  # `name` is made of the chosen options
    with open_dict(cfg):
        cfg.name = cfg.name
        del cfg["hydra"]
    return cfg
