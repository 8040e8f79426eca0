"""MLflow tracking of a run (`logger=mlflow`): a run in an MLflow experiment with the run's params (the flattened
config), each epoch's record as metrics (step: the epoch), the best epoch's validation values and the test
metrics, the run directory's records and plots as artifacts, and the outcome as the MLflow run's status.

The store is `logger.mlflow.tracking_uri`: a SQLite file (outputs/mlflow/mlflow.db by default, its artifacts next
to it in artifacts/) or a tracking server. The experiment is `logger.mlflow.experiment_name`, else the run's name,
and for the jobs of a sweep, the sweep's folder: one experiment a sweep. summary.json keeps the MLflow run's id
(`mlflow_run_id`), so a resumed run carries on in the same MLflow run. MLflow is imported (seconds) only here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from hsci import UserError
from hsci.record.comparable import flatten

STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "pruned": "KILLED"}  # failed, diverged: FAILED
ARTIFACTS = ("summary.json", "metrics.jsonl", "train.log", ".hydra/config.yaml", ".hydra/overrides.yaml")
AT_ONCE = 100  # MLflow takes at most 100 params (or tags) in one call


def client(uri: str):
    """MLflow's client of the store at `uri` (a SQLite file's folder made when missing)."""
    try:
        from mlflow import MlflowClient
    except ImportError as e:
        raise UserError('logger=mlflow needs MLflow: pip install "hsci[mlflow]"') from e
    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
        os.environ.setdefault(key, value)  # a server that is gone holds the run up for seconds, not minutes
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(uri)


def begin(settings: dict, config: dict, run_dir: Path, summary: dict, sweep: Path | None) -> str:
    """The id of the run's MLflow run: the one summary.json names (a resumed run), set running again, or a new one;
    the run's params logged."""
    from mlflow.entities import Param, RunTag

    c = client(settings["tracking_uri"])
    params = {k: str(v)[:6000] for k, v in flatten(config).items()}  # MLflow's longest value
    run_id = summary.get("mlflow_run_id")
    if run_id and _live(c, run_id):
        c.update_run(run_id, status="RUNNING")
        logged = c.get_run(run_id).data.params
        params, changed = ({k: v for k, v in params.items() if k not in logged},
                           {f"resumed.{k}": v for k, v in params.items() if k in logged and logged[k] != v})
        _batches(c, run_id, [RunTag(k, v) for k, v in changed.items()], "tags")  # an MLflow param never changes
    else:
        name = settings["experiment_name"] or (_relative(sweep) if sweep else config["name"])
        tags = {"run_dir": str(run_dir), **({"mlflow.source.git.commit": summary["git_commit"]}
                                            if summary.get("git_commit") else {}), **settings["tags"]}
        run_id = c.create_run(_experiment(c, name, settings["tracking_uri"]), tags=tags,
                              run_name=settings["run_name"] or run_dir.name).info.run_id
    _batches(c, run_id, [Param(k, v) for k, v in params.items()], "params")
    return run_id


def end(uri: str, run_id: str, run_dir: Path, status: str) -> None:
    """The run directory's records and plots as the MLflow run's artifacts, and its status."""
    c = client(uri)
    for name in ARTIFACTS:
        if (run_dir / name).is_file():
            c.log_artifact(run_id, str(run_dir / name), "config" if name.startswith(".hydra") else None)
    for plot in sorted(run_dir.glob("*.png")):
        c.log_artifact(run_id, str(plot), "plots")
    c.set_tag(run_id, "status", status)
    c.set_terminated(run_id, STATUS.get(status, "FAILED"))


class MLflow:
    """The metrics of one MLflow run, as the loop hands them over."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = client(uri), run_id

    def reading(self, record: dict) -> None:
        pass  # the readings stay in steps.jsonl (and TensorBoard): a call to a server every few steps is not free

    def epoch(self, record: dict, step: int) -> None:
        self._log({k: v for k, v in record.items() if k != "epoch"}, record["epoch"])

    def tested(self, results: dict, step: int) -> None:
        self._log({**{f"best_{k}": v for k, v in results["best_val"].items()},
                   **{f"test_{k}": v for k, v in results["test"].items()}, "best_epoch": results["best_epoch"]},
                  results["epochs_run"])

    def close(self) -> None:
        pass

    def _log(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()
                                                    if isinstance(v, (int, float))])


def _live(c, run_id: str) -> bool:
    """Whether the MLflow run is in the store and not deleted."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _experiment(c, name: str, uri: str) -> str:
    """The id of experiment `name`, made when it is new (a SQLite store's artifacts in artifacts/ next to it)."""
    from mlflow.exceptions import MlflowException

    found = c.get_experiment_by_name(name)
    if found is None:
        where = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts").as_uri() \
            if uri.startswith("sqlite:///") else None
        try:
            return c.create_experiment(name, artifact_location=where)
        except MlflowException as e:  # made this moment by another job of the sweep
            found = c.get_experiment_by_name(name)
            if found is None:
                raise e
    if found.lifecycle_stage != "active":
        raise RuntimeError(f"the MLflow experiment {name!r} is deleted: restore it, or set "
                           "logger.mlflow.experiment_name")
    return found.experiment_id


def _relative(folder: Path) -> str:
    """A sweep's folder as its experiment's name: relative to where hsci was started, when it is inside."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder.resolve())


def _batches(c, run_id: str, items: list, kind: str) -> None:
    for i in range(0, len(items), AT_ONCE):
        c.log_batch(run_id, **{kind: items[i:i + AT_ONCE]})
