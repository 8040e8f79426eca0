"""Runs that survive: graceful stops, kills at random moments, exact resume, hsci eval, concurrent starts,
divergence, interrupted sweeps."""

import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import hsci, once, run_dirs, summary_of
from hsci.cli import _new_dir

# Augmentation drawn in two worker processes, dropout, a cosine schedule: every source of randomness at once.
EXPERIMENT = ["trainer.epochs=6", "data.random_crop_padding=1", "data.horizontal_flip=true", "data.num_workers=2",
              "trainer.log_every=5"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run that interrupted-and-resumed runs must reproduce."""

    def make(cwd: Path) -> dict:
        assert hsci("train", *EXPERIMENT, cwd=cwd).returncode == 0
        [run] = run_dirs(cwd)
        return {"run": str(run)}

    return Path(once(tmp_path_factory, "reference", make)["run"])


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hsci", "train", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def epochs_logged(cwd: Path) -> int:
    runs = run_dirs(cwd)
    log = runs[0] / "train.log" if runs else None
    return log.read_text().count("val_loss") if log and log.exists() else 0


def wait_for_training(cwd: Path, proc: subprocess.Popen) -> Path:
    """The run directory, once this session of it has finished an epoch (so its signal handlers are set)."""
    before = epochs_logged(cwd)
    while epochs_logged(cwd) <= before:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    return run_dirs(cwd)[0]


def same_weights(a: Path, b: Path) -> bool:
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def records(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def readings(run: Path) -> list[tuple]:
    """What steps.jsonl holds that a resume must reproduce: the first reading after a resume averages the loss
    over the steps since the resume, and the speed is this machine's."""
    return [(r["epoch"], r["step"], r["lr"], r["grad_norm"]) for r in records(run, "steps.jsonl")]


def test_stopped_by_signals_then_resumed_ends_bit_identical(reference, tmp_path):
    proc = start(EXPERIMENT, tmp_path)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, a scheduler, a closed terminal
        if sig != signal.SIGINT:
            proc = start([f"resume={run}"], tmp_path)
        run = wait_for_training(tmp_path, proc)
        time.sleep(random.uniform(0.05, 0.3))  # mid-epoch, most likely
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}[sig], err
        summary = summary_of(run)
        assert summary["status"] == "interrupted" and f"resume with: hsci train resume={run}" in summary["error"]
        assert f"run interrupted: {sig.name} at epoch" in (run / "train.log").read_text()
        epochs = (run / "metrics.jsonl").is_file() and records(run)
        assert (run / "curves.png").is_file() == bool(epochs)  # a stopped run's plots: of the epochs it has
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "stale", "config"} <= set(state)
    result = hsci("train", f"resume={run}", cwd=tmp_path)  # to the end, no signal: in this process
    assert result.returncode == 0, result.stderr
    summary = summary_of(run)
    assert summary["status"] == "completed" and len(summary["resumed"]) == 3
    assert summary["test"] == summary_of(reference)["test"]
    assert same_weights(run, reference)
    assert [r["epoch"] for r in records(run)] == list(range(1, 7))  # each epoch once
    assert [r["train_loss"] for r in records(run)] == [r["train_loss"] for r in records(reference)]
    assert readings(run) == readings(reference)  # each reading once, at the same steps, the same values


@pytest.mark.slow  # five runs killed outright, each resumed: three quarters of a minute
def test_killed_at_random_moments_keeps_readable_checkpoints_and_resumes_exactly(reference, tmp_path):
    rng = random.Random(0)
    proc = start(EXPERIMENT, tmp_path)
    for kill in range(2):
        if kill:
            proc = start(["resume=latest"], tmp_path)
        run = wait_for_training(tmp_path, proc)
        time.sleep(rng.uniform(0, 0.4))
        proc.kill()  # SIGKILL: no chance to save; whatever is on disk must be whole
        proc.communicate()
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert 1 <= state["epoch"] <= 6
        json.loads((run / "summary.json").read_text())
    assert hsci("train", "resume=latest", cwd=tmp_path).returncode == 0  # to the end: in this process
    assert same_weights(run, reference)
    assert summary_of(run)["test"] == summary_of(reference)["test"]
    assert [r["epoch"] for r in records(run)] == list(range(1, 7))
    assert readings(run) == readings(reference)


