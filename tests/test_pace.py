"""The loop's pace, through the real CLI: gradient accumulation is one step on the whole batch (one process and
two), validation within and every few epochs, max_time, min_epochs, fractional and per-stage batch limits,
overfitting a few batches; each resumes exactly, and nonsense values are refused before any work."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import hsci, hsci_process, once, run_dirs, summary_of
from hsci import report
from hsci.loop.step import Epoch, Readings, train_epoch
from hsci.parts.build import build, compose, optimizing
from hsci.parts.loaders import limited, limited_samples
from hsci.parts.world import World

# An MLP without dropout, by SGD: 2 batches of 16 a step must make the step one batch of 32 makes.
PLAIN = ["model=mlp", "model.dropout=0", "optimizer=sgd", "trainer.device=cpu", "trainer.epochs=2", "trainer.log_every=1",
         "trainer.limit_test_batches=1"]
ACCUMULATED = [*PLAIN, "data.batch_size=16", "trainer.accumulate_grad_batches=2", "trainer.limit_train_batches=4"]

# A dataset of a user's own that sends its process SIGINT as the batch that HSCI_TEST_STOP names is fetched
# (train:8, the 8th training batch this process fetches; val:1, the first of a validation's), for stops at exact
# places; data.num_workers=0, so the batches are fetched in the process that trains.
STOPS = '''
import os
import signal

from hsci.data import Tensors, digits


class Stops(Tensors):
    def __init__(self, split, name):
        super().__init__(split.x, split.y, split.augment, split.classes)
        self.name, self.fetched = name, 0

    def __getitem__(self, key):
        self.fetched += 1
        if os.environ.get("HSCI_TEST_STOP") == f"{self.name}:{self.fetched}":
            os.kill(os.getpid(), signal.SIGINT)
        return super().__getitem__(key)


def digits_stopping(**settings):
    data = digits(**settings)
    data.train, data.val = Stops(data.train, "train"), Stops(data.val, "val")
    return data
'''
# 12 batches an epoch in optimizer steps of 3 (4 steps), with dropout and augmentation; epoch 1 does not validate,
# epochs 2 and 3 (the last) validate after their 2nd step and at their end.
PACED = ["data._target_=stops.digits_stopping", "model=mlp", "trainer.device=cpu", "data.batch_size=16",
         "data.num_workers=0", "data.random_crop_padding=1", "trainer.accumulate_grad_batches=3",
         "trainer.limit_train_batches=12", "trainer.val_check_interval=2", "trainer.val_every_epochs=2",
         "trainer.epochs=3", "trainer.log_every=1", "trainer.limit_test_batches=2"]


def records(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def weights(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)["model"]


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.fixture(scope="session")
def whole_batch(tmp_path_factory) -> Path:
    """One step a batch of 32: what accumulating 2 batches of 16 must reproduce."""

    def make(cwd: Path) -> dict:
        result = hsci("train", *PLAIN, "data.batch_size=32", "trainer.limit_train_batches=2", cwd=cwd)
        assert result.returncode == 0, result.stderr
        return {"run": str(run_dirs(cwd)[0])}

    return Path(once(tmp_path_factory, "whole_batch", make)["run"])


@pytest.fixture(scope="session")
def paced(tmp_path_factory) -> Path:
    """The uninterrupted run at the PACED pace, which interrupted ones must reproduce."""

    def make(cwd: Path) -> dict:
        (cwd / "stops.py").write_text(STOPS)
        result = hsci("train", *PACED, cwd=cwd, env={"PYTHONPATH": str(cwd)})
        assert result.returncode == 0, result.stderr
        return {"run": str(run_dirs(cwd)[0])}

    return Path(once(tmp_path_factory, "paced", make)["run"])


def test_accumulating_two_batches_is_one_step_on_both(whole_batch, tmp_path):
    result = hsci("train", *ACCUMULATED, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    assert close(weights(run), weights(whole_batch))
    # The schedule, the readings and the records count optimizer steps: 2 an epoch, as the whole batch's run has.
    mine, theirs = records(run, "steps.jsonl"), records(whole_batch, "steps.jsonl")
    assert [(r["step"], r["lr"]) for r in mine] == [(r["step"], r["lr"]) for r in theirs]
    assert [r["step"] for r in mine] == [1, 2, 3, 4]
    assert [r["grad_norm"] for r in mine] == pytest.approx([r["grad_norm"] for r in theirs], rel=1e-5)
    assert [(r["epoch"], r["step"]) for r in records(run)] == [(1, 2), (2, 4)]
    assert [r["val_loss"] for r in records(run)] == pytest.approx([r["val_loss"] for r in records(whole_batch)])
    assert "epoch 1/2 step 2/2" in result.stdout


@pytest.mark.slow  # two processes: a minute on two cores
def test_accumulating_on_two_processes_is_one_step_on_the_whole_batch(whole_batch, tmp_path):
    result = hsci_process("train", *ACCUMULATED, "trainer.devices=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    assert summary_of(run)["world_size"] == 2
    assert close(weights(run), weights(whole_batch))
    assert [(r["step"], r["lr"]) for r in records(run, "steps.jsonl")] == [
        (r["step"], r["lr"]) for r in records(whole_batch, "steps.jsonl")]


def test_under_ddp_the_gradient_is_averaged_once_an_optimizer_step():
    """DDP's exchange (its comm hook) runs in the last backward pass of each optimizer step only."""
    cfg = compose(["model=mlp", "trainer.device=cpu", "data.batch_size=8", "scheduler=none"])
    parts = build(cfg)
    batches = [next(iter(parts.loaders.train))] * 7  # 3 steps of 3, 3 and 1 batches
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        world = World(backend="gloo")
        ddp = world.wrap(parts.model, parts.device, accumulating=True)
        exchanged = []

        def count(state, bucket):  # DDP's own all-reduce, after noting which bucket it sends
            exchanged.append(bucket.index())
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, count)
        stepping = replace(parts, model=ddp, world=world)
        optim = optimizing(cfg, parts, epochs=1, steps_per_epoch=3)
        epoch = replace(Epoch.start(1, 3, parts.device), batches=7, accumulate=3)
        train_epoch(stepping, optim=optim, batches=batches, epoch=epoch, readings=Readings(10, epoch))
    finally:
        dist.destroy_process_group()
    assert (epoch.step, epoch.seen) == (3, 7 * 8)
    assert exchanged.count(0) == 3  # every bucket once a step, not once a batch (7)


