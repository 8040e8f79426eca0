"""`hsci train`: build the experiment from its config, train and validate every epoch, test the best checkpoint.

The loop is plain code: no trainer class, no callbacks. `main` is the door where the config comes in and
the outcome is recorded; `train` builds the pieces and runs the epochs; `train_epoch` holds the step. A
run stopped by a signal saves the exact point it reached, and `resume=` carries on from it bit for bit.
"""

import json
import math
import resource
import signal
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import default_collate

import hsci
from hsci import UserError, flat, interrupt, report, rundir, user_error
from hsci.build import Parts, build, pick_device
from hsci.evaluate import evaluate, make_metrics, monitor
from hsci.loaders import Timed, start_epoch
from hsci.schema import check_values

# What a resumed run may change: where the data lives and how the loop runs, never the experiment.
RESUMABLE = ("trainer.", "data.root", "data.download", "data.num_workers")
# What a last.pt holds to carry on exactly: `epoch` epochs complete, then `step` steps of the next one, whose
# losses add up to `loss_sum` over `seen` samples; the best epoch's record, and epochs since it (`stale`).
POSITION = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "loss_sum", "seen", "best_record",
            "stale")
# What summary.json says of a run's outcome: cleared when a resume sets it running again.
RESULTS = ("error", "device", "precision", "channels_last", "loader", "compile_s", "startup_s", "epochs_run",
           "monitor", "mode", "best_epoch", "best_val", "test")


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
            report.log.error("resume refused: %s", e)
            return finish({"status": "failed", "error": str(e)}, hydra_cfg)
    else:
        state = None
        summary = {"name": cfg.name, "run_dir": str(run_dir), "seed": cfg.seed,
                   "overrides": list(hydra_cfg.overrides.task), "started": _now(),
                   "versions": rundir.versions(), "git_commit": rundir.git_commit(Path(hydra_cfg.runtime.cwd))}
    if interrupt.requested():  # stopped before training began (or a sweep that was stopped: no further jobs)
        summary |= {"status": "interrupted", "error": "not started: a stop signal came first"}
        rundir.write_json(run_dir / "summary.json", summary)
        return finish(summary, hydra_cfg)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    rundir.write_config(run_dir, config)
    summary = {k: v for k, v in summary.items() if k not in RESULTS} | {"status": "running", "error": None}
    rundir.write_json(run_dir / "summary.json", summary)
    start = time.time()
    try:
        summary |= train(cfg, config, run_dir, state)
    except Diverged as e:
        summary |= {"status": "diverged", "error": str(e)}
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, the last checkpoint stays
        summary |= {"status": "interrupted", "error": f"stopped at once; resume with hsci train resume={run_dir}"}
    except Exception as e:
        cause = user_error(e)
        error = str(cause) if cause else f"{type(e).__name__}: {flat(e)} (traceback in {run_dir / 'train.log'})"
        report.log.exception(error)
        summary |= {"status": "failed", "error": error}
    except BaseException as e:  # SystemExit from a library, or worse: recorded, then on its way
        summary |= {"status": "failed", "error": f"ended by {type(e).__name__}({e}) before it completed"}
        report.log.exception(summary["error"])
        raise
    finally:
        summary["duration_s"] = round(summary.get("duration_s", 0) + time.time() - start, 3)
        rundir.write_json(run_dir / "summary.json", summary)
    finish(summary, hydra_cfg)


def finish(summary: dict, hydra_cfg) -> None:
    """Show the outcome. A single run exits non-zero unless it completed; a sweep goes on to its next job."""
    if summary["status"] == "completed":
        return report.final(summary)
    status = summary["status"]
    message = summary["error"] if status == "failed" else f"run {status}: {summary['error']}"
    if status != "failed":  # a failure was logged with its traceback
        report.log.error(message)
    report.error(message)
    if hydra_cfg.mode == RunMode.RUN:
        sys.exit(interrupt.exit_code() if interrupt.requested() else 1)


