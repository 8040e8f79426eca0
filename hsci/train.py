"""`hsci train`: build the experiment from its config, train and validate every epoch, test the best checkpoint.

The loop is plain code: no trainer class, no callbacks. `main` is the door where the config comes in and
the outcome is recorded; `train` builds the pieces and runs the epochs; `train_epoch` holds the step. A
run stopped by a signal saves the exact point it reached, and `resume=` carries on from it bit for bit.
"""

import json
import math
import random
import signal
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

from hsci import UserError, interrupt, report, rundir
from hsci.evaluate import evaluate, make_metrics, monitor
from hsci.loaders import input_fn, make_loader

# The loss each task trains with, as its config option name: a mismatch is a user error.
TASK_LOSS = {"multiclass": "cross_entropy", "binary": "bce", "regression": "mse"}
LOSS_TASK = {nn.CrossEntropyLoss: "multiclass", nn.BCEWithLogitsLoss: "binary", nn.MSELoss: "regression"}
# Values that compose but cannot train: (key, test, what the value must be).
CHECKS = [("seed", lambda v: v >= 0, "0 or more"), ("trainer.epochs", lambda v: v >= 1, "at least 1"),
          ("data.batch_size", lambda v: v >= 1, "at least 1"), ("optimizer.lr", lambda v: v > 0, "above 0"),
          ("data.val_fraction", lambda v: 0 < v < 1, "between 0 and 1"),
          ("data.test_fraction", lambda v: 0 < v < 1, "between 0 and 1"),
          ("trainer.log_every", lambda v: v >= 1, "at least 1"),
          ("trainer.limit_batches", lambda v: v is None or v >= 1, "at least 1, or null"),
          ("trainer.early_stop_patience", lambda v: v is None or v >= 1, "at least 1, or null"),
          ("trainer.grad_clip", lambda v: v is None or v > 0, "above 0, or null")]
# What a resumed run may change: where the data lives and how the loop runs, never the experiment.
RESUMABLE = ("trainer.", "data.root", "data.download", "data.num_workers")


class Diverged(Exception):
    """The loss became NaN or infinite."""


