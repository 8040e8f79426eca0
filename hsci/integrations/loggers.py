"""The loggers a run chose, as one object the loop calls (`Loggers`): each reading (hsci/loop/step.py's Readings),
each epoch's record and the test of the best checkpoint go to every logger at once, on rank 0 only. The job
(hsci/jobs/job.py) makes the MLflow run before training (`begin`) and ends it with the run's outcome (`end`).

A logger never costs the run: one that fails (a server gone, a disk full) is a warning in train.log and is switched
off for the rest of the run; the run's own records (metrics.jsonl, summary.json) are whole either way. It reads
only what the loop has already read off the device.
"""

from __future__ import annotations

import atexit
import json
from pathlib import Path

from hsci import UserError, flat, report
from hsci.record.comparable import flatten

NAMES = {"tensorboard": "TensorBoard", "mlflow": "MLflow"}
_open: list[Loggers] = []  # this process's, closed by `end` (or at exit: a rank the launcher started)


class Loggers:
    """The chosen loggers of one run, by name; calls go to each, and one that raises is switched off."""

    def __init__(self, loggers: dict | None = None):
        self.on, self.failed = dict(loggers or {}), set()

    def __bool__(self) -> bool:
        return bool(self.on)

    def reading(self, record: dict) -> None:
        """A line of steps.jsonl."""
        self._each("reading", record)

    def epoch(self, record: dict, step: int) -> None:
        """A line of metrics.jsonl, `step` optimizer steps into the run."""
        self._each("epoch", record, step)

    def tested(self, results: dict, step: int) -> None:
        """A completed run's results (its `test` metrics), at its last step."""
        self._each("tested", results, step)

    def close(self) -> None:
        self._each("close")
        self.on.clear()

    def _each(self, method: str, *args) -> None:
        for name, logger in list(self.on.items()):
            try:
                getattr(logger, method)(*args)
            except Exception as e:
                del self.on[name]
                self.failed.add(name)
                warn(name, e)
                try:
                    logger.close()
                except Exception:
                    pass


def warn(name: str, e: Exception) -> None:
    """A logger that failed: a warning in train.log and on the console; the run goes on."""
    line = (f"{NAMES[name]} stopped logging this run: {type(e).__name__}: {flat(e)} (the run goes on; its own "
            "records are whole)")
    report.log.warning(line)
    report.console.print(f"warning: {line}", markup=False, soft_wrap=True)


def chosen(config: dict) -> dict:
    """The chosen loggers' settings by name (`logger=[tensorboard,mlflow]`): {} when none."""
    return {name: settings for name, settings in (config.get("logger") or {}).items() if settings is not None}


def opened(config: dict, run_dir: Path, step: int) -> Loggers:
    """The loggers `config` chose, for rank 0 of a run that starts, or carries on after `step` optimizer steps;
    MLflow logs to the run `begin` made (summary.json's `mlflow_run_id`), and not at all when it made none."""
    settings, loggers = chosen(config), {}
    for name in settings:
        try:
            if name == "tensorboard":
                from hsci.integrations.tensorboard import TensorBoard

                loggers[name] = TensorBoard(run_dir, settings[name], step, flatten(config))
            if name == "mlflow":
                run_id = json.loads((run_dir / "summary.json").read_text()).get("mlflow_run_id")
                if run_id:
                    from hsci.integrations.mlflow import MLflow

                    loggers[name] = MLflow(settings[name]["tracking_uri"], run_id)
        except UserError:  # its package is missing (checked before the run began, unless a sweep varied it)
            raise
        except Exception as e:
            warn(name, e)
    log = Loggers(loggers)
    if log:
        _open.append(log)
        atexit.unregister(_close_all)  # once, however many runs this process makes
        atexit.register(_close_all)
    return log


def begin(config: dict, run_dir: Path, summary: dict, sweep: Path | None) -> dict:
    """Before training, in the process that owns the run: the MLflow run, made (in the experiment of a sweep's jobs
    when `sweep` is its folder) or taken up again on resume, with the run's params. Returns what summary.json keeps
    of it: {"mlflow_run_id": ...}, or {} without MLflow (or when it failed: a warning)."""
    settings = chosen(config).get("mlflow")
    if not settings:
        return {}
    from hsci.integrations import mlflow

    try:
        return {"mlflow_run_id": mlflow.begin(settings, config, run_dir, summary, sweep)}
    except UserError:
        raise
    except Exception as e:
        warn("mlflow", e)
        return {}


def end(config: dict, run_dir: Path, summary: dict) -> None:
    """After the run and its plots: this process's loggers closed; the MLflow run given the run directory's
    records as artifacts and its status (completed: FINISHED; failed, diverged: FAILED; interrupted, pruned:
    KILLED)."""
    failed = set()
    while _open:
        log = _open.pop()
        log.close()
        failed |= log.failed
    settings, run_id = chosen(config).get("mlflow"), summary.get("mlflow_run_id")
    if not settings or not run_id or "mlflow" in failed:
        return
    try:
        from hsci.integrations import mlflow

        mlflow.end(settings["tracking_uri"], run_id, run_dir, summary["status"])
    except Exception as e:
        warn("mlflow", e)


def _close_all() -> None:
    while _open:
        _open.pop().close()