def test_extending_a_finished_run(reference, tmp_path):
    # A copy of the reference, trained 2 epochs further in place.
    run = tmp_path / "outputs" / "run"
    shutil.copytree(reference, run)
    refused = hsci("train", f"resume={run}", cwd=tmp_path)
    assert refused.returncode == 1 and "already completed its 6 epochs; raise trainer.epochs" in refused.stderr
    result = hsci("train", f"resume={run}", "trainer.epochs=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["epoch"] for r in records(run)] == list(range(1, 9))
    assert summary_of(run)["epochs_run"] == 8
    # Epoch 7 starts where the 8-epoch cosine schedule stands after 6 epochs, not at the 6-epoch one's end (0).
    assert records(run)[6]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 6 / 8)))
    before = {p: (run / p).read_bytes() for p in ("summary.json", ".hydra/config.yaml", "metrics.jsonl")}
    for change, why in [("optimizer.lr=0.5", "optimizer.lr=0.5 would change the experiment"),
                        ("data.num_workers=-1", "data.num_workers=-1 is invalid")]:
        refused = hsci("train", f"resume={run}", "trainer.epochs=12", change, cwd=tmp_path)
        assert refused.returncode == 1 and why in refused.stderr
    assert before == {p: (run / p).read_bytes() for p in before}  # a refused resume leaves the run as it was


@pytest.mark.slow
def test_an_early_stopped_run_is_extended_only_with_more_patience(tmp_path):
    args = ["experiment=smoke", "trainer.epochs=10", "optimizer.lr=1e-30", "trainer.early_stop_patience=1"]
    assert hsci("train", *args, cwd=tmp_path).returncode == 0
    [run] = run_dirs(tmp_path)
    assert summary_of(run)["epochs_run"] == 2
    refused = hsci("train", f"resume={run}", "trainer.epochs=20", cwd=tmp_path)
    assert refused.returncode == 1 and "stopped early after epoch 2" in refused.stderr
    assert hsci("train", f"resume={run}", "trainer.early_stop_patience=2", cwd=tmp_path).returncode == 0
    assert summary_of(run)["epochs_run"] == 3 and [r["epoch"] for r in records(run)] == [1, 2, 3]


