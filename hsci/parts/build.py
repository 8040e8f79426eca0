"""From a composed config to the parts of a run: device, data, loss, model, the input step and the loaders, with
the speed settings (precision, channels_last, compile, loader) resolved for the device at hand (`build`); and
what a training step changes besides the weights: optimizer, schedule, grad scaler (`optimizing`). `hsci train`,
`hsci eval` and `hsci bench` all build through here."""

import copy
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import Subset

from hsci import UserError, config_dir, models, one_line, report
from hsci.parts import finetune, keys, schema
from hsci.parts.datasets import Data, Tensors
from hsci.parts.loaders import eval_loader, input_fn, pick_loader, train_loader
from hsci.parts.schema import check_values
from hsci.parts.world import SINGLE, World, on_cuda

# The loss each task trains with, as its config option name: a mismatch is a user error.
TASK_LOSS = {"multiclass": "cross_entropy", "binary": "bce", "regression": "mse"}
LOSS_TASK = {nn.CrossEntropyLoss: "multiclass", nn.BCEWithLogitsLoss: "binary", nn.MSELoss: "regression"}


@dataclass(frozen=True)
class Speed:
    """The speed settings as resolved for the device at hand (summary.json records them)."""

    precision: str  # fp32, bf16 or fp16
    channels_last: bool
    loader: str  # gpu or torch


@dataclass(frozen=True)
class Loaders:
    """A split's batches each: the training loader (hsci's order, augmented) and the evaluation ones."""

    train: object
    val: object
    test: object


@dataclass
class Parts:
    """A run's parts, built from its config."""

    device: torch.device
    data: Data
    loss_fn: nn.Module
    model: nn.Module
    to_input: Callable[[torch.Tensor], torch.Tensor]  # a loader's batch, on the device, to model input
    speed: Speed
    loaders: Loaders
    world: World = SINGLE  # this process's rank among the run's processes

    def amp(self) -> torch.autocast:
        """A fresh autocast context for the chosen precision."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.speed.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def build(cfg: DictConfig, data: Data | None = None, world: World = SINGLE, restoring: bool = False) -> Parts:
    """Build the parts of a run from `cfg` (with `data` in place of the configured dataset, if given) for this
    process's rank: every rank the same model (same seed), its own device and share of the data. `restoring`: the
    model's weights will come from a checkpoint (eval, resume), so no pretrained weights are fetched."""
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
    if t.deterministic or torch.are_deterministic_algorithms_enabled():  # the call imports torch's compiler (seconds)
        torch.use_deterministic_algorithms(t.deterministic, warn_only=True)

    loss_fn = instantiate(cfg.loss)
    downloads = world.size > 1 and bool(cfg.data.get("download"))  # one download, not one per process into a folder
    with world.rank_0_first("data") if downloads else nullcontext():
        data = data or instantiate(cfg.data)
    if world.size > 1 and len(data.train) <= data.loading.batch_size:
        raise UserError(f"the training split ({len(data.train)} samples) is no larger than data.batch_size="
                        f"{data.loading.batch_size}: {world.size} processes need full batches to take equal shares of; "
                        "use a smaller data.batch_size, or trainer.devices=1")
    check_loss(loss_fn, data.task)
    if t.overfit_batches:
        data = overfitting(data, t.overfit_batches)
        report.say(f"overfit_batches={t.overfit_batches}: training on the same {len(data.train)} training samples every "
                   "epoch, unshuffled and unaugmented, and validating on them")
    model = make_model(cfg, data.input_shape, data.num_outputs, restoring).to(device)
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
    to_input = input_fn(**{"mean": data.scaling.mean, "std": data.scaling.std, **pretrained}, device=device,
                        channels_last=channels_last)
    precision = t.precision.value
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    kind = pick_loader(data.loading.loader, data, device)
    evaluated = partial(eval_loader, loading=data.loading, device=device, seed=cfg.seed, kind=kind, world=world)
    loaders = Loaders(train_loader(data.train, data.loading, device, cfg.seed, kind, world,
                                   shuffle=not t.overfit_batches),
                      evaluated(data.val, limit=stage_limit(t, "val")),
                      evaluated(data.test, limit=stage_limit(t, "test")))
    return Parts(device, data, loss_fn, model, to_input, Speed(precision, channels_last, kind), loaders, world)