def test_a_run_stopped_mid_accumulation_after_a_validation_within_an_epoch_resumes_exactly(paced, tmp_path):
    # The reference validates where PACED says, each validation recorded with its epoch and step.
    shown = [(r["epoch"], r["step"], "val_loss" in r) for r in records(paced)]
    assert shown == [(1, 4, False), (2, 6, True), (2, 8, True), (3, 10, True), (3, 12, True)]
    summary = summary_of(paced)
    best = max((r for r in records(paced) if "val_acc" in r), key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert (summary["best_epoch"], summary["best_step"]) == (best["epoch"], best["step"])
    assert torch.load(paced / "checkpoints" / "best.pt", weights_only=True)["best_record"]["step"] == best["step"]
    (tmp_path / "stops.py").write_text(STOPS)
    env = {"PYTHONPATH": str(tmp_path)}
    # SIGINT during epoch 2's first validation: the run stops there, and owes it.
    stopped = hsci("train", *PACED, cwd=tmp_path, env=env | {"HSCI_TEST_STOP": "val:1"})
    assert stopped.returncode == 130, stopped.stderr
    [run] = run_dirs(tmp_path)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["due"]) == (1, 2, True)
    assert "SIGINT at epoch 2, step 2 (1 epoch complete)" in summary_of(run)["error"]
    # Resumed, it validates first; then SIGINT on the 2nd batch of step 3: it stops after that step's 3rd batch.
    stopped = hsci("train", f"resume={run}", cwd=tmp_path, env=env | {"HSCI_TEST_STOP": "train:2"})
    assert stopped.returncode == 130, stopped.stderr
    assert "resuming at epoch 2, step 2, with the validation the stop came before" in stopped.stdout
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["due"]) == (1, 3, False)
    refused = hsci("train", f"resume={run}", "trainer.accumulate_grad_batches=1", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "trainer.accumulate_grad_batches=1 would change the experiment" in refused.stderr
    result = hsci("train", f"resume={run}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert [(r["epoch"], r["step"]) for r in summary_of(run)["resumed"]] == [(2, 2), (2, 3)]
    for name in ("last.pt", "best.pt"):
        assert all(torch.equal(a, b) for a, b in zip(weights(run, name).values(), weights(paced, name).values()))
    assert summary_of(run)["test"] == summary_of(paced)["test"]
    # Each validation once, with the same values; lr is the rate where this session took the epoch up, and times
    # and memory are this machine's.
    same = [k for k in records(paced)[-1] if not k.endswith(("_s", "_gb")) and k != "lr"]
    assert [[r.get(k) for k in same] for r in records(run)] == [[r.get(k) for k in same] for r in records(paced)]
    kept = ("epoch", "step", "lr", "grad_norm")  # a resumed run's first reading averages its loss since the resume
    assert [[r[k] for k in kept] for r in records(run, "steps.jsonl")] == [
        [r[k] for k in kept] for r in records(paced, "steps.jsonl")]


def test_max_time_stops_after_the_step_that_crosses_it_tests_and_records_why(tmp_path):
    limits = ["trainer.limit_train_batches=0.5", "trainer.limit_val_batches=0.1", "trainer.limit_test_batches=2"]
    result = hsci("train", "experiment=smoke", "model=mlp", "trainer.max_time=0.001", *limits, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    summary = summary_of(run)
    assert (summary["status"], summary["stopped_by"], summary["epochs_run"]) == ("completed", "max_time", 0)
    assert summary["test_ci"]["n"] == 2 * 16  # limit_test_batches: 2 batches of 16
    assert "epoch 1/2 step 1/38" in result.stdout  # limit_train_batches=0.5 of 76 batches
    assert f"max_time 0.001 passed: stopped at epoch 1, step 1; resume with: hsci train resume={run}" in result.stdout
    [record] = records(run)  # validated where it stopped: the best checkpoint, tested
    assert (record["epoch"], record["step"]) == (1, 1) and (summary["best_epoch"], summary["best_step"]) == (1, 1)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 1)
    resumed = hsci("train", f"resume={run}", "trainer.max_time=null", "trainer.limit_train_batches=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = summary_of(run)
    assert (summary["stopped_by"], summary["epochs_run"]) == ("epochs", 2)
    assert [(r["epoch"], r["step"]) for r in records(run)] == [(1, 1), (1, 2), (2, 4)]


def test_early_stopping_counts_validations_and_waits_for_min_epochs(tmp_path):
    # Nothing improves (lr 1e-30); two validations an epoch (every step of 2); patience 2.
    args = ["experiment=smoke", "model=mlp", "trainer.limit_batches=2", "trainer.val_check_interval=1",
            "trainer.epochs=5", "optimizer.lr=1e-30", "trainer.early_stop_patience=2"]
    for min_epochs, validations, done in (("null", [1, 2, 3], 1), ("2", [1, 2, 3, 4], 2)):
        result = hsci("train", *args, f"trainer.min_epochs={min_epochs}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        run = run_dirs(tmp_path)[-1]
        assert [r["step"] for r in records(run)] == validations  # without min_epochs, it stops mid-epoch
        assert (summary_of(run)["stopped_by"], summary_of(run)["epochs_run"]) == ("early_stop", done)
        assert f"early stop: no better val_acc for {len(validations) - 1} validations" in result.stdout


def test_overfitting_one_batch_drives_its_loss_to_near_zero(tmp_path):
    result = hsci("train", "model=mlp", "model.dropout=0", "trainer.device=cpu", "trainer.overfit_batches=1",
                  "data.batch_size=16", "trainer.epochs=15", "optimizer.lr=0.02", "scheduler=none",
                  "trainer.limit_test_batches=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "overfit_batches=1: training on the same 16 training samples every epoch" in result.stdout
    [run] = run_dirs(tmp_path)
    last = records(run)[-1]
    assert last["step"] == 15  # one step an epoch
    assert last["train_loss"] < 0.05 and last["val_loss"] < 0.05 and last["val_acc"] == 1.0
    assert records(run)[0]["train_loss"] > 1.0


@pytest.mark.parametrize("override, requirement", [
    ("trainer.limit_batches=1.5", "a fraction of them above 0 and at most 1.0"),
    ("trainer.accumulate_grad_batches=0", "a whole number, at least 1"),
    ("trainer.val_check_interval=0.0", "a fraction of an epoch above 0 and at most 1.0"),
    ("trainer.max_time=4:00:00", "DD:HH:MM:SS (00:04:00:00 for four hours) or seconds"),
    ("trainer.min_epochs=0", "a whole number, at least 1, or null"),
    ("trainer.overfit_batches=-1", "a whole number of batches, or 0 (off)")])
def test_nonsense_values_are_refused_before_any_work(override, requirement, tmp_path):
    result = hsci("train", override, cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "outputs").exists()
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {override} is invalid: it must be ") and requirement in line


def test_limits_and_speeds_read_as_a_person_expects():
    assert [limited(None, 76), limited(5, 76), limited(500, 76), limited(0.5, 76), limited(0.001, 76),
            limited(1.0, 76)] == [76, 5, 76, 38, 1, 76]
    assert limited_samples(0.1, 216, 16) == 16 and limited_samples(2, 20, 16) == 20
    assert [report.speed(v) for v in (0.4167, 12.345, 99.96, 123456.7)] == ["0.417", "12.3", "100", "123,457"]