def reopen(run_dir: Path, changes: list[str]) -> tuple[DictConfig, dict | None, dict]:
    """For `resume=`: the run's saved config with `changes` applied, its last checkpoint (None if it saved
    none yet) and its summary so far."""
    cfg = rundir.load_config(run_dir, changes, RESUMABLE, "resume")
    last = run_dir / "checkpoints" / "last.pt"
    state = rundir.load_checkpoint(last, POSITION) if last.exists() else None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {"name": cfg.name, "seed": cfg.seed}
    summary["run_dir"] = str(run_dir)  # where the run is now, if it was moved or copied
    check_values(cfg)  # nothing in the run directory changes for a resume that cannot go on
    pick_device(cfg.trainer.device)
    if summary.get("status") == "completed" and state:
        patience = cfg.trainer.early_stop_patience
        if state["epoch"] >= cfg.trainer.epochs:
            raise UserError(f"resume: {run_dir} already completed its {state['epoch']} epochs; raise trainer.epochs "
                            "to train it further")
        if patience and state["stale"] >= patience:
            raise UserError(f"resume: {run_dir} stopped early after epoch {state['epoch']} ({state['stale']} epochs "
                            "without a better validation metric); raise trainer.early_stop_patience (or set it to "
                            "null) to train it further")
    summary["resumed"] = summary.get("resumed", []) + [{"at": _now(), "epoch": state["epoch"] if state else 0,
                                                        "step": state["step"] if state else 0, "changes": changes}]
    return cfg, state, summary


def train(cfg: DictConfig, config: dict, run_dir: Path, state: dict | None = None) -> dict:
    """Train and validate every epoch, keep the best checkpoint, test it; returns the results for summary.json.

    `state` (a last.pt) puts the run back where it stopped; `config` is `cfg` as plain values.
    """
    report.config(config, OmegaConf.to_yaml(config))
    p = build(cfg)
    t, model, data, device = cfg.trainer, p.model, p.data, p.device
    steps = min(len(p.train_loader), t.limit_batches or len(p.train_loader))
    opt = instantiate(cfg.optimizer, params=model.parameters())
    sched = instantiate(cfg.scheduler, opt=opt, epochs=t.epochs, steps_per_epoch=steps)
    scaler = torch.amp.GradScaler(device.type, enabled=p.precision == "fp16")
    metrics = make_metrics(data.task, data.num_outputs).to(device)
    key, mode = monitor(data.task)
    at = {"epoch": 0, "step": 0, "loss_sum": 0.0, "seen": 0, "best_record": {}, "stale": 0}  # see POSITION
    if state:
        at = restore(state, model, opt, sched, scaler, run_dir / "checkpoints" / "last.pt")
        report.say(f"resuming at epoch {at['epoch'] + 1}, step {at['step']}")
    rundir.keep_epochs(run_dir / "metrics.jsonl", at["epoch"])  # a resumed run redoes what came after
    compile_s = warm_up(p, data.batch_size) if t.compile else 0.0
    setup = {"device": str(device), "precision": p.precision, "channels_last": p.channels_last, "loader": p.loader,
             "compile_s": round(compile_s, 3), "startup_s": round(time.time() - hsci.STARTED, 3)}
    report.say("  ".join(f"{k} {v}" for k, v in setup.items()) + f"  {sum(q.numel() for q in model.parameters()):,} "
               f"parameters  train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}  run dir {run_dir}")
    evaluating = partial(evaluate, model, data=data, loss_fn=p.loss_fn, metrics=metrics, to_input=p.to_input,
                         amp=p.amp, limit=t.limit_batches)

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
        # A resumed epoch carries on from the step it stopped after, even past a trainer.limit_batches that shrank.
        first = at["step"] if epoch == at["epoch"] + 1 else 0
        loss_sum = torch.tensor(at["loss_sum"] if first else 0.0, device=device)
        seen = seen_before = at["seen"] if first else 0
        start_epoch(p.train_loader, epoch, first)
        batches, todo = Timed(p.train_loader), range(first, steps)
        reset_peak_memory(device)
        lr, start = opt.param_groups[0]["lr"], time.perf_counter()
        with report.epoch_progress(epoch, t.epochs, todo, data.batch_size, t.log_every) as progress:
            loss_sum, seen, step = train_epoch(model, batches, opt, sched, scaler, p.loss_fn, p.to_input, p.amp,
                                               t.grad_clip, todo, loss_sum, seen, t.log_every, progress, epoch)
        epoch_s = time.perf_counter() - start
        val = None if interrupt.requested() else evaluating(p.val_loader)
        if val is None:  # a stop signal: save the exact point reached
            rundir.save_checkpoint(run_dir / "checkpoints" / "last.pt", checkpoint(done, step, loss_sum.item(), seen))
            return setup | stopped(run_dir, done, f"at epoch {epoch}, step {step}")
        if not math.isfinite(val["loss"]):
            raise Diverged(f"the validation loss is {val['loss']} after epoch {epoch}: {DIVERGED_HINT}")
        record = {"epoch": epoch, "train_loss": loss_sum.item() / step, **{f"val_{k}": v for k, v in val.items()},
                  "lr": lr, "epoch_s": epoch_s, "train_img_per_s": (seen - seen_before) / epoch_s,
                  "data_wait_s": batches.wait_s, "max_mem_gb": peak_memory_gb(device)}
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
    test = evaluating(p.test_loader)
    if test is None:
        return setup | stopped(run_dir, done, "while testing")
    return setup | {"status": "completed", "epochs_run": done, "monitor": key, "mode": mode,
                    "best_epoch": best_record["epoch"],
                    "best_val": {k: v for k, v in best_record.items() if k.startswith("val_")}, "test": test}