def stage_limit(trainer: DictConfig, stage: str) -> int | float | None:
    """trainer.limit_<stage>_batches, or trainer.limit_batches where that is null (see loaders.limited)."""
    own = trainer.get(f"limit_{stage}_batches")
    return trainer.limit_batches if own is None else own


def overfitting(data: Data, batches: int) -> Data:
    """trainer.overfit_batches: the first `batches` training batches as they are, without augmentation, for
    training and for validation alike (the training loader does not shuffle them). A dataset of a user's own keeps
    its own augmentation, if it has one that hsci does not know."""
    n = min(len(data.train), batches * data.loading.batch_size)
    train = copy.copy(data.train)
    if isinstance(train, Tensors):
        train.x, train.y = train.x[:n], train.y[:n]
    elif isinstance(getattr(train, "samples", None), list):  # image files
        train.samples = train.samples[:n]
    else:
        train = Subset(data.train, range(n))
    if hasattr(train, "augment"):
        train.augment = None
    return replace(data, train=train, val=train)


def make_model(cfg: DictConfig, input_shape: tuple[int, ...], num_outputs: int, restoring: bool = False) -> nn.Module:
    """The configured model for a dataset's input shape and outputs, on the CPU. `restoring`: its weights will come
    from a checkpoint, so pretrained weights are not fetched (the model still carries the input they expect)."""
    settings = OmegaConf.masked_copy(cfg.model, [key for key in cfg.model if key not in schema.TUNING])
    with models.restoring() if restoring or cfg.model.get("weights") else nullcontext():  # weights: from a file
        return instantiate(settings, input_shape=input_shape, num_outputs=num_outputs)


@dataclass
class Optim:
    """What a step changes besides the weights: the optimizer, its schedule (stepped every step), the fp16 grad
    scaler, and the norm gradients are clipped to (None: not clipped)."""

    opt: Optimizer
    sched: LRScheduler
    scaler: torch.amp.GradScaler
    grad_clip: float | None = None


def optimizing(cfg: DictConfig, parts: Parts, *, epochs: int, steps_per_epoch: int) -> Optim:
    """The configured optimizer over the model's parameters (the backbone's at its own rate when
    model.backbone_lr_scale is set), its schedule over the run's length, the grad scaler."""
    scale = cfg.model.get("backbone_lr_scale", 1.0)  # the backbone's lr apart from the head's (fine-tuning)
    params = finetune.param_groups(parts.model, cfg.optimizer.get("lr"), scale)
    opt = instantiate(cfg.optimizer, _partial_=True)(params)  # groups of tensors, kept out of the config
    sched = instantiate(cfg.scheduler, opt=opt, epochs=epochs, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(parts.device.type, enabled=parts.speed.precision == "fp16")
    return Optim(opt, sched, scaler, cfg.trainer.grad_clip)



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


def count_devices(choice: int | str, device: str) -> int:
    """How many processes `trainer.devices` asks for on this machine: `auto` is every visible GPU (one on the
    CPU); N GPUs must be visible."""
    cuda = on_cuda(device)
    count = torch.cuda.device_count() if cuda else 1
    n = count if choice == "auto" else int(choice)
    if n > 1 and device.startswith("cuda:"):
        raise UserError(f"trainer.device={device} names one GPU but trainer.devices={choice}: use trainer.device=cuda "
                        "(each rank takes cuda:<local rank>), or trainer.devices=1")
    if n > 1 and device == "mps":
        raise UserError(f"trainer.devices={choice} on mps: one MPS device trains one process; use trainer.devices=1")
    if n > 1 and cuda and n > count:
        raise UserError(f"trainer.devices={choice} but {count} CUDA device(s) are visible: use trainer.devices="
                        f"{count} or auto, or trainer.device=cpu for CPU processes")
    return n


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
    keys.check_keys(cfg, cfg.hydra)
    HydraConfig.instance().set_config(cfg)  # `name` is made of the chosen options
    with open_dict(cfg):
        cfg.name = cfg.name
        del cfg["hydra"]
    return cfg