def test_a_second_ctrl_c_quits_at_once_and_a_signal_during_startup_is_recorded(tmp_path):
    proc = start(EXPERIMENT, tmp_path)
    run = wait_for_training(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130 and summary_of(run)["status"] == "interrupted"
    torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # the last complete checkpoint stays
    early = tmp_path / "early"
    early.mkdir()
    proc = start(["experiment=smoke"], early)
    while not list((early / "outputs").glob("*/*/.hydra")):  # the run directory exists, torch still loading
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    [run] = run_dirs(early)
    assert summary_of(run)["status"] == "interrupted" and "not started" in summary_of(run)["error"]


@pytest.mark.slow
def test_resume_after_limit_batches_shrank_below_the_step_reached(tmp_path):
    args = ["trainer.epochs=3", "trainer.log_every=1"]
    proc = start(args, tmp_path)
    run = wait_for_training(tmp_path, proc)
    while "epoch 2/3 step 20/" not in (run / "train.log").read_text():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert stopped["step"] >= 20
    result = hsci("train", f"resume={run}", "trainer.limit_batches=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["epoch"] for r in records(run)] == [1, 2, 3]
    # Epoch 2 ends at once, its train_loss the mean over the steps it had made.
    assert records(run)[1]["train_loss"] == pytest.approx(stopped["loss_sum"] / stopped["step"])


def test_eval_reproduces_the_summary_exactly(reference, tmp_path):
    summary = summary_of(reference)
    result = hsci("eval", f"run={reference}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((reference / "eval_test.json").read_text())["metrics"] == summary["test"]
    assert hsci("eval", f"run={reference}", "split=val", cwd=tmp_path).returncode == 0
    val = json.loads((reference / "eval_val.json").read_text())["metrics"]
    assert {f"val_{k}": v for k, v in val.items()} == summary["best_val"]
    # A checkpoint from elsewhere, with the model and data named on the command line.
    result = hsci("eval", f"checkpoint={reference / 'checkpoints' / 'best.pt'}", "model=cnn", "data=digits", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"acc {summary['test']['acc']:.4f}" in result.stdout


def test_concurrent_starts_each_get_their_own_run_directory(tmp_path):
    procs = [start(["experiment=smoke", "name=same"], tmp_path) for _ in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    runs = run_dirs(tmp_path)
    assert len(runs) == 4
    assert all(summary_of(run)["status"] == "completed" and summary_of(run)["run_dir"] == str(run) for run in runs)
    # The directory is claimed atomically: the same name asked for again gets a suffix, never the same folder.
    base = str(tmp_path / "claim" / "12-00-00_x")
    assert [Path(_new_dir(base)).name for _ in range(3)] == ["12-00-00_x", "12-00-00_x_2", "12-00-00_x_3"]


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # The rate is fine in epoch 1 and multiplied by 1e12 from epoch 2 on.
    result = hsci("train", "experiment=smoke", "trainer.epochs=3", "optimizer=sgd", "optimizer.lr=0.01",
                  "scheduler=step", "scheduler.step_epochs=1", "scheduler.gamma=1e12", cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "run diverged" in line and "at epoch 2, step" in line and "lower optimizer.lr" in line
    [run] = run_dirs(tmp_path)
    summary = summary_of(run)
    assert summary["status"] == "diverged" and "epoch 2" in summary["error"]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert len(records(run)) == 1


@pytest.mark.slow
def test_a_sweep_with_a_diverging_job_records_it_and_exits_non_zero(tmp_path):
    result = hsci("train", "-m", "experiment=smoke", "trainer.epochs=3", "optimizer=sgd", "optimizer.lr=0.01",
                  "scheduler=step", "scheduler.step_epochs=1", "scheduler.gamma=1.0,1e12", cwd=tmp_path)
    assert result.returncode == 1 and "1 of 2 jobs did not complete" in result.stderr
    [sweep] = (tmp_path / "outputs" / "multirun").glob("*/*")
    jobs = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert [job["status"] for job in jobs] == ["completed", "diverged"]
    assert "gamma=1000000000000.0" in jobs[1]["overrides"] and "at epoch 2" in jobs[1]["error"]


@pytest.mark.slow
def test_an_interrupted_sweep_records_every_job_and_exits_non_zero(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "hsci", "train", "-m", "trainer.epochs=30", "seed=0,1,2"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not list((tmp_path / "outputs").glob("multirun/*/*/0_seed=0/metrics.jsonl")):
        assert proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    [sweep] = (tmp_path / "outputs" / "multirun").glob("*/*")
    jobs = {job["job"].split("_")[0]: job for job in json.loads((sweep / "sweep_summary.json").read_text())["jobs"]}
    assert [jobs[n]["status"] for n in "012"] == ["interrupted"] * 3
    assert "SIGINT at epoch" in jobs["0"]["error"] and "not started" in jobs["2"]["error"]
    assert "3 of 3 jobs did not complete" in err


def test_a_run_saved_before_trainer_monitor_existed_resumes_and_keeps_its_monitor(finished, tmp_path):
    run = tmp_path / "outputs" / "old"
    shutil.copytree(finished, run)
    config = run / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("  monitor: auto\n", ""))  # as runs saved before it existed
    assert "monitor" not in config.read_text()
    assert hsci("eval", f"run={run}", cwd=tmp_path).returncode == 0
    before = {p: (run / p).read_bytes() for p in ("summary.json", "metrics.jsonl", "checkpoints/last.pt")}
    refused = hsci("train", f"resume={run}", "trainer.epochs=3", "trainer.monitor=val_loss", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: resume: trainer.monitor=val_loss would change how {run} picks its "
                                      "best checkpoint (by auto so far): resume without it, or start a new run")
    assert before == {p: (run / p).read_bytes() for p in before}
    result = hsci("train", f"resume={run}", "trainer.epochs=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert summary_of(run)["epochs_run"] == 3 and summary_of(run)["monitor"] == "val_acc"
