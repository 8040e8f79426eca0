"""`hsci train`: build the experiment from its config, train and validate every epoch, test the best checkpoint.

The loop is plain code: no trainer class, no callbacks. `main` is the door where the config comes in;
`train` builds the pieces and runs the epochs; `train_epoch` is the step.
"""

import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hsci import UserError, report, rundir
from hsci.evaluate import evaluate, make_metrics, monitor
from hsci.loaders import input_fn, make_loader

# The loss each task trains with, as its config option name: a mismatch is a user error.
TASK_LOSS = {"multiclass": "cross_entropy", "binary": "bce", "regression": "mse"}
LOSS_TASK = {nn.CrossEntropyLoss: "multiclass", nn.BCEWithLogitsLoss: "binary", nn.MSELoss: "regression"}


def main(cfg: DictConfig) -> None:
    """Run one training job and record its outcome in summary.json; a failed single run exits non-zero."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    summary = {"status": "running", "name": cfg.name, "run_dir": str(run_dir), "seed": cfg.seed,
               "overrides": list(hydra_cfg.overrides.task), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "versions": rundir.versions(), "git_commit": rundir.git_commit(Path(hydra_cfg.runtime.cwd))}
    start = time.time()
    try:
        summary |= train(cfg, run_dir)
        summary["status"] = "completed"
    except Exception as e:
        cause = user_error(e)
        error = str(cause) if cause else f"{type(e).__name__}: {e} (traceback in {run_dir / 'train.log'})"
        report.log.exception(error)
        summary |= {"status": "failed", "error": error}
    finally:
        summary["duration_s"] = round(time.time() - start, 3)
        rundir.write_json(run_dir / "summary.json", summary)
    if summary["status"] == "completed":
        report.final(summary)
        return
    report.error(summary["error"])
    if hydra_cfg.mode == RunMode.RUN:  # a sweep goes on to its next job; its summary shows this one
        sys.exit(1)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train and validate every epoch, keep the best checkpoint, test it; returns the results for summary.json."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{', '.join(missing)} must be set: add {' '.join(k + '=...' for k in missing)} to the command")
    t = cfg.trainer
    device = pick_device(t.device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    report.config(config, OmegaConf.to_yaml(config))

    loss_fn = instantiate(cfg.loss)
    data = instantiate(cfg.data)
    check_loss(loss_fn, data.task)
    model = instantiate(cfg.model, input_shape=data.input_shape, num_outputs=data.num_outputs).to(device)
    pretrained = getattr(model, "pretrained_input", {})  # the resize and normalisation the weights expect
    to_input = input_fn(**{"mean": data.mean, "std": data.std, **pretrained}, device=device)
    if pretrained:
        report.say(f"pretrained weights: inputs resized to {pretrained['size']} px and normalised with the "
                   "weights' mean/std")
    loader = partial(make_loader, batch_size=data.batch_size, num_workers=data.num_workers, device=device,
                     seed=cfg.seed)
    train_loader, val_loader, test_loader = (loader(data.train, train=True), loader(data.val, train=False),
                                             loader(data.test, train=False))
    steps = min(len(train_loader), t.limit_batches or len(train_loader))
    opt = instantiate(cfg.optimizer, params=model.parameters())
    sched = instantiate(cfg.scheduler, opt=opt, epochs=t.epochs, steps_per_epoch=steps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision.value)
    amp = partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    metrics = make_metrics(data.task, data.num_outputs).to(device)
    key, mode = monitor(data.task)
    report.say(f"device {device}  {t.precision.value}  {sum(p.numel() for p in model.parameters()):,} parameters  "
               f"train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}  run dir {run_dir}")

    best, best_record, stale = None, {}, 0
    for epoch in range(1, t.epochs + 1):
        start = time.perf_counter()
        with report.epoch_progress(epoch, t.epochs, steps, data.batch_size, t.log_every) as progress:
            train_loss, seen = train_epoch(model, train_loader, opt, sched, scaler, loss_fn, to_input, amp,
                                           t.grad_clip, steps, progress)
        epoch_s = time.perf_counter() - start
        val = evaluate(model, val_loader, data, loss_fn, metrics, to_input, amp, t.limit_batches)
        record = {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()},
                  "lr": opt.param_groups[0]["lr"], "epoch_s": epoch_s, "train_img_per_s": seen / epoch_s}
        rundir.append_jsonl(run_dir / "metrics.jsonl", record)
        report.epoch_row(record, first=epoch == 1)
        improved = best is None or (record[key] > best if mode == "max" else record[key] < best)
        best, best_record, stale = (record[key], record, 0) if improved else (best, best_record, stale + 1)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch, "best": best, "stale": stale, "config": config}
        if improved:
            rundir.save_checkpoint(run_dir / "checkpoints" / "best.pt", state)
        rundir.save_checkpoint(run_dir / "checkpoints" / "last.pt", state)
        if t.early_stop_patience and stale >= t.early_stop_patience:
            report.say(f"early stop: no better {key} for {stale} epochs")
            break

    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"])
    test = evaluate(model, test_loader, data, loss_fn, metrics, to_input, amp, t.limit_batches)
    return {"device": str(device), "epochs_run": epoch, "monitor": key, "mode": mode,
            "best_epoch": best_record["epoch"], "best_val": {k: v for k, v in best_record.items() if k.startswith("val_")},
            "test": test}


def train_epoch(model: nn.Module, loader, opt, sched, scaler, loss_fn: nn.Module, to_input: Callable, amp: Callable,
                grad_clip: float | None, steps: int, progress: Callable) -> tuple[float, int]:
    """One pass over `steps` training batches; returns the mean loss (read once, at the end) and samples seen."""
    model.train()
    device = next(model.parameters()).device
    loss_sum, seen = torch.zeros((), device=device), 0
    for step, (x, y) in zip(range(steps), loader):
        x, y = to_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with amp():
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss_sum += loss.detach().float()
        seen += len(y)
        progress(step, loss_sum)
    return loss_sum.item() / steps, seen


def user_error(e: BaseException | None) -> UserError | None:
    """The UserError behind `e`, if any (Hydra's instantiate wraps what a builder raises)."""
    while e is not None and not isinstance(e, UserError):
        e = e.__cause__
    return e


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
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"trainer.device={name} but MPS is not available: use trainer.device=auto or cpu")
    return device


def check_loss(loss_fn: nn.Module, task: str) -> None:
    """The loss must fit the dataset's task (a loss hsci does not know is trusted)."""
    fits = LOSS_TASK.get(type(loss_fn), task)
    if fits != task:
        raise UserError(f"loss {type(loss_fn).__name__} is for {fits} tasks, but this dataset is a {task} task: "
                        f"use loss={TASK_LOSS[task]}")
