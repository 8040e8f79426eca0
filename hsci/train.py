"""`hsci train`: build the experiment from its config, train and validate every epoch, test the best checkpoint.

The loop is plain code: no trainer class, no callbacks. `main` is the door where the config comes in and
the outcome is recorded; `train` builds the pieces and runs the epochs, each through hsci/step.py's
`train_epoch`, which holds the step. A run stopped by a signal saves the exact point it reached
(hsci/resume.py), and `resume=` carries on from it bit for bit. With several devices, `launched` starts the
ranks (hsci/distributed.py), and each rank runs `train` on its share of the data.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import hsci
from hsci import UserError, distributed, flat, interrupt, report, rundir, user_error
from hsci.build import build
from hsci.evaluate import evaluate, make_metrics, monitor
from hsci.launch import Failed, launch
from hsci.loaders import Timed, start_epoch
from hsci.owner import requeued
from hsci.resume import POSITION, Position, checkpoint, reopen, restore
from hsci.schema import check_keys
from hsci.step import (DIVERGED_HINT, Diverged, Readings, optimizing, peak_memory_gb, reset_peak_memory, train_epoch,
                       warm_up)

# What summary.json says of a run's outcome: cleared when a resume sets it running again.
RESULTS = ("error", "device", "precision", "channels_last", "loader", "compile_s", "startup_s", "world_size", "nodes",
           "backend", "epochs_run", "monitor", "mode", "best_epoch", "best_val", "test")
STEPS = "steps.jsonl"  # a line per reading (see Readings)


def main(cfg: DictConfig, changes: list[str] = ()) -> float | None:
    """Run (or resume) one training job and record its outcome; a single run exits non-zero unless it completed.
    Returns the best value of the monitored validation metric (what sweepers that optimise read), or None."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # Started as a rank (torchrun), or a task of a cluster job on several: rank 0 runs the job, the others follow.
    ranks = distributed.started_as_rank() or hydra_cfg.mode == RunMode.MULTIRUN and distributed.cluster_tasks()
    if ranks and int(os.environ["RANK"]):
        return follow()
    try:
        return record(cfg, changes, hydra_cfg, run_dir)
    finally:
        if ranks:  # a job that ends before its ranks meet (refused, stopped, done already): the others end too
            distributed.announce(None)


