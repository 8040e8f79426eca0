"""One run on several processes (DDP over gloo on the CPU): the same experiment as one process, one run
directory, graceful stops and exact resume, a failing rank, torchrun from outside."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import hsci, hsci_process, once, run_dirs, summary_of
from hsci.parts.datasets import CropFlip, Loading, Tensors
from hsci.parts.loaders import DeviceLoader, EpochSampler, eval_loader
from hsci.parts.world import World

# The cnn without dropout: no batch norm and no random masks, so two processes' shares of a batch train the
# model exactly as one process's whole batch does, up to the order floats are added in.
PLAIN = ["trainer.device=cpu", "model.dropout=0", "model.conv_dropout=0"]
TWO = [*PLAIN, "trainer.devices=2"]

# Datasets of a user's own, for the faults a rank can meet: importable by every rank through PYTHONPATH.
FAULTS = '''
import os

from hsci.data import Tensors, breast_cancer, digits


class FailsOnRank1(Tensors):
    def __getitem__(self, key):
        if os.environ.get("RANK") == "1":
            raise ValueError("a corrupt sample in the share of rank 1")
        return super().__getitem__(key)


def digits_failing_on_rank_1(**settings):
    data = digits(**settings)
    data.train = FailsOnRank1(data.train.x, data.train.y, data.train.augment)
    return data


def table_with_a_nan(**settings):
    data = breast_cancer(**settings)
    data.train.x[7] = float("nan")
    return data
'''


def weights(run: Path, name: str = "best.pt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)["model"]


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.fixture(scope="session")
def one_process(tmp_path_factory) -> Path:
    def make(cwd: Path) -> dict:
        result = hsci("train", *PLAIN, "trainer.epochs=2", cwd=cwd)
        assert result.returncode == 0, result.stderr
        return {"run": str(run_dirs(cwd)[0])}

    return Path(once(tmp_path_factory, "one_process", make)["run"])


def test_shares_of_each_batch_side_by_side_are_the_batch_one_process_takes():
    dataset = Tensors(torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8), torch.arange(50) % 3,
                      CropFlip(padding=1, flip=True))
    whole = list(EpochSampler(50, 8, True, 7, True))
    shares = [list(EpochSampler(50, 8, True, 7, True, rank, 4)) for rank in range(4)]
    assert whole == [sum((share[b] for share in shares), []) for b in range(len(whole))]
    cpu = torch.device("cpu")
    one = list(DeviceLoader(dataset, 8, cpu, train=True, seed=7))
    parts = [list(DeviceLoader(dataset, 8, cpu, train=True, seed=7, rank=rank, ranks=2)) for rank in range(2)]
    for b, (x, y) in enumerate(one):
        assert torch.equal(x, torch.cat([parts[0][b][0], parts[1][b][0]]))
        assert torch.equal(y, torch.cat([parts[0][b][1], parts[1][b][1]]))
    for kind in ("torch", "gpu"):  # an evaluation split: each sample once over the ranks, the first 3 batches
        seen = [y for rank in range(3) for _, y in eval_loader(dataset, Loading(6), cpu, 0, kind, limit=3,
                                                               world=World(rank=rank, size=3))]
        assert torch.equal(torch.cat(seen), dataset.y[:18])


def test_two_processes_train_what_one_does_in_one_run_directory(one_process, tmp_path):
    result = hsci_process("train", *TWO, "trainer.epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)  # one directory, made once
    summary, alone = summary_of(run), summary_of(one_process)
    assert (summary["world_size"], summary["nodes"], summary["backend"]) == (2, 1, "gloo")
    assert (alone["world_size"], alone["nodes"], alone["backend"]) == (1, 1, None)
    assert summary["test"] == pytest.approx(alone["test"], abs=1e-5)
    assert close(weights(run), weights(one_process))  # the same keys as one process's: no DDP wrapper in them
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    log = (run / "train.log").read_text()
    assert "[rank 1]" not in log and log.count("test split, best checkpoint") == 1  # rank 1 said nothing
    assert result.stdout.count("epoch 2  train_loss") == 1


@pytest.mark.slow  # three runs of two ranks each, with a reference: 1.5 minutes
def test_sigterm_stops_every_rank_at_one_step_and_resume_is_exact(tmp_path):
    epochs = ["trainer.epochs=5", "data.random_crop_padding=1", "data.horizontal_flip=true", "trainer.log_every=7"]
    (tmp_path / "reference").mkdir()
    # The uninterrupted run, its console a pipe that closes early (`| head -2`): no rank fails for it.
    command = [sys.executable, "-m", "hsci", "train", *TWO, *epochs]
    reference = subprocess.run(["bash", "-c", '"$@" | head -2 >/dev/null; exit "${PIPESTATUS[0]}"', "bash", *command],
                               cwd=tmp_path / "reference", capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    [reference] = run_dirs(tmp_path / "reference")
    cwd = tmp_path / "stopped"
    cwd.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "hsci", "train", *TWO, *epochs], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not (run_dirs(cwd) and (run_dirs(cwd)[0] / "metrics.jsonl").exists()):  # an epoch done: mid-run
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler sends it
    sent = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and time.monotonic() - sent < 15, err
    [run] = run_dirs(cwd)
    summary = summary_of(run)
    assert summary["status"] == "interrupted" and f"resume with: hsci train resume={run}" in summary["error"], summary
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["epoch"] < 5
    resumed = hsci_process("train", f"resume={run}", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert summary_of(run)["test"] == summary_of(reference)["test"]
    assert all(torch.equal(a, b) for a, b in zip(weights(run, "last.pt").values(), weights(reference, "last.pt").values()))
    steps = [(r["step"], r["lr"], r["grad_norm"]) for r in map(json.loads, (run / "steps.jsonl").read_text().splitlines())]
    assert steps == [(r["step"], r["lr"], r["grad_norm"])
                     for r in map(json.loads, (reference / "steps.jsonl").read_text().splitlines())]

    # On one process it carries on from the same step, and says that the data split changed.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    last = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    more = hsci("train", f"resume={copy}", "trainer.epochs=6", "trainer.devices=1", cwd=cwd)
    assert more.returncode == 0, more.stderr
    assert f"resuming at epoch {last['epoch'] + 1}, step {last['step']}" in more.stdout
    assert "the data split across processes changed (2 -> 1)" in more.stdout
    assert summary_of(copy)["world_size"] == 1 and summary_of(copy)["epochs_run"] == 6


def test_a_rank_that_fails_ends_the_job_as_failed_with_its_error(tmp_path):
    (tmp_path / "faults.py").write_text(FAULTS)
    # Under the 300 s that a rank waits for the others (trainer.dist_timeout_s): the job ends when the rank fails.
    result = hsci_process("train", *TWO, "data._target_=faults.digits_failing_on_rank_1", cwd=tmp_path, timeout=240,
                          env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "rank 1 failed: ValueError: a corrupt sample in the share of rank 1" in line, result.stderr
    [run] = run_dirs(tmp_path)
    summary = summary_of(run)
    assert summary["status"] == "failed" and "rank 1 failed: ValueError" in summary["error"]
    log = (run / "train.log").read_text()
    assert "[rank 1] a" not in log and "ERROR [rank 1] ValueError: a corrupt sample" in log and "Traceback" in log


def test_what_several_processes_cannot_do_is_one_line_before_any_run_directory(tmp_path):
    for args, words in ((["trainer.devices=2", "data.batch_size=33"], "does not split evenly over trainer.devices=2"),
                        (["trainer.devices=2", "trainer.device=cpu", "trainer.sync_batchnorm=true"], "needs CUDA"),
                        (["trainer.devices=0"], "trainer.devices=0 is invalid")):
        result = hsci("train", *args, cwd=tmp_path)
        assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    nodes = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    result = hsci("train", cwd=tmp_path, env=nodes)  # rank 0 of two nodes, no shared folder named
    assert result.returncode == 2 and "2 nodes cannot agree on a time-stamped run directory" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_torchrun_from_outside_trains_what_one_process_does(one_process, tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": ""}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "hsci", "train", *PLAIN, "trainer.epochs=2"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)  # rank 0 made it, rank 1 used it
    summary = summary_of(run)
    assert summary["world_size"] == 2 and summary["test"] == pytest.approx(summary_of(one_process)["test"], abs=1e-5)
    assert close(weights(run), weights(one_process))


def test_under_torchrun_a_refused_run_ends_every_rank_at_once(tmp_path):
    # Rank 0 refuses the config before the ranks meet; rank 1, waiting for rank 0's word, ends too.
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "hsci", "train", "trainer.device=cpu", "data.batch_size=33"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and time.monotonic() - start < 60
    assert "data.batch_size=33 does not split evenly over the 2 processes torchrun started" in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_nan_in_one_rank_share_makes_the_run_diverged_on_every_rank(tmp_path):
    (tmp_path / "faults.py").write_text(FAULTS)
    result = hsci_process("train", "data=breast_cancer", "model=mlp", "trainer.device=cpu", "trainer.devices=2",
                          "data._target_=faults.table_with_a_nan", cwd=tmp_path, timeout=120,
                          env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    [run] = run_dirs(tmp_path)
    summary = summary_of(run)
    assert summary["status"] == "diverged" and "epoch 1" in summary["error"], summary
