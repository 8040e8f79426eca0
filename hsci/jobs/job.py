"""One job of `hsci train`, as Hydra hands it over (`main`): a new run or a resumed one, trained in this process,
in the ranks that `trainer.devices` asks for, or as rank 0 of ranks started from outside; and its outcome,
recorded in summary.json whatever it is (`record`)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hsci import UserError, interrupt, report
from hsci.analysis import plots
from hsci.integrations import loggers
from hsci.jobs import ranks
from hsci.loop.debug import passed
from hsci.loop.step import Diverged
from hsci.loop.train import train
from hsci.parts.build import count_devices
from hsci.parts.keys import check_keys, check_loggers
from hsci.parts.world import started_as_rank
from hsci.record import rundir
from hsci.record.owner import requeued
from hsci.record.resume import reopen

# What summary.json says of a run's outcome: cleared when a resume sets it running again.
RESULTS = ("error", "device", "precision", "channels_last", "loader", "compile_s", "startup_s", "world_size", "nodes",
           "backend", "classes", "comparable", "stopped_by", "epochs_run", "monitor", "mode", "best_epoch", "best_step",
           "best_val", "test", "test_ci", "test_per_class")


def main(cfg: DictConfig, changes: list[str] = (), source: str | None = None) -> float | None:
    """Run (or resume) one training job and record its outcome; a single run exits non-zero unless it completed.
    `source`: the run whose saved config this one started from (`hsci train from=`). Returns the best value of the
    monitored validation metric (what sweepers that optimise read), or None."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # Started as a rank (torchrun), or a task of a cluster job on several: rank 0 runs the job, the others follow.
    as_rank = started_as_rank() or hydra_cfg.mode == RunMode.MULTIRUN and ranks.cluster_tasks()
    if as_rank and int(os.environ["RANK"]):
        return ranks.follow()
    try:
        return record(cfg, changes, hydra_cfg, run_dir, source)
    finally:
        if as_rank:  # a job that ends before its ranks meet (refused, stopped, done already): the others end too
            ranks.announce(None)


def record(cfg: DictConfig, changes: list[str], hydra_cfg, run_dir: Path, source: str | None = None) -> float | None:
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
            check_loggers(cfg)  # a logger's package that has gone since
        except UserError as e:  # refused before anything in the run directory changed
            report.log.error("resume refused: %s", e)
            return finish({"status": "failed", "error": str(e)}, hydra_cfg)
    else:
        state = None
        summary = {"name": cfg.name, "run_dir": str(run_dir), "seed": cfg.seed, "tags": list(cfg.tags),
                   **({"from": source} if source else {}), "overrides": list(hydra_cfg.overrides.task),
                   "started": rundir.now(), "versions": rundir.versions(),
                   "git_commit": rundir.git_commit(Path(hydra_cfg.runtime.cwd))}
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
        sweep = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
        if not cfg.trainer.get("fast_dev_run"):  # a quick check makes no MLflow run
            summary |= loggers.begin(config, run_dir, summary, sweep)  # the MLflow run, new or taken up again
        rundir.write_json(run_dir / "summary.json", summary)  # with its id, for the loop
        summary |= run(cfg, config, run_dir, state, resumed)
    except Diverged as e:
        summary |= {"status": "diverged", "error": str(e)}
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, the last checkpoint stays
        interrupt.taken_up()
        summary |= {"status": "interrupted", "error": f"stopped at once; resume with hsci train resume={run_dir}"}
    except Exception as e:
        summary |= {"status": "failed", "error": report.described(e, run_dir / "train.log")}
    except BaseException as e:  # SystemExit from a library, or worse: recorded, then on its way
        summary |= {"status": "failed", "error": f"ended by {type(e).__name__}({e}) before it completed"}
        report.log.exception(summary["error"])
        raise
    finally:
        summary["duration_s"] = round(summary.get("duration_s", 0) + time.time() - start, 3)
        rundir.write_json(run_dir / "summary.json", summary)
        if not cfg.trainer.get("fast_dev_run"):  # a quick check draws nothing
            draw(run_dir)
        loggers.end(config, run_dir, summary)  # the MLflow run's artifacts (the plots too) and status
    if summary["status"] == "completed" and cfg.trainer.get("fast_dev_run"):
        return passed(run_dir, summary)
    finish(summary, hydra_cfg)
    return summary["best_val"][summary["monitor"]] if summary["status"] == "completed" else None


def draw(run_dir: Path) -> None:
    """The run's plots (hsci/analysis/plots.py), after its training; one that fails is a warning in train.log."""
    try:
        plots.draw_run(run_dir)
    except Exception as e:
        report.log.warning("plots not drawn: %s: %s", type(e).__name__, e)


def run(cfg: DictConfig, config: dict, run_dir: Path, state: dict | None, resumed: bool) -> dict:
    """Train in this process, as rank 0 of ranks started from outside, or in the `trainer.devices` ranks that the
    elastic launcher starts; returns the results for summary.json."""
    if started_as_rank():  # torchrun's rank 0; the other ranks follow
        return ranks.lead(cfg, config, run_dir, state, resumed)
    devices = count_devices(cfg.trainer.devices, cfg.trainer.device)
    return ranks.launched(run_dir, devices, resumed) if devices > 1 else train(cfg, config, run_dir, state)


def finish(summary: dict, hydra_cfg) -> None:
    """Show the outcome. A single run exits non-zero unless it completed; a sweep goes on to its next job."""
    if summary["status"] == "completed":
        return report.final(summary)
    if summary["status"] == "pruned":  # a tune's trial that its pruner stopped: the tune goes on
        return report.say(f"run pruned: {summary['error']}; run directory: {summary['run_dir']}")
    status = summary["status"]
    message = summary["error"] if status == "failed" else f"run {status}: {summary['error']}"
    if status != "failed":  # a failure was logged with its traceback
        report.log.error(message)
    report.error(message)
    if hydra_cfg.mode == RunMode.RUN:
        sys.exit(interrupt.exit_code() if interrupt.requested() and status != "failed" else 1)
