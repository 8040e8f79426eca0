"""The loop of `hsci train`: build the experiment from its config, train and validate every epoch, keep the best
checkpoint, test it.

The loop is plain code: no trainer class, no callbacks. `train` builds the parts (hsci/parts/build.py) and runs
the epochs, each through hsci/loop/step.py's `train_epoch`, which holds the step. A run stopped by a signal saves
the exact point it reached (hsci/record/resume.py), and `resume=` carries on from it bit for bit. Every rank of a
run on several processes runs this same loop on its share of the data (hsci/jobs/ranks.py starts them); how a
job comes in and how its outcome is recorded is hsci/jobs/job.py's.
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
from hsci.loop.step import (DIVERGED_HINT, Diverged, Epoch, Readings, peak_memory_gb, reset_peak_memory, train_epoch,
                            warm_up)
from hsci.parts.build import build, optimizing
from hsci.parts.finetune import freeze_backbone, frozen_at, head
from hsci.parts.loaders import Timed, dropped, start_epoch
from hsci.parts.world import SINGLE, World
from hsci.record import predictions, rundir, weights
from hsci.record.comparable import class_names, comparable
from hsci.record.kept import Kept
from hsci.record.resume import Position, checkpoint, restore

STEPS = "steps.jsonl"  # a line per reading (see Readings)
# A tune's pruner (hsci/jobs/tune.py), asked after each epoch with its number and monitored validation value whether
# to stop the run there; None outside a tune, whose trials run in one process.
judge: Callable[[int, float], bool] | None = None


def train(cfg: DictConfig, config: dict, run_dir: Path, state: dict | None = None, world: World = SINGLE) -> dict:
    """Train and validate every epoch, keep the best checkpoint, test it; returns the results for summary.json.

    `state` (a last.pt) puts the run back where it stopped; `config` is `cfg` as plain values. Every rank of
    `world` runs this on its share of the data; rank 0 alone writes the run directory (`world.main`).
    """
    report.config(config, OmegaConf.to_yaml(config))
    cfg = dev_run(cfg)  # trainer.fast_dev_run: a few batches of each stage
    parts = build(cfg, world=world, restoring=state is not None)  # a resumed run's weights are in its checkpoint
    started_from = None if state else weights.start_from(parts.model, cfg)  # model.weights or init_from, if set
    trainer, data = cfg.trainer, parts.data
    steps = min(len(parts.loaders.train), trainer.limit_batches or len(parts.loaders.train))
    optim = optimizing(cfg, parts, epochs=trainer.epochs, steps_per_epoch=steps)
    metrics = Metrics(data.task, data.num_outputs, parts.device)
    key, mode = monitor(trainer.monitor, data.task, metrics)
    saved = Kept(run_dir / "checkpoints", run_dir / "metrics.jsonl", key, mode, trainer.save_top_k,
                 trainer.save_every_n_epochs)
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
    stepping = replace(parts, model=world.wrap(parts.model, parts.device))  # the step runs DDP's model
    size = sum(weights.numel() for weights in parts.model.parameters())
    how = ("device", "precision", "channels_last", "loader", "compile_s")  # then the processes, and anything else
    for line in (f"{size:,} parameters  train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}  "
                 f"startup_s {setup['startup_s']}", "  ".join(f"{k} {setup[k]}" for k in how),
                 "  ".join(f"{k} {v}" for k, v in setup.items() if k not in (*how, "startup_s")), f"run dir {run_dir}"):
        report.say(line)  # short lines, each `key value` as summary.json has it
    show_layers(parts.model, trainer.summary_depth)
    left, n = dropped(parts.loaders.train)
    if left and steps == len(parts.loaders.train):  # not when trainer.limit_batches ends the epoch before
        report.say(f"note: each epoch leaves out {left} of the {n} training samples, its incomplete last batch "
                   "(drawn anew each epoch); data.drop_last=false keeps it")
    setup |= {"weights_from": started_from} if started_from else {}
    setup |= {"classes": class_names(data), "comparable": comparable(config, data) if world.main else None}
    if data.task != "regression" and 0 < len(data.test) <= 100:
        report.say(f"note: the test split holds {len(data.test)} examples: one of them moves accuracy by "
                   f"{100 / len(data.test):.2g} points")
    watch = Watch(trainer, run_dir if world.main else None, parts.device)  # detect_anomaly, profile

    while position.epoch < trainer.epochs:
        if trainer.early_stop_patience and position.stale >= trainer.early_stop_patience:
            report.say(f"early stop: no better {key} for {position.stale} epochs")
            break
        epoch = Epoch.after(position, steps, parts.device)
        if cfg.model.get("freeze") and freeze_backbone(parts.model, freeze(epoch.number)):  # thawed from this epoch
            stepping = replace(parts, model=world.wrap(parts.model, parts.device))
            report.say(f"epoch {epoch.number}: the backbone trains from here on")
        start_epoch(parts.loaders.train, epoch.number, epoch.step)
        batches = Timed(parts.loaders.train)
        reset_peak_memory(parts.device)
        lr, start = optim.opt.param_groups[0]["lr"], time.perf_counter()
        with (report.epoch_progress(epoch.number, trainer.epochs, epoch.step, steps) as progress,
              watch.epoch(epoch, batches) as watched):
            readings = Readings(trainer.log_every, epoch, run_dir / STEPS if world.main else None, progress, world,
                                log)
            stop = train_epoch(stepping, optim=optim, batches=watched, epoch=epoch, readings=readings)
        epoch_s = time.perf_counter() - start
        loss_sum = world.mean(epoch.loss_sum).item()  # over every rank's share
        world.same_buffers(parts.model)
        val = None if stop else evaluate(parts, parts.loaders.val, metrics)
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
            log.epoch(record, optim.sched.last_epoch)
            saved.save(checkpoint(parts, optim, position, config, world), epoch.number, improved)
        if judge is not None and judge(epoch.number, record[key]):
            report.say(f"pruned after epoch {epoch.number}: {key} {record[key]:.4f} is not promising (the tune's "
                       "pruner)")
            best = position.best_record
            return setup | {"status": "pruned", "epochs_run": position.epoch, "monitor": key, "mode": mode,
                            "best_epoch": best["epoch"], "error": f"pruned by the tune after epoch {epoch.number}",
                            "best_val": {k: v for k, v in best.items() if k.startswith("val_")}}

    world.barrier()  # rank 0 has written best.pt
    best_state = rundir.load_checkpoint(run_dir / "checkpoints" / "best.pt")
    rundir.load_weights(parts.model, best_state["model"], run_dir / "checkpoints" / "best.pt")
    outputs = []
    test = evaluate(parts, parts.loaders.test, metrics, outputs)
    if test is None:
        return setup | stopped(run_dir, position.epoch, "while testing")
    scores, targets = kept(outputs, world)
    best = position.best_record
    results = {"status": "completed", "epochs_run": position.epoch, "monitor": key, "mode": mode,
               "best_epoch": best["epoch"], "best_val": {k: v for k, v in best.items() if k.startswith("val_")},
               "test": test}
    if world.main:
        files = [path for path, _ in data.test.samples] if hasattr(data.test, "samples") else None
        kept_arrays = predictions.arrays(data.task, scores, targets, files)
        predictions.save(run_dir, kept_arrays)
        results["test_ci"] = predictions.intervals(kept_arrays, data.task, metrics.names, cfg.seed)
        if setup["classes"]:
            results["test_per_class"] = predictions.per_class(kept_arrays, setup["classes"])
        log.tested(results, optim.sched.last_epoch)
    return setup | results


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