def main(cfg: DictConfig, changes: list[str] = ()) -> None:
    """Run (or resume) one training job and record its outcome; a single run exits non-zero unless it completed."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.resume:
        try:
            cfg, state, summary = reopen(run_dir, changes)
        except UserError as e:  # refused before anything in the run directory changed
            return finish({"status": "failed", "error": str(e)}, hydra_cfg)
    else:
        state = None
        summary = {"name": cfg.name, "run_dir": str(run_dir), "seed": cfg.seed,
                   "overrides": list(hydra_cfg.overrides.task), "started": _now(),
                   "versions": rundir.versions(), "git_commit": rundir.git_commit(Path(hydra_cfg.runtime.cwd))}
    if interrupt.requested():  # a sweep that was stopped starts no further jobs
        summary |= {"status": "interrupted", "error": "not started: the sweep was interrupted"}
        rundir.write_json(run_dir / "summary.json", summary)
        return finish(summary, hydra_cfg)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    rundir.write_atomic(run_dir / ".hydra" / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(config).encode()))
    summary |= {"status": "running", "error": None}
    rundir.write_json(run_dir / "summary.json", summary)
    start = time.time()
    with interrupt.caught():
        try:
            summary |= train(cfg, config, run_dir, state)
        except Diverged as e:
            summary |= {"status": "diverged", "error": str(e)}
        except KeyboardInterrupt:  # a second Ctrl-C: out at once, the last checkpoint stays
            summary |= {"status": "interrupted", "error": f"stopped at once; resume with hsci train resume={run_dir}"}
        except Exception as e:
            cause = user_error(e)
            error = str(cause) if cause else f"{type(e).__name__}: {e} (traceback in {run_dir / 'train.log'})"
            report.log.exception(error)
            summary |= {"status": "failed", "error": error}
        finally:
            summary["duration_s"] = round(summary.get("duration_s", 0) + time.time() - start, 3)
            rundir.write_json(run_dir / "summary.json", summary)
    finish(summary, hydra_cfg)


def finish(summary: dict, hydra_cfg) -> None:
    """Show the outcome. A single run exits non-zero unless it completed; a sweep goes on to its next job."""
    if summary["status"] == "completed":
        return report.final(summary)
    status = summary["status"]
    report.error(summary["error"] if status == "failed" else f"run {status}: {summary['error']}")
    if hydra_cfg.mode == RunMode.RUN:
        sys.exit({signal.SIGINT: 130, signal.SIGTERM: 143}.get(interrupt.requested(), 1))


def reopen(run_dir: Path, changes: list[str]) -> tuple[DictConfig, dict | None, dict]:
    """For `resume=`: the run's saved config with `changes` applied, its last checkpoint (None if it saved
    none yet) and its summary so far."""
    cfg = rundir.load_config(run_dir, changes, RESUMABLE, "resume")
    last = run_dir / "checkpoints" / "last.pt"
    state = rundir.load_checkpoint(last) if last.exists() else None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {"name": cfg.name, "run_dir": str(run_dir), "seed": cfg.seed}
    if summary.get("status") == "completed" and state and state["epoch"] >= cfg.trainer.epochs:
        raise UserError(f"resume: {run_dir} already completed its {state['epoch']} epochs; raise trainer.epochs "
                        "to train it further")
    summary["resumed"] = summary.get("resumed", []) + [{"at": _now(), "epoch": state["epoch"] if state else 0,
                                                        "step": state["step"] if state else 0, "changes": changes}]
    return cfg, state, summary


def train(cfg: DictConfig, config: dict, run_dir: Path, state: dict | None = None) -> dict:
    """Train and validate every epoch, keep the best checkpoint, test it; returns the results for summary.json.

    `state` (a last.pt) puts the run back where it stopped; `config` is `cfg` as plain values.
    """
    check_values(cfg)
    t = cfg.trainer
    device = pick_device(t.device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
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
    at = {"epoch": 0, "step": 0, "loss_sum": 0.0, "seen": 0, "best_record": {}, "stale": 0}
    if state:
        at = restore(state, model, opt, sched, scaler, run_dir / "checkpoints" / "last.pt")
        rundir.keep_epochs(run_dir / "metrics.jsonl", at["epoch"])
        report.say(f"resuming at epoch {at['epoch'] + 1}, step {at['step']}")
    report.say(f"device {device}  {t.precision.value}  {sum(p.numel() for p in model.parameters()):,} parameters  "
               f"train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}  run dir {run_dir}")

    def checkpoint(done: int, step: int, loss_sum: float, seen: int) -> dict:
        """Everything to carry on exactly: `done` epochs complete, then `step` steps of the next one."""
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "rng": rundir.rng_state(), "epoch": done, "step": step,
                "loss_sum": loss_sum, "seen": seen, "best_record": best_record, "stale": stale,
                "config": config}

    best_record, stale, done = at["best_record"], at["stale"], at["epoch"]
    for epoch in range(at["epoch"] + 1, t.epochs + 1):
        if t.early_stop_patience and stale >= t.early_stop_patience:
            report.say(f"early stop: no better {key} for {stale} epochs")
            break
        first = at["step"] if epoch == at["epoch"] + 1 else 0
        loss_sum = torch.tensor(at["loss_sum"] if first else 0.0, device=device)
        seen = seen_before = at["seen"] if first else 0
        train_loader.sampler.set_epoch(epoch, first * data.batch_size)
        start = time.perf_counter()
        todo = range(first, steps)
        with report.epoch_progress(epoch, t.epochs, todo, data.batch_size, t.log_every) as progress:
            loss_sum, seen, step = train_epoch(model, train_loader, opt, sched, scaler, loss_fn, to_input, amp,
                                               t.grad_clip, todo, loss_sum, seen, t.log_every, progress, epoch)
        epoch_s = time.perf_counter() - start
        val = evaluate(model, val_loader, data, loss_fn, metrics, to_input, amp, t.limit_batches) if step == steps else None
        if val is None:  # a stop signal: save the exact point reached
            rundir.save_checkpoint(run_dir / "checkpoints" / "last.pt", checkpoint(done, step, loss_sum.item(), seen))
            return stopped(run_dir, done, f"at epoch {epoch}, step {step}")
        if not math.isfinite(val["loss"]):
            raise Diverged(f"the validation loss is {val['loss']} after epoch {epoch}: {DIVERGED_HINT}")
        record = {"epoch": epoch, "train_loss": loss_sum.item() / steps, **{f"val_{k}": v for k, v in val.items()},
                  "lr": opt.param_groups[0]["lr"], "epoch_s": epoch_s, "train_img_per_s": (seen - seen_before) / epoch_s}
        rundir.append_jsonl(run_dir / "metrics.jsonl", record)
        report.epoch_row(record, first=epoch == 1)
        improved = better(record, best_record, key, mode)
        best_record, stale = (record, 0) if improved else (best_record, stale + 1)
        if improved:
            rundir.save_checkpoint(run_dir / "checkpoints" / "best.pt", checkpoint(epoch, 0, 0.0, 0))
        rundir.save_checkpoint(run_dir / "checkpoints" / "last.pt", checkpoint(epoch, 0, 0.0, 0))
        done = epoch

    best_state = rundir.load_checkpoint(run_dir / "checkpoints" / "best.pt")
    rundir.load_weights(model, best_state["model"], run_dir / "checkpoints" / "best.pt")
    test = evaluate(model, test_loader, data, loss_fn, metrics, to_input, amp, t.limit_batches)
    if test is None:
        return stopped(run_dir, done, "while testing")
    return {"status": "completed", "device": str(device), "epochs_run": done, "monitor": key, "mode": mode,
            "best_epoch": best_record["epoch"], "best_val": {k: v for k, v in best_record.items() if k.startswith("val_")},
            "test": test}


DIVERGED_HINT = ("lower optimizer.lr, set trainer.grad_clip (e.g. 1.0), or use trainer.precision=bf16 instead of "
                 "fp16; the last good checkpoint stays in checkpoints/")


def train_epoch(model: nn.Module, loader, opt, sched, scaler, loss_fn: nn.Module, to_input: Callable,
                amp: Callable, grad_clip: float | None, steps: range, loss_sum: torch.Tensor, seen: int,
                log_every: int, progress: Callable, epoch: int) -> tuple[torch.Tensor, int, int]:
    """Run the training steps in `steps`; returns (loss sum, samples seen, steps done), fewer steps when a
    signal asks to stop. The loss stays on the device and is read every `log_every` steps."""
    model.train()
    first_bad = torch.full((), -1, device=loss_sum.device)  # the first step whose loss was NaN or infinite
    done = steps.start
    for step, (x, y) in zip(steps, loader):
        x, y = to_input(x.to(loss_sum.device, non_blocking=True)), y.to(loss_sum.device, non_blocking=True)
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
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        seen, done = seen + len(y), step + 1
        reading = done % log_every == 0 or done == steps.stop or interrupt.requested()
        progress(step, loss_sum if reading else None)
        if reading and first_bad.item() >= 0:
            raise Diverged(f"the loss became {loss_sum.item()} at epoch {epoch}, step {first_bad.item() + 1}: "
                           + DIVERGED_HINT)
        if interrupt.requested():
            break
    return loss_sum, seen, done


def better(record: dict, best: dict, key: str, mode: str) -> bool:
    """Whether this epoch beats the best so far: a better `key`, or an equal one with a lower validation loss."""
    if not best:
        return True
    if record[key] != best[key]:
        return record[key] > best[key] if mode == "max" else record[key] < best[key]
    return record["val_loss"] < best["val_loss"]


def restore(state: dict, model: nn.Module, opt, sched, scaler, source: Path) -> dict:
    """Put model, optimizer, scheduler, grad scaler and every random generator back as `state` has them;
    returns the loop's position and best-so-far."""
    rundir.load_weights(model, state["model"], source)
    opt.load_state_dict(state["optimizer"])
    counters = {k: state["scheduler"][k] for k in ("last_epoch", "_step_count")}
    sched.load_state_dict(sched.state_dict() | counters)  # the schedule's length follows trainer.epochs
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    rundir.set_rng_state(state["rng"])
    return {k: state[k] for k in ("epoch", "step", "loss_sum", "seen", "best_record", "stale")}


def stopped(run_dir: Path, done: int, where: str) -> dict:
    name = signal.Signals(interrupt.requested()).name
    return {"status": "interrupted", "epochs_run": done,
            "error": f"{name} {where}; resume with: hsci train resume={run_dir}"}


def check_values(cfg: DictConfig) -> None:
    """Refuse values that compose but cannot train, and keys left without a value, before any work."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{', '.join(missing)} must be set: add {' '.join(k + '=...' for k in missing)} to the command")
    for key, ok, requirement in CHECKS:
        value = OmegaConf.select(cfg, key, default="absent")
        if value != "absent" and not ok(value):
            raise UserError(f"{key}={value} is invalid: it must be {requirement}")


def user_error(e: BaseException | None) -> UserError | None:
    """The UserError behind `e`, if any: Hydra's instantiate wraps what a builder raises, and a DataLoader
    worker's error comes back with its traceback in the message."""
    while e is not None and not isinstance(e, UserError):
        e = e.__cause__
    if e is not None and "Traceback" in str(e):
        return UserError(str(e).strip().splitlines()[-1].removeprefix("hsci.UserError: "))
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
