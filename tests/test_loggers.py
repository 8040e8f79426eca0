"""Loggers (`logger=tensorboard`, `logger=mlflow`, both): what a run writes there, read back with each tool's own
reader (TensorBoard's event accumulator, MLflow's client); a resumed run and a sweep; a logger whose package is
missing or whose key is wrong, refused before any work; a logger that fails, a warning and never a lost run."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest

import conftest
from conftest import hsci, job_folder, once, summary_of
from hsci.loop import train as loop

RUN = ["experiment=smoke", "trainer.limit_batches=2"]  # 2 epochs of 2 steps, a reading at each


def run_dirs(cwd: Path) -> list[Path]:
    """The single runs under cwd/outputs/<date>/ (not MLflow's store, outputs/mlflow/)."""
    return [run for run in conftest.run_dirs(cwd) if run.parent.name != "mlflow"]


def events(run: Path):
    """The run's TensorBoard events, as TensorBoard reads its folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, pytest.approx(e.value, rel=1e-5)) for e in accumulator.Scalars(tag)]


def mlflow_client(cwd: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{cwd.resolve()}/outputs/mlflow/mlflow.db")


def records(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


@pytest.fixture(scope="session")
def logged(tmp_path_factory) -> Path:
    """One finished smoke run with both loggers, made once for the tests that only read it."""

    def make(cwd: Path) -> dict:
        result = hsci("train", *RUN, "logger=[tensorboard,mlflow]", cwd=cwd)
        assert result.returncode == 0, result.stderr
        [run] = run_dirs(cwd)
        return {"run": str(run)}

    return Path(once(tmp_path_factory, "logged", make)["run"])


def test_tensorboard_holds_each_reading_each_epoch_and_the_hyperparameters_with_the_test_in_one_run(logged):
    board = events(logged)
    steps, epochs, summary = records(logged, "steps.jsonl"), records(logged, "metrics.jsonl"), summary_of(logged)
    assert scalars(board, "step/train_loss") == [(r["step"], r["train_loss"]) for r in steps]
    assert scalars(board, "step/lr") == [(r["step"], r["lr"]) for r in steps]
    ends = [r["step"] for r in steps if r["step"] % 2 == 0]  # each epoch's last step (2 steps an epoch)
    for key in epochs[0]:
        tag = "epoch" if key == "epoch" else f"epoch/{key}"
        assert scalars(board, tag) == [(end, r[key]) for end, r in zip(ends, epochs)], key
    assert scalars(board, "test/acc") == [(ends[-1], summary["test"]["acc"])]
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = board.PluginTagToContent("hparams")
    started = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert started.session_start_info.hparams["optimizer.lr"].number_value == pytest.approx(1e-3)
    assert started.session_start_info.hparams["model._target_"].string_value == "hsci.models.cnn"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {f"test/{k}" for k in summary["test"]}
    # One run: the events lie in the run directory itself, none in a time-stamped sub-run.
    assert [p.parent for p in logged.rglob("events.out.tfevents.*")] == [logged]


def test_mlflow_holds_the_params_each_epoch_the_test_the_records_and_the_outcome(logged):
    summary, epochs = summary_of(logged), records(logged, "metrics.jsonl")
    client = mlflow_client(logged.parents[2])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert run.info.run_name == logged.name and run.data.tags["run_dir"] == str(logged)
    assert client.get_experiment(run.info.experiment_id).name == "digits_cnn"  # the run's name
    assert run.data.params["optimizer.lr"] == "0.001" and run.data.params["trainer.limit_batches"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r["val_acc"])) for r in epochs]
    assert run.data.metrics["test_acc"] == pytest.approx(summary["test"]["acc"])
    assert run.data.metrics["best_epoch"] == summary["best_epoch"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "train.log", "config", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/curves.png",
                                                                                 "plots/confusion.png"}
    assert "config/config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    local = Path(client.download_artifacts(run.info.run_id, "summary.json"))
    assert json.loads(local.read_text())["status"] == "completed"
    assert not [k for k in summary["comparable"]["config"] if k.startswith("logger")]  # not what the run is


@pytest.mark.parametrize("logger, package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_logger_whose_package_is_missing_is_refused_before_any_work_naming_the_pip_command(
        logger, package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # `import mlflow` raises ImportError, as when not installed
    result = hsci("train", *RUN, f"logger={logger}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f'error: logger={logger} needs the {package} package: pip install "hsci[{logger}]"\n'
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args, message", [
    (["logger=tensorboard", "+logger.tensorboard.flush_sec=5"],
     "logger.tensorboard.flush_sec is not a setting of the tensorboard logger: did you mean "
     "logger.tensorboard.flush_secs? (its settings: flush_secs)"),
    (["logger=tensorboard", "logger.tensorboard.foo=1"], "logger.tensorboard.foo is not a key of this config (given "
                                                         "on the command line as logger.tensorboard.foo=1): check its "
                                                         "spelling (the keys of logger.tensorboard: flush_secs)"),
    (["logger=tensorbord"], "Could not find 'logger/tensorbord'"),
    (["logger=tensorboard", "logger.tensorboard.flush_secs=0"], "logger.tensorboard.flush_secs=0 is invalid"),
])
def test_a_wrong_logger_key_or_option_is_refused_before_any_work(args, message, tmp_path):
    result = hsci("train", *RUN, *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


def stop_after_epoch(number: int):
    """A stop signal after epoch `number` (through the hook a tune's pruner uses): the run stops in the next."""
    def judge(epoch: int, value: float) -> bool:
        if epoch == number:
            os.kill(os.getpid(), signal.SIGINT)
        return False

    return judge


@pytest.mark.slow
def test_a_resumed_run_carries_on_in_the_same_tensorboard_folder_and_mlflow_run(tmp_path, monkeypatch):
    args = [*RUN, "trainer.epochs=3", "trainer.limit_batches=3", "logger=[tensorboard,mlflow]"]
    monkeypatch.setattr(loop, "judge", stop_after_epoch(1))
    assert hsci("train", *args, cwd=tmp_path).returncode != 0
    [run] = run_dirs(tmp_path)
    client, run_id = mlflow_client(tmp_path), summary_of(run)["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "KILLED"  # interrupted
    stopped_at = max(r["step"] for r in records(run, "steps.jsonl"))
    assert scalars(events(run), "step/train_loss")[-1][0] == stopped_at  # epoch 2 had begun

    monkeypatch.setattr(loop, "judge", None)
    result = hsci("train", f"resume={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = summary_of(run)
    assert summary["mlflow_run_id"] == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2, 3]
    board = events(run)  # both sessions' event files, as one run: what the resume redid, once
    assert scalars(board, "step/train_loss") == [(r["step"], r["train_loss"]) for r in records(run, "steps.jsonl")]
    assert [s for s, _ in scalars(board, "epoch/val_acc")] == [3, 6, 9]
    assert scalars(board, "test/acc") == [(9, summary["test"]["acc"])]


@pytest.mark.slow
def test_a_sweeps_jobs_land_in_one_mlflow_experiment_named_after_its_folder(tmp_path):
    result = hsci("train", "-m", *RUN, "trainer.epochs=1", "logger=mlflow", "seed=0,1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [sweep] = (tmp_path / "outputs" / "multirun").glob("*/*")
    client = mlflow_client(tmp_path)
    experiment = client.get_experiment_by_name(str(sweep.relative_to(tmp_path)))
    found = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in found) == sorted(summary_of(job_folder(sweep, n))["mlflow_run_id"]
                                                          for n in (0, 1))
    assert {r.info.run_name for r in found} == {"0_seed=0", "1_seed=1"}
    assert {r.data.params["seed"] for r in found} == {"0", "1"}


@pytest.mark.slow
def test_a_run_that_fails_is_failed_in_mlflow_too(tmp_path):
    result = hsci("train", *RUN, "optimizer.lr=1e30", "logger=mlflow", cwd=tmp_path)  # diverges
    [run] = run_dirs(tmp_path)
    assert result.returncode == 1 and summary_of(run)["status"] == "diverged"
    run_info = mlflow_client(tmp_path).get_run(summary_of(run)["mlflow_run_id"])
    assert run_info.info.status == "FAILED" and run_info.data.tags["status"] == "diverged"


@pytest.mark.slow
def test_a_logger_that_fails_is_a_warning_and_the_run_completes(tmp_path, monkeypatch):
    # A tracking server that is not there: no MLflow run, one warning, the run and its TensorBoard events whole.
    gone = ["logger=[tensorboard,mlflow]", "logger.mlflow.tracking_uri=http://127.0.0.1:9"]
    (tmp_path / "gone").mkdir(), (tmp_path / "mid").mkdir()
    result = hsci("train", *RUN, *gone, cwd=tmp_path / "gone", env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    [run] = run_dirs(tmp_path / "gone")
    assert result.returncode == 0 and summary_of(run)["status"] == "completed"
    assert "mlflow_run_id" not in summary_of(run)
    warnings = [line for line in (run / "train.log").read_text().splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "MLflow stopped logging this run" in warnings[0]
    assert scalars(events(run), "test/acc") == [(4, summary_of(run)["test"]["acc"])]

    # The MLflow run deleted from its store mid-run: the epochs after it are not logged there, and the run goes on.
    def delete_run(epoch: int, value: float) -> bool:
        [run] = run_dirs(tmp_path / "mid")
        mlflow_client(tmp_path / "mid").delete_run(summary_of(run)["mlflow_run_id"])
        return False

    monkeypatch.setattr(loop, "judge", delete_run)
    result = hsci("train", *RUN, "logger=mlflow", cwd=tmp_path / "mid")
    [run] = run_dirs(tmp_path / "mid")
    assert result.returncode == 0 and summary_of(run)["status"] == "completed"
    warnings = [line for line in (run / "train.log").read_text().splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "MLflow stopped logging this run: MlflowException" in warnings[0]
    history = mlflow_client(tmp_path / "mid").get_metric_history(summary_of(run)["mlflow_run_id"], "val_acc")
    assert [m.step for m in history] == [1]
