"""A sweep (`hsci train -m ...`): each job runs as it would alone, whichever launcher runs it, and when the
sweep ends every job's outcome is summarised, best first.

Hydra's launchers may run jobs in processes of their own: joblib in worker processes that it reuses from job
to job, submitit in a job per process (on this machine or on a cluster's nodes), which it requeues when the
cluster preempts it or its time runs out. A job in such a process gets, for as long as it runs, what a run
alone has: hsci's stop handling (hsci/interrupt.py), and on the sweep's machine the CPU threads of a run
alone. A job that submitit's preemption signal stopped saves its place like any stopped run, and is then
handed back to submitit to requeue: it carries on from its last.pt in its own folder (hsci/record/owner.py).
"""

import atexit
import csv
import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

import hsci
from hsci import interrupt, report
from hsci.analysis.found import assignments, numeric_axes

# The job that runs in this process: what it changed (undone when it ends), and, once submitit's preemption
# signal stopped it, submitit's own handler, which requeues it.
_undo = ExitStack()
_requeue: Callable[[], None] | None = None
_jobs_run = 0  # jobs this process started


class SweepSummary(Callback):
    """Hydra callback: each job runs as it would alone (see above); when the sweep ends, reads each job's
    summary.json, prints a table, writes sweep_summary.{csv,json}.

    The command exits non-zero when any job did not complete: 128 + the signal's number after a stop signal.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import torch  # imported already: the sweep's keys were checked by importing its builders

        # Where the sweep runs. A launcher that runs a job in another process sends this callback along with
        # it, and the job compares itself with these.
        self.pid, self.host, self.threads = os.getpid(), socket.gethostname(), torch.get_num_threads()
        # Hydra skips on_multirun_end when a launcher or sweeper fails (submitit: a job cancelled or killed, which
        # left no result; Optuna: no trial completed): the summary is written at exit then.
        atexit.register(summarise, Path(config.hydra.sweep.dir))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _jobs_run
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        import torch

        _jobs_run += 1
        if _jobs_run > 1:  # a process that ran a job before: this one's start-up counts from here
            hsci.STARTED = time.time()
        if socket.gethostname() == self.host and torch.get_num_threads() != self.threads:
            # joblib starts its workers with a share of the cores (OMP_NUM_THREADS): sums over another number of
            # threads add up in another order, and the job would end with other weights than it would alone.
            _undo.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(self.threads)
        if os.getpid() != self.pid and threading.current_thread() is threading.main_thread():
            _stop_handling()  # the sweep's own process has had it since it started

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _requeue
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        _undo.close()
        requeue, _requeue = _requeue, None
        if requeue and _status(Path(config.hydra.runtime.output_dir)) == "interrupted":
            requeue()  # submitit saves the job's call to run again, requeues it and ends this process

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(summarise)
        rows = summarise(Path(config.hydra.sweep.dir))
        if any(row["status"] != "completed" for row in rows):
            report.error(f"{sum(row['status'] != 'completed' for row in rows)} of {len(rows)} jobs did not complete")
            sys.exit(interrupt.exit_code() if interrupt.requested() else 1)


def summarise(sweep_dir: Path) -> list[dict]:
    """Every job of the sweep as a row, best first (or in the order of the one numeric value swept, the best
    marked): printed, and written to sweep_summary.{csv,json}; then, where a configuration ran several seeds, each
    configuration's mean and interval over its seeds, best first."""
    rows = sorted((job_row(d) for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()), key=rank)
    if not rows:
        return rows
    from hsci.analysis import plots  # these import NumPy, torch: kept out of start-up, where Hydra makes this callback
    from hsci.record import rundir

    if rows[0]["status"] == "completed":
        rows[0]["best"] = "*"
    axes = numeric_axes([assignments(row["overrides"].split()) for row in rows])
    if len(axes) == 1 and len(varying(rows)) == 1:  # one value swept (besides the seed), a number: in its order
        rows.sort(key=lambda row: float(assignments(row["overrides"].split())[axes[0]]))
    axis = axes[0] if len(axes) == 1 and len(varying(rows)) == 1 else None
    groups = by_config(sweep_dir)
    rundir.write_json(sweep_dir / "sweep_summary.json", {"jobs": rows} | ({"configs": groups} if groups else {}))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    report.sweep_table(rows, str(sweep_dir / "sweep_summary.csv"), f"ordered by {axis}" if axis else "best first")
    metric = next((k for row in rows for k in row if k.startswith("best_val")), None)
    try:
        drawn = plots.draw_sweep(sweep_dir, rows, metric) if metric else None
    except Exception as e:  # a plot is never worth a sweep's outcome
        drawn = None
        report.console.print(f"note: the sweep's plot was not drawn ({type(e).__name__}: {e})", markup=False)
    if drawn:
        report.console.print(f"sweep plot: {drawn}", markup=False, soft_wrap=True)
    if groups:
        report.rows_table(groups, f"by configuration over its seeds: {groups[0]['metric']}, best mean first",
                          numbers=("n", "mean", "95% CI", "std", "min", "max", "test mean"))
    return rows