DIVERGED_HINT = ("lower optimizer.lr, set trainer.grad_clip (e.g. 1.0), or use trainer.precision=bf16 instead of "
                 "fp16; the last good checkpoint stays in checkpoints/")


def train_epoch(model: nn.Module, loader, opt, sched, scaler, loss_fn: nn.Module, to_input: Callable,
                amp: Callable, grad_clip: float | None, steps: range, loss_sum: torch.Tensor, seen: int,
                log_every: int, progress: Callable, epoch: int) -> tuple[torch.Tensor, int, int]:
    """Run the training steps in `steps`; returns (loss sum, samples seen, steps done), fewer steps when a
    signal asks to stop. The loss stays on the device and is read every `log_every` steps."""
    model.train()
    losses = torch.empty(steps.stop, device=loss_sum.device)  # kept to name the step that went NaN or infinite
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
        losses[step] = loss.detach()
        seen, done = seen + len(y), step + 1
        reading = done % log_every == 0 or done == steps.stop or interrupt.requested()
        progress(step, loss_sum if reading else None)
        if reading and not torch.isfinite(loss_sum):
            bad = steps.start + int((~torch.isfinite(losses[steps.start:done])).nonzero()[0])
            raise Diverged(f"the loss became {losses[bad].item()} at epoch {epoch}, step {bad + 1}: " + DIVERGED_HINT)
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
    """Put model, optimizer, scheduler, grad scaler and every random generator back as `state` has them, the
    learning rate where the schedule (as now configured) has it at the step reached; returns the loop's
    position and best-so-far."""
    rundir.load_weights(model, state["model"], source)
    opt.load_state_dict(state["optimizer"])
    counters = {k: state["scheduler"][k] for k in ("last_epoch", "_step_count")}
    sched.load_state_dict(sched.state_dict() | counters)  # the schedule's length follows trainer.epochs
    with warnings.catch_warnings():  # torch's note that get_lr() is meant for inside step()
        warnings.simplefilter("ignore")
        rates = sched.get_lr()  # this step's rate on the schedule as it is now, not as it was saved
    for group, lr in zip(opt.param_groups, rates):
        group["lr"] = lr
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    rundir.set_rng_state(state["rng"])
    return {k: state[k] for k in ("epoch", "step", "loss_sum", "seen", "best_record", "stale")}


def warm_up(p: Parts, batch_size: int) -> float:
    """Compile the training step on a first batch and return the seconds it took, leaving weights,
    buffers, gradients and random generators as they were, so compiling is kept out of the timings."""
    before = {k: v.clone() for k, v in p.model.state_dict().items()}
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[p.device] if p.device.type == "cuda" else []):
        x, y = default_collate([p.data.train[i] for i in range(min(batch_size, len(p.data.train)))])
        x, y = x.to(p.device), y.to(p.device)
        with p.amp():
            loss = p.loss_fn(p.model(p.to_input(x)), y)
        loss.backward()
        loss.item()  # waits for the device
    seconds = time.perf_counter() - start
    p.model.load_state_dict(before)
    p.model.zero_grad(set_to_none=True)
    return seconds


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since the epoch began: the device's allocations on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def stopped(run_dir: Path, done: int, where: str) -> dict:
    name = signal.Signals(interrupt.requested()).name
    return {"status": "interrupted", "epochs_run": done,
            "error": f"{name} {where}; resume with: hsci train resume={run_dir}"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
