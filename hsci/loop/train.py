"""The loop of `hsci train`: build the experiment from its config, train and validate, keep the best checkpoint,
test it.

The loop is plain code: no trainer class, no callbacks. `train` builds the parts (hsci/parts/build.py) and runs
the epochs, each through hsci/loop/step.py's `train_epoch`, which holds the step, pausing where hsci/loop/pace.py
says: to validate (at the end of every epoch by default), and when trainer.max_time has passed. A run stopped by a
signal saves the exact point it reached (hsci/record/resume.py), and `resume=` carries on from it bit for bit.
Every rank of a run on several processes runs this same loop on its share of the data (hsci/jobs/ranks.py starts
them); how a job comes in and how its outcome is recorded is hsci/jobs/job.py's.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

import hsci
from hsci import interrupt, report
from hsci.integrations import loggers
from hsci.loop.debug import Watch, dev_run
from hsci.loop.evaluate import Metrics, evaluate, kept, monitor
from hsci.loop.layers import show_layers
from hsci.loop.pace import Pace, stopping_early
from hsci.loop.step import (DIVERGED_HINT, Diverged, Epoch, Readings, peak_memory_gb, reset_peak_memory, train_epoch,
                            warm_up)
from hsci.parts.build import build, optimizing
from hsci.parts.finetune import freeze_backbone, frozen_at, head
from hsci.parts.loaders import Timed, dropped, start_epoch
from hsci.parts.world import SINGLE, TIME_UP, World
from hsci.record import predictions, rundir, weights
from hsci.record.comparable import class_names, comparable
from hsci.record.kept import Kept
from hsci.record.resume import Position, checkpoint, restore

STEPS = "steps.jsonl"  # a line per reading (see Readings)
# A tune's pruner (hsci/jobs/tune.py), asked after each epoch with its number and monitored validation value whether
# to stop the run there; None outside a tune, whose trials run in one process.
judge: Callable[[int, float], bool] | None = None


def train(cfg: DictConfig, config: dict, run_dir: Path, state: dict | None = None, world: World = SINGLE) -> dict:
    """Train and validate at the run's pace, keep the best checkpoint, test it; returns the results for summary.json.

    `state` (a last.pt) puts the run back where it stopped; `config` is `cfg` as plain values. Every rank of
    `world` runs this on its share of the data; rank 0 alone writes the run directory (`world.main`).
    """
    report.config(config, OmegaConf.to_yaml(config))
    cfg = dev_run(cfg)  # trainer.fast_dev_run: a few batches of each stage
    parts = build(cfg, world=world, restoring=state is not None)  # a resumed run's weights are in its checkpoint
    started_from = None if state else weights.start_from(parts.model, cfg)  # model.weights or init_from, if set
    trainer, data = cfg.trainer, parts.data
    pace = Pace.of(trainer, len(parts.loaders.train))  # an epoch's batches, optimizer steps and validations
    optim = optimizing(cfg, parts, epochs=trainer.epochs, steps_per_epoch=pace.steps)
    metrics = Metrics(data.task, data.num_outputs, parts.device)
    key, mode = monitor(trainer.monitor, data.task, metrics)
    saved = Kept(run_dir / "checkpoints", run_dir / "metrics.jsonl", key, mode, trainer.save_top_k,
                 trainer.save_every_n_epochs)
    last = run_dir / "checkpoints" / "last.pt"
    position = restore(state, parts.model, optim, last) if state else Position()
    if state:
        report.say(f"resuming at epoch {position.epoch + 1}, step {position.step}"
                   + (", with the validation the stop came before" if position.due else ""))
        saved_by = state.get("world_size", 1)
        if saved_by != world.size:
            report.log.warning(f"resuming on {world.size} process(es), saved by {saved_by}: each process's share "
                               "of a batch changed (the global batch is the same; batch norm statistics and random "
                               "masks are drawn per share, so the run differs from one that was not interrupted)")
            report.say(f"note: the data split across processes changed ({saved_by} -> {world.size})")
    if world.main:  # a resumed run redoes what came after
        rundir.keep_records(run_dir / "metrics.jsonl", {"step": optim.sched.last_epoch, "epoch": position.epoch})
        rundir.keep_records(run_dir / STEPS, {"step": optim.sched.last_epoch})
        saved.tidy(position.epoch)
    log = loggers.opened(config, run_dir, optim.sched.last_epoch) if world.main else loggers.Loggers()
    compile_s = warm_up(parts, data.loading.batch_size // world.size) if trainer.compile else 0.0
    speed = parts.speed
    setup = {"device": str(parts.device), "precision": speed.precision, "channels_last": speed.channels_last,
             "loader": speed.loader, "compile_s": round(compile_s, 3),
             "startup_s": round(time.time() - hsci.STARTED, 3), "world_size": world.size, "nodes": world.nodes,
             "backend": world.backend}
    freeze = partial(frozen_at, freeze=cfg.model.get("freeze"), unfreeze_at_epoch=cfg.model.get("unfreeze_at_epoch"))
    if freeze(position.epoch + 1):
        freeze_backbone(parts.model, True)
        report.say(f"backbone frozen: training only the head, {head(parts.model)},"
                   + (f" until epoch {cfg.model.unfreeze_at_epoch}" if cfg.model.unfreeze_at_epoch else ""))
    stepping = replace(parts, model=world.wrap(parts.model, parts.device, pace.accumulate > 1))  # DDP's model
    size = sum(weights.numel() for weights in parts.model.parameters())
    how = ("device", "precision", "channels_last", "loader", "compile_s")  # then the processes, and anything else
    for line in (f"{size:,} parameters  train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}  "
                 f"startup_s {setup['startup_s']}", "  ".join(f"{k} {setup[k]}" for k in how),
                 "  ".join(f"{k} {v}" for k, v in setup.items() if k not in (*how, "startup_s")), f"run dir {run_dir}"):
        report.say(line)  # short lines, each `key value` as summary.json has it
    show_layers(parts.model, trainer.summary_depth)
    left, n = dropped(parts.loaders.train)
    if left and pace.batches == len(parts.loaders.train):  # not when a batch limit ends the epoch before
        report.say(f"note: each epoch leaves out {left} of the {n} training samples, its incomplete last batch "
                   "(drawn anew each epoch); data.drop_last=false keeps it")
    setup |= {"weights_from": started_from} if started_from else {}
    setup |= {"classes": class_names(data), "comparable": comparable(config, data) if world.main else None}
    if data.task != "regression" and 0 < len(data.test) <= 100:
        report.say(f"note: the test split holds {len(data.test)} examples: one of them moves accuracy by "
                   f"{100 / len(data.test):.2g} points")
    watch = Watch(trainer, run_dir if world.main else None, parts.device)  # detect_anomaly, profile

    deadline, ended, header = pace.deadline(), None, True  # trainer.max_time from here: a resume has it afresh
    while position.epoch < trainer.epochs and not ended:
        if stopping_early(position, trainer):
            ended = "early_stop"
            break
        epoch = Epoch.after(position, pace, parts.device)
        if cfg.model.get("freeze") and freeze_backbone(parts.model, freeze(epoch.number)):  # thawed from this epoch
            stepping = replace(parts, model=world.wrap(parts.model, parts.device, pace.accumulate > 1))
            report.say(f"epoch {epoch.number}: the backbone trains from here on")
        start_epoch(parts.loaders.train, epoch.number, epoch.step * pace.accumulate)
        timed = Timed(parts.loaders.train)
        batches = iter(timed)  # taken up again after each validation within the epoch
        reset_peak_memory(parts.device)
        lr, epoch_s = optim.opt.param_groups[0]["lr"], 0.0
        with (report.epoch_progress(epoch.number, trainer.epochs, epoch.step, epoch.stop) as progress,
              watch.epoch(epoch, batches) as watched):
            readings = Readings(trainer.log_every, epoch, run_dir / STEPS if world.main else None, progress, world,
                                log)
            for until in pace.checks(epoch.number, epoch.step, position.due):  # each validation point, then the end
                start = time.perf_counter()
                stop = train_epoch(stepping, optim=optim, batches=watched, epoch=epoch, readings=readings, until=until,
                                   deadline=deadline)
                paused = time.perf_counter()
                epoch_s += paused - start
                end = epoch.step >= epoch.stop
                validating = stop == TIME_UP or epoch.step >= until and (not end or pace.validates(epoch.number))
                loss_sum = world.mean(epoch.loss_sum).item()  # over every rank's share
                world.same_buffers(parts.model)
                val = evaluate(parts, parts.loaders.val, metrics) if validating and stop in (None, TIME_UP) else None
                position = replace(position, step=epoch.step, loss_sum=loss_sum, seen=epoch.seen, due=False)
                if stop not in (None, TIME_UP) or validating and val is None:  # a stop signal: save the point reached
                    position = replace(position, due=validating and not end)  # the resumed run validates first
                    if world.main:
                        rundir.save_checkpoint(last, checkpoint(parts, optim, position, config, world))
                    return setup | stopped(run_dir, position, f"at epoch {epoch.number}, step {epoch.step}")
                if val and not math.isfinite(val["loss"]):
                    raise Diverged(f"the validation loss is {val['loss']} at epoch {epoch.number}, step {epoch.step}: "
                                   f"{DIVERGED_HINT}")
                validated = {f"val_{k}": v for k, v in (val or dict.fromkeys(["loss", *sorted(metrics.names)])).items()}
                record = {"epoch": epoch.number, "step": optim.sched.last_epoch, "train_loss": loss_sum / epoch.step,
                          **validated, "lr": lr, "epoch_s": epoch_s,  # lr: at the epoch's start
                          "train_img_per_s": (epoch.seen - epoch.seen_first) * world.size / max(epoch_s, 1e-9),
                          "data_wait_s": timed.wait_s, "max_mem_gb": peak_memory_gb(parts.device)}
                # The console shows the step where an epoch validates more than once, and blanks for no validation.
                report.epoch_row(record if pace.interval else {k: v for k, v in record.items() if k != "step"}, header)
                header, improved = False, bool(val) and better(record, position.best_record, key, mode)
                position = replace(Position(epoch.number) if end else position,
                                   best_record=record if improved else position.best_record,
                                   stale=0 if improved else position.stale + bool(val))  # counts validations
                if world.main:
                    record = {k: v for k, v in record.items() if v is not None}
                    rundir.append_jsonl(run_dir / "metrics.jsonl", record)
                    log.epoch(record, optim.sched.last_epoch)
                    saved.save(checkpoint(parts, optim, position, config, world), epoch.number, improved, end)
                if end and val and judge is not None and judge(epoch.number, record[key]):
                    return setup | pruned(position, key, mode, record[key])
                if stop == TIME_UP or val and stopping_early(position, trainer):
                    ended = "max_time" if stop == TIME_UP else "early_stop"
                    break
                readings.leave_out(time.perf_counter() - paused)  # the validation is no part of the next speed read
    if ended == "max_time":
        report.say(f"max_time {trainer.max_time} passed: stopped at epoch {epoch.number}, step {epoch.step}; resume "
                   f"with: hsci train resume={run_dir}")
    if ended == "early_stop":
        report.say(f"early stop: no better {key} for {position.stale} validations")

    world.barrier()  # rank 0 has written best.pt
    best_state = rundir.load_checkpoint(run_dir / "checkpoints" / "best.pt")
    rundir.load_weights(parts.model, best_state["model"], run_dir / "checkpoints" / "best.pt")
    outputs = []
    test = evaluate(parts, parts.loaders.test, metrics, outputs)
    if test is None:
        return setup | stopped(run_dir, position, "while testing")
    scores, targets = kept(outputs, world)
    best = position.best_record
    results = {"status": "completed", "stopped_by": ended or "epochs", "epochs_run": position.epoch, "monitor": key,
               "mode": mode, "best_epoch": best["epoch"], "best_step": best.get("step"),
               "best_val": {k: v for k, v in best.items() if k.startswith("val_")}, "test": test}
    if world.main:
        files = [path for path, _ in data.test.samples] if hasattr(data.test, "samples") else None
        kept_arrays = predictions.arrays(data.task, scores, targets, files)
        predictions.save(run_dir, kept_arrays)
        results["test_ci"] = predictions.intervals(kept_arrays, data.task, metrics.names, cfg.seed)
        if setup["classes"]:
            results["test_per_class"] = predictions.per_class(kept_arrays, setup["classes"])
        log.tested(results, optim.sched.last_epoch)
    return setup | results


def pruned(position: Position, key: str, mode: str, value: float) -> dict:
    """A trial that a tune's pruner stopped after the epoch `position` completed, its `key` at `value`
    (hsci/jobs/tune.py)."""
    best = position.best_record
    report.say(f"pruned after epoch {position.epoch}: {key} {value:.4f} is not promising (the tune's pruner)")
    return {"status": "pruned", "epochs_run": position.epoch, "monitor": key, "mode": mode, "best_epoch": best["epoch"],
            "error": f"pruned by the tune after epoch {position.epoch}",
            "best_val": {k: v for k, v in best.items() if k.startswith("val_")}}


def better(record: dict, best: dict, key: str, mode: str) -> bool:
    """Whether this epoch beats the best so far: a better `key`, or an equal one with a lower validation loss."""
    if not best:
        return True
    if record[key] != best[key]:
        return record[key] > best[key] if mode == "max" else record[key] < best[key]
    return record["val_loss"] < best["val_loss"]


def stopped(run_dir: Path, position: Position, where: str) -> dict:
    """A run stopped by a signal `where` it was (at epoch E, step S: the epoch under way, as the console numbers
    it), and the epochs it completed."""
    name = signal.Signals(interrupt.requested()).name
    return {"status": "interrupted", "epochs_run": position.epoch,
            "error": f"{name} {where} ({position.epoch} epoch{'' if position.epoch == 1 else 's'} complete); resume "
                     f"with: hsci train resume={run_dir}"}