def varying(rows: list[dict]) -> list[str]:
    """The keys besides the seed whose values differ from job to job."""
    each = [assignments(row["overrides"].split()) for row in rows]
    return [k for k in sorted({k for a in each for k in a}) if k != "seed" and len({a.get(k) for a in each}) > 1]


def by_config(sweep_dir: Path) -> list[dict]:
    """Where some configuration ran several seeds: each configuration's mean of the monitored validation value
    over its seeds, with its interval (hsci/analysis/stats.py), best first; and its mean test value."""
    from hsci import UserError
    from hsci.analysis.compare import compare
    from hsci.analysis.found import find

    runs, _ = find([str(sweep_dir)])
    done = [run for run in runs if run.status == "completed" and run.summary.get("monitor")]
    if not done:
        return []
    monitor = done[0].summary["monitor"].removeprefix("val_")
    try:
        val, test = compare(done, f"val.{monitor}"), compare(done, f"test.{monitor}")
    except UserError:  # runs on different test splits (a sweep over the split): no configuration means
        return []
    if all(g["n"] < 2 for g in val["groups"]):
        return []
    test_means = {g["label"]: g["mean"] for g in test["groups"]}
    ranked = sorted(val["groups"], key=lambda g: -g["mean"] if val["higher_is_better"] else g["mean"])
    return [{"config": g["label"], "metric": val["metric"], "n": g["n"], "mean": g["mean"],
             "95% CI": f"{g['ci_low']:.4f} to {g['ci_high']:.4f}" if g["ci_low"] is not None else "-",
             "std": g["std"], "min": g["min"], "max": g["max"], "test mean": test_means.get(g["label"])}
            for g in ranked]


def job_row(job_dir: Path) -> dict:
    """One job as a flat row: overrides, status, best validation metric, test metrics, duration."""
    try:
        s = json.loads((job_dir / "summary.json").read_text())
    except (OSError, ValueError):
        s = {"status": "failed", "error": "no readable summary.json"}
    row = {"job": job_dir.name, "overrides": " ".join(s.get("overrides", [])), "status": s["status"]}
    if s.get("monitor"):
        row[f"best_{s['monitor']}"] = s["best_val"][s["monitor"]]
        row["mode"] = s["mode"]
    row |= {f"test_{k}": v for k, v in s.get("test", {}).items()}
    row |= {"duration_s": s.get("duration_s"), "error": s.get("error", ""), "run_dir": str(job_dir)}
    return row


def rank(row: dict) -> tuple:
    """Completed jobs first, best validation metric first; then the rest by job number."""
    best = next((v for k, v in row.items() if k.startswith("best_")), None)
    if row["status"] != "completed" or best is None:
        number = row["job"].split("_")[0]  # <number>_<what the job varies>
        return (1, 0.0, int(number) if number.isdigit() else 0)
    return (0, -best if row["mode"] == "max" else best, 0)


def _stop_handling() -> None:
    """hsci's stop signals (hsci/interrupt.py) for the job that runs in this process, a launcher's: the job stops
    after a step, saves its place and is recorded as interrupted. In a submitit job SIGTERM stays submitit's
    (ignored: SLURM sends it to a job it preempts, before the preemption signal, and to one it requeues), and
    the preemption signal (SIGUSR2, or $SUBMITIT_PREEMPT_SIGNAL) stops the job in the same way; then, if its
    run did not complete, `on_job_end` lets submitit's own handler requeue it."""
    term = signal.getsignal(signal.SIGTERM)
    _undo.enter_context(interrupt.caught())
    preempt = interrupt.preemption()
    if preempt is None:
        return
    signal.signal(signal.SIGTERM, term)
    submitit_handler = signal.getsignal(preempt)
    if not callable(submitit_handler):
        return

    def preempted(signum: int, frame) -> None:
        global _requeue
        if not interrupt.received:
            sys.stderr.write(f"\n{signal.Signals(signum).name}: preempted or out of time: stopping after this step "
                             "and saving; submitit requeues the job and it carries on from there\n")
        interrupt.received.append(signum)
        _requeue = partial(submitit_handler, signum, None)

    signal.signal(preempt, preempted)
    _undo.callback(signal.signal, preempt, submitit_handler)


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None