def record(cfg: DictConfig, changes: list[str], hydra_cfg, run_dir: Path) -> float | None:
    """`main` for the process that owns the run: it runs the job and records its outcome."""
    # A sweep job that finds its own run in its folder was requeued (a preempted cluster job): it carries on,
    # unless it had completed (requeued by the cluster after that), and then its result stands.
    resumed = bool(cfg.resume) or (hydra_cfg.mode == RunMode.MULTIRUN and requeued(run_dir))
    if resumed and not cfg.resume:
        done = json.loads((run_dir / "summary.json").read_text())
        if done.get("status") == "completed":
            return done["best_val"][done["monitor"]]
    if resumed:
        try:
            cfg, state, summary = reopen(run_dir, changes)
        except UserError as e:  # refused before anything in the run directory changed
            report.log.error("resume refused: %s", e)
            return finish({"status": "failed", "error": str(e)}, hydra_cfg)
    else:
        state = None
        summary = {"name": cfg.name, "run_dir": str(run_dir), "seed": cfg.seed,
                   "overrides": list(hydra_cfg.overrides.task), "started": rundir.now(),
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
        if hydra_cfg.mode == RunMode.MULTIRUN and not resumed:  # a single run's keys were checked before its
            check_keys(cfg, hydra_cfg)  # folder was made, a sweep's only where they did not vary from job to job
        summary |= run(cfg, config, run_dir, state, resumed)
    except Diverged as e:
        summary |= {"status": "diverged", "error": str(e)}
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, the last checkpoint stays
        summary |= {"status": "interrupted", "error": f"stopped at once; resume with hsci train resume={run_dir}"}
    except Exception as e:
        summary |= {"status": "failed", "error": described(e, run_dir)}
    except BaseException as e:  # SystemExit from a library, or worse: recorded, then on its way
        summary |= {"status": "failed", "error": f"ended by {type(e).__name__}({e}) before it completed"}
        report.log.exception(summary["error"])
        raise
    finally:
        summary["duration_s"] = round(summary.get("duration_s", 0) + time.time() - start, 3)
        rundir.write_json(run_dir / "summary.json", summary)
    finish(summary, hydra_cfg)
    return summary["best_val"][summary["monitor"]] if summary["status"] == "completed" else None


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
        sys.exit(interrupt.exit_code() if interrupt.requested() and status != "failed" else 1)


def run(cfg: DictConfig, config: dict, run_dir: Path, state: dict | None, resumed: bool) -> dict:
    """Train in this process, as rank 0 of the ranks torchrun started, or through `trainer.devices` worker
    processes that the elastic launcher starts; returns the results for summary.json."""
    trainer = cfg.trainer
    if distributed.started_as_rank():  # torchrun's rank 0; the other ranks `follow`
        distributed.announce(run_dir, resumed)
        world = distributed.join(trainer.device, trainer.dist_timeout_s)
        try:
            return train(cfg, config, run_dir, state, world)
        except Diverged:  # on every rank at once
            raise
        except Exception as e:
            raise rank_failed(e, world, run_dir) from None
        finally:
            distributed.leave()
    devices = distributed.devices(trainer.devices, trainer.device)
    return launched(run_dir, devices, resumed) if devices > 1 else train(cfg, config, run_dir, state)


def launched(run_dir: Path, devices: int, resumed: bool) -> dict:
    """Run the training in `devices` ranks started by the elastic launcher, each loading the config saved in
    `run_dir`; rank 0 writes the results into summary.json, which this returns."""
    if interrupt.requested():
        name = signal.Signals(interrupt.requested()).name
        return {"status": "interrupted", "error": f"{name} before the processes started; resume with: hsci train "
                                                  f"resume={run_dir}"}
    report.say(f"starting {devices} processes (elastic launcher); rank 0 reports")
    failed = None
    try:
        launch(devices, as_rank, str(run_dir), resumed, hsci.STARTED, os.getpid())
    except Failed as e:  # unless a stop signal ended a rank before it could stop in step
        failed = None if e.by_signal and interrupt.requested() else str(e)
    summary = json.loads((run_dir / "summary.json").read_text())
    if failed:
        report.log.error(failed)
        return summary | {"status": "failed", "error": failed}
    said = summary["status"] == "interrupted" and summary["error"].split()[0]
    if said in signal.Signals.__members__ and not interrupt.requested():  # a rank got the signal, not the launcher
        interrupt.received.append(signal.Signals[said])
    if summary["status"] == "running":  # stopped before rank 0 could record it
        name = signal.Signals(interrupt.requested() or signal.SIGTERM).name
        return summary | {"status": "interrupted", "error": f"{name}; resume with: hsci train resume={run_dir}"}
    return summary


def as_rank(run_dir: str, resumed: bool, started: float, launcher: int) -> None:
    """One rank, started by the elastic launcher (process `launcher`): the run in `run_dir` from its saved config."""
    hsci.STARTED, run_dir = started, Path(run_dir)  # startup_s counts from the launcher's start
    hsci.best_effort()  # the launcher's console: a pipe that closes fails no rank
    with rank_stops():
        cfg = rundir.load_config(run_dir, [], (), "train")
        world = distributed.join(cfg.trainer.device, cfg.trainer.dist_timeout_s)
        take_part(cfg, run_dir, resumed, world)
    if os.getppid() != launcher:  # the launcher was killed: none is left to take this rank's result and end it
        os._exit(0)


def follow() -> None:
    """A rank other than 0 that torchrun or a cluster started with `hsci train ...`: rank 0 composes the config
    and makes the run directory; this rank waits for it, loads the config rank 0 saved there, and takes part."""
    with rank_stops():
        run_dir, resumed = distributed.run_of_rank_0()
        if run_dir is None:  # rank 0 refused the run or stopped before it began, and says why
            return
        if not (run_dir / ".hydra" / "config.yaml").is_file():
            raise UserError(f"rank {os.environ['RANK']} cannot see rank 0's run directory {run_dir}: put it on a "
                            "filesystem every node shares (hydra.run.dir=/shared/...)")
        cfg = rundir.load_config(run_dir, [], (), "train")
        take_part(cfg, run_dir, resumed, distributed.join(cfg.trainer.device, cfg.trainer.dist_timeout_s))


def take_part(cfg: DictConfig, run_dir: Path, resumed: bool, world: distributed.World) -> None:
    """A rank's part of the run: the training, on its share of the data. Rank 0 (under the elastic launcher)
    writes the results into summary.json; a rank that fails logs its traceback and ends, which stops the rest."""
    distributed.rank_logging(world, run_dir / "train.log")
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    last = run_dir / "checkpoints" / "last.pt"
    state = rundir.load_checkpoint(last, POSITION) if resumed and last.exists() else None
    try:
        results = train(cfg, config, run_dir, state, world)
    except Diverged as e:  # every rank sees the same loss: all stop at the same step
        results = {"status": "diverged", "error": str(e)}
    except Exception as e:
        raise rank_failed(e, world, run_dir) from None
    finally:
        distributed.leave()
    if world.main:
        path = run_dir / "summary.json"
        rundir.write_json(path, json.loads(path.read_text()) | results)


def rank_stops():
    """A rank's stop signals, from its start: the first is recorded (all ranks stop at the same step), the rest
    ignored, for the launcher to end the ranks at once. In a submitit job, submitit's preemption signal stops a
    rank and SIGTERM is ignored, as submitit has it."""
    preempt = interrupt.preemption()
    if preempt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return interrupt.caught(again_at_once=False, stops=(signal.SIGINT, signal.SIGHUP, preempt))
    return interrupt.caught(again_at_once=False)


def rank_failed(e: Exception, world: distributed.World, run_dir: Path) -> distributed.RankFailed:
    """This rank's error, logged with its traceback; raised as the run's (the error of the first rank to fail).
    A rank that gave up waiting for the others says so: the rank that hangs is another."""
    if "timed out" in str(e).lower():  # gloo's and NCCL's words for a collective that waited past its timeout
        report.log.exception("gave up waiting for the other processes")
        return distributed.RankFailed(world.blame(
            f"waited {world.timeout_s:g} s (trainer.dist_timeout_s) for the other processes in an exchange: one of "
            f"them hangs or is far slower (its traceback, if it has one, is in {run_dir / 'train.log'})"))
    return distributed.RankFailed(world.blame(described(e, run_dir)))


def described(e: Exception, run_dir: Path) -> str:
    """An error as summary.json records it, in one line, logged with its traceback."""
    cause = user_error(e)
    error = str(cause) if cause else f"{type(e).__name__}: {flat(e)} (traceback in {run_dir / 'train.log'})"
    report.log.exception(error)
    return error


def train(cfg: DictConfig, config: dict, run_dir: Path, state: dict | None = None,
          world: distributed.World = distributed.SINGLE) -> dict:
    """Train and validate every epoch, keep the best checkpoint, test it; returns the results for summary.json.

    `state` (a last.pt) puts the run back where it stopped; `config` is `cfg` as plain values. Every rank of
    `world` runs this on its share of the data; rank 0 alone writes the run directory (`world.main`).
    """
    report.config(config, OmegaConf.to_yaml(config))
    parts = build(cfg, world=world)
    trainer, data = cfg.trainer, parts.data
    steps = min(len(parts.train_loader), trainer.limit_batches or len(parts.train_loader))
    optim = optimizing(cfg, parts, epochs=trainer.epochs, steps_per_epoch=steps)
    metrics = make_metrics(data.task, data.num_outputs).to(parts.device)
    key, mode = monitor(trainer.monitor, data.task, metrics)
    last = run_dir / "checkpoints" / "last.pt"
    position = restore(state, parts.model, optim, last) if state else Position()
    if state:
        report.say(f"resuming at epoch {position.epoch + 1}, step {position.step}")
        saved_by = state.get("world_size", 1)
        if saved_by != world.size:
            report.log.warning(f"resuming on {world.size} process(es), saved by {saved_by}: each process's share "
                               "of a batch changed (the global batch is the same; batch norm statistics and random "
                               "masks are drawn per share, so the run differs from one that was not interrupted)")
            report.say(f"note: the data split across processes changed ({saved_by} -> {world.size})")
    if world.main:  # a resumed run redoes what came after
        rundir.keep_records(run_dir / "metrics.jsonl", "epoch", position.epoch)
        rundir.keep_records(run_dir / STEPS, "step", optim.sched.last_epoch)
    compile_s = warm_up(parts, data.batch_size // world.size) if trainer.compile else 0.0
    setup = {"device": str(parts.device), "precision": parts.precision, "channels_last": parts.channels_last,
             "loader": parts.loader, "compile_s": round(compile_s, 3),
             "startup_s": round(time.time() - hsci.STARTED, 3), "world_size": world.size, "nodes": world.nodes,
             "backend": world.backend}
    stepping = replace(parts, model=world.wrap(parts.model, parts.device))  # the step runs DDP's model
    size = sum(weights.numel() for weights in parts.model.parameters())
    report.say("  ".join(f"{k} {v}" for k, v in setup.items()) + f"  {size:,} parameters  train/val/test "
               f"{len(data.train)}/{len(data.val)}/{len(data.test)}  run dir {run_dir}")
    evaluating = partial(evaluate, parts.model, data=data, loss_fn=parts.loss_fn, metrics=metrics,
                         to_input=parts.to_input, amp=parts.amp, world=world)

    while position.epoch < trainer.epochs:
        if trainer.early_stop_patience and position.stale >= trainer.early_stop_patience:
            report.say(f"early stop: no better {key} for {position.stale} epochs")
            break
        epoch = position.next_epoch(steps, parts.device)
        start_epoch(parts.train_loader, epoch.number, epoch.step)
        batches = Timed(parts.train_loader)
        reset_peak_memory(parts.device)
        lr, start = optim.opt.param_groups[0]["lr"], time.perf_counter()
        with report.epoch_progress(epoch.number, trainer.epochs, epoch.step, steps) as progress:
            readings = Readings(trainer.log_every, epoch, run_dir / STEPS if world.main else None, progress, world)
            stop = train_epoch(stepping, optim=optim, batches=batches, epoch=epoch, readings=readings)
        epoch_s = time.perf_counter() - start
        loss_sum = world.mean(epoch.loss_sum).item()  # over every rank's share
        world.same_buffers(parts.model)
        val = None if stop else evaluating(parts.val_loader)
        if val is None:  # a stop signal: save the exact point reached
            position = replace(position, step=epoch.step, loss_sum=loss_sum, seen=epoch.seen)
            if world.main:
                rundir.save_checkpoint(last, checkpoint(parts, optim, position, config, world))
            return setup | stopped(run_dir, position.epoch, f"at epoch {epoch.number}, step {epoch.step}")
        if not math.isfinite(val["loss"]):
            raise Diverged(f"the validation loss is {val['loss']} after epoch {epoch.number}: {DIVERGED_HINT}")
        record = {"epoch": epoch.number, "train_loss": loss_sum / epoch.step,
                  **{f"val_{k}": v for k, v in val.items()}, "lr": lr, "epoch_s": epoch_s,
                  "train_img_per_s": (epoch.seen - epoch.seen_first) * world.size / epoch_s,
                  "data_wait_s": batches.wait_s, "max_mem_gb": peak_memory_gb(parts.device)}
        report.epoch_row(record, first=epoch.number == 1)
        improved = better(record, position.best_record, key, mode)
        position = Position(epoch.number, best_record=record if improved else position.best_record,
                            stale=0 if improved else position.stale + 1)
        if world.main:
            rundir.append_jsonl(run_dir / "metrics.jsonl", record)
            if improved:
                rundir.save_checkpoint(run_dir / "checkpoints" / "best.pt",
                                       checkpoint(parts, optim, position, config, world))
            rundir.save_checkpoint(last, checkpoint(parts, optim, position, config, world))

    world.barrier()  # rank 0 has written best.pt
    best_state = rundir.load_checkpoint(run_dir / "checkpoints" / "best.pt")
    rundir.load_weights(parts.model, best_state["model"], run_dir / "checkpoints" / "best.pt")
    test = evaluating(parts.test_loader)
    if test is None:
        return setup | stopped(run_dir, position.epoch, "while testing")
    best = position.best_record
    return setup | {"status": "completed", "epochs_run": position.epoch, "monitor": key, "mode": mode,
                    "best_epoch": best["epoch"], "best_val": {k: v for k, v in best.items() if k.startswith("val_")},
                    "test": test}


def better(record: dict, best: dict, key: str, mode: str) -> bool:
    """Whether this epoch beats the best so far: a better `key`, or an equal one with a lower validation loss."""
    if not best:
        return True
    if record[key] != best[key]:
        return record[key] > best[key] if mode == "max" else record[key] < best[key]
    return record["val_loss"] < best["val_loss"]


def stopped(run_dir: Path, done: int, where: str) -> dict:
    name = signal.Signals(interrupt.requested()).name
    return {"status": "interrupted", "epochs_run": done,
            "error": f"{name} {where}; resume with: hsci train resume={run_dir}"}
