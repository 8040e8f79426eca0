"""One run on many processes: starting its ranks, following rank 0, and blaming the rank that failed.

`hsci train trainer.devices=N` starts N ranks with torch.distributed's elastic launcher (hsci/jobs/launch.py),
each loading the config saved in the run directory (`launched`, `as_rank`). `torchrun ... -m hsci train` or a
cluster's tasks start them from outside: rank 0 runs the Hydra app and `lead`s, composing the config and making
the run directory, which it `announce`s; the other ranks `follow`. Every rank then trains its share of each batch
in the same loop (hsci/loop/train.py); what they agree on lives in hsci/parts/world.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import hsci
from hsci import UserError, interrupt, report
from hsci.jobs.launch import Failed, RankFailed, launch
from hsci.loop.step import Diverged
from hsci.loop.train import train
from hsci.parts.world import World, join, key, leave, started_as_rank, store
from hsci.record import rundir
from hsci.record.resume import POSITION


def lead(cfg: DictConfig, config: dict, run_dir: Path, state: dict | None, resumed: bool) -> dict:
    """Rank 0 of ranks started from outside (torchrun, a cluster's tasks): tell the others where the run is, join
    them and train; returns the results for summary.json."""
    announce(run_dir, resumed)
    world = join(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    try:
        return train(cfg, config, run_dir, state, world)
    except Diverged:  # on every rank at once
        raise
    except Exception as e:
        raise rank_failed(e, world, run_dir) from None
    finally:
        leave()


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
    with rank_stops(quiet=True):  # the launcher announces a stop signal itself
        cfg = rundir.load_config(run_dir, [], (), "train")
        world = join(cfg.trainer.device, cfg.trainer.dist_timeout_s)
        take_part(cfg, run_dir, resumed, world)
    if os.getppid() != launcher:  # the launcher was killed: none is left to take this rank's result and end it
        os._exit(0)


def follow() -> None:
    """A rank other than 0 that torchrun or a cluster started with `hsci train ...`: rank 0 composes the config
    and makes the run directory; this rank waits for it, loads the config rank 0 saved there, and takes part."""
    with rank_stops():
        run_dir, resumed = run_of_rank_0()
        if run_dir is None:  # rank 0 refused the run or stopped before it began, and says why
            return
        if not (run_dir / ".hydra" / "config.yaml").is_file():
            raise UserError(f"rank {os.environ['RANK']} cannot see rank 0's run directory {run_dir}: put it on a "
                            "filesystem every node shares (hydra.run.dir=/shared/...)")
        cfg = rundir.load_config(run_dir, [], (), "train")
        take_part(cfg, run_dir, resumed, join(cfg.trainer.device, cfg.trainer.dist_timeout_s))


def take_part(cfg: DictConfig, run_dir: Path, resumed: bool, world: World) -> None:
    """A rank's part of the run: the training, on its share of the data. Rank 0 (under the elastic launcher)
    writes the results into summary.json; a rank that fails logs its traceback and ends, which stops the rest."""
    rank_logging(world, run_dir / "train.log")
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
        leave()
    if world.main:
        path = run_dir / "summary.json"
        rundir.write_json(path, json.loads(path.read_text()) | results)


def rank_stops(quiet: bool = False):
    """A rank's stop signals, from its start: the first is recorded (all ranks stop at the same step), the rest
    ignored, for the launcher to end the ranks at once. In a submitit job, submitit's preemption signal stops a
    rank and SIGTERM is ignored, as submitit has it. `quiet`: the rank does not announce the signal."""
    preempt = interrupt.preemption()
    if preempt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return interrupt.caught(again_at_once=False, stops=(signal.SIGINT, signal.SIGHUP, preempt), quiet=quiet)
    return interrupt.caught(again_at_once=False, quiet=quiet)


def rank_failed(e: Exception, world: World, run_dir: Path) -> RankFailed:
    """This rank's error, logged with its traceback; raised as the run's (the error of the first rank to fail).
    A rank that gave up waiting for the others says so: the rank that hangs is another."""
    if "timed out" in str(e).lower():  # gloo's and NCCL's words for a collective that waited past its timeout
        report.log.exception("gave up waiting for the other processes")
        return RankFailed(world.blame(
            f"waited {world.timeout_s:g} s (trainer.dist_timeout_s) for the other processes in an exchange: one of "
            f"them hangs or is far slower (its traceback, if it has one, is in {run_dir / 'train.log'})"))
    return RankFailed(world.blame(report.described(e, run_dir / "train.log")))


def rank_logging(world: World, log_file: Path) -> None:
    """A worker's output: rank 0 logs to the run's train.log as the launcher does and prints as a single run
    would; every other rank is silent, save for warnings and errors, which go to train.log under its rank."""
    prefix = "" if world.main else f"[rank {world.rank}] "
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = logging.INFO if world.main else logging.WARNING
    root.setLevel(level)
    handler.setLevel(level)  # what other loggers pass up, too (submitit's, at INFO)
    if not world.main:
        logging.captureWarnings(True)
        quiet = open(os.devnull, "w")
        report.console.file = report.errors.file = quiet
        sys.stdout = sys.stderr = quiet


def cluster_tasks() -> bool:
    """Whether this job runs as several tasks of a cluster job that submitit started (nodes, or tasks per node):
    then each task is a rank, and submitit's own account of them is exported as torch.distributed reads it
    (RANK, WORLD_SIZE, MASTER_ADDR ...), each task keeping every GPU of its node in sight."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    import submitit

    if submitit.JobEnvironment().num_tasks == 1:
        return False
    if not started_as_rank():
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def announce(run_dir: Path | None, resumed: bool = False) -> None:
    """Rank 0 (of ranks started from outside: torchrun, a cluster): tell the others the run directory it made
    and whether the run carries on from its last.pt; or None, that there is no run for them (rank 0 refused it,
    or stopped first, and says why). Said once: later calls change nothing."""
    if not _announced:
        _announced.append(run_dir)
        store().set(key("run_dir"), json.dumps({"run_dir": run_dir and str(run_dir), "resumed": resumed}))


_announced: list = []


def run_of_rank_0() -> tuple[Path | None, bool]:
    """The run directory rank 0 made, and whether it resumes (waiting until rank 0 says): its saved config tells
    the other ranks what to build. None: there is no run to take part in."""
    said = json.loads(store().get(key("run_dir")).decode())
    return said["run_dir"] and Path(said["run_dir"]), said["resumed"]
