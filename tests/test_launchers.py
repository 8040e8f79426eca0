"""Sweeps through Hydra's plugins: joblib's worker processes (reused from job to job), submitit's jobs (its local
executor here; SLURM's goes through the same code). Each job gives what it gives alone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import hsci, hsci_process, job_folder, once, summary_of
from hsci import Refused, config_dir
from hsci.parts import schema
from hsci.record.owner import job_dir, requeued

TINY = ["trainer.epochs=1", "trainer.limit_batches=3", "trainer.device=cpu"]
SEEDS = (0, 1)


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_run(job: Path, alone: Path) -> None:
    """Same test metrics, to the last digit, and the same weights."""
    assert summary_of(job)["status"] == "completed"
    assert summary_of(job)["test"] == summary_of(alone)["test"]
    mine, theirs = weights(job), weights(alone)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"{job} ended with other weights than {alone}"


def owner_pid(folder: Path) -> int:
    """The process that last owned `folder` (its .lock keeps the pid after the lock is released)."""
    return int((folder / ".lock").read_text().split()[0])


@pytest.fixture(scope="session")
def alone(tmp_path_factory) -> dict[int, Path]:
    """Each seed's tiny run, alone (run as a process of its own would run it): what every launcher's job must give."""

    def make(cwd: Path) -> dict:
        results = [hsci("train", f"seed={s}", *TINY, f"hydra.run.dir=seed{s}", cwd=cwd) for s in SEEDS]
        assert all(result.returncode == 0 for result in results), [result.stderr for result in results]
        return {str(s): str(cwd / f"seed{s}") for s in SEEDS}

    return {int(s): Path(run) for s, run in once(tmp_path_factory, "alone", make).items()}


def test_a_joblib_sweep_gives_each_job_what_it_gives_alone(alone, tmp_path):
    # Two workers, each started by joblib with half the cores (OMP_NUM_THREADS=1 here), running at once; their
    # console, a pipe they share with hsci's process, closes early (`| head -2`), which fails no job.
    command = [sys.executable, "-m", "hsci", "train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
               "seed=0,1", *TINY, "hydra.sweep.dir=sweep"]
    result = subprocess.run(["bash", "-c", '"$@" | head -2 >/dev/null; exit "${PIPESTATUS[0]}"', "bash", *command],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "sweep"
    jobs = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert sorted(job["overrides"].split()[0] for job in jobs) == ["seed=0", "seed=1"]
    assert owner_pid(sweep) not in (owner_pid(job_folder(sweep, 0)), owner_pid(job_folder(sweep, 1)))  # joblib's
    for job, seed in (("0", 0), ("1", 1)):
        assert_same_run(job_folder(sweep, job), alone[seed])


@pytest.mark.slow
def test_a_joblib_worker_gives_each_later_job_what_it_gives_alone(alone, tmp_path):
    # Four jobs on two workers, the two that diverge first: the seeds' runs come after another job in a worker
    # that joblib reuses, and whatever that job set must not reach them.
    result = hsci_process("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer.lr=1e9,0.001",
                          "seed=0,1", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().endswith("error: 2 of 4 jobs did not complete")
    sweep = tmp_path / "sweep"
    assert len({owner_pid(job_folder(sweep, job)) for job in "0123"}) <= 2  # workers ran more than one job each
    assert [summary_of(job_folder(sweep, job))["status"] for job in "0123"] == ["diverged", "diverged", "completed",
                                                                                "completed"]
    for job, seed in (("2", 0), ("3", 1)):
        assert_same_run(job_folder(sweep, job), alone[seed])
    for job in "0123":
        log = (job_folder(sweep, job) / "train.log").read_text()
        assert f"run dir {job_folder(sweep, job)}" in log and log.count("run dir ") == 1  # its own log, no other job's


@pytest.mark.slow  # submitit's own processes, each importing torch: half a minute
def test_a_submitit_local_sweep_completes_with_its_summary(alone, tmp_path):
    result = hsci_process("train", "-m", "hydra/launcher=submitit_local", "seed=0,1", *TINY, "hydra.sweep.dir=sweep",
                          cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "sweep"
    assert "sweep summary: " + str(sweep / "sweep_summary.csv") in result.stdout  # printed by hsci's own process
    jobs = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert sorted(job["job"] for job in jobs) == ["0_seed=0", "1_seed=1"] and {job["status"] for job in jobs} == {"completed"}
    assert (sweep / "sweep_summary.csv").read_text().count("\n") == 3
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # two submitit jobs, each with its result
    assert owner_pid(sweep) not in (owner_pid(job_folder(sweep, 0)), owner_pid(job_folder(sweep, 1)))  # submitit's
    for job, seed in (("0", 0), ("1", 1)):
        assert_same_run(job_folder(sweep, job), alone[seed])


@pytest.mark.slow  # two submitit tasks as two ranks, and a run alone: half a minute
def test_a_submitit_job_of_two_tasks_trains_as_two_ranks_what_one_process_does(tmp_path):
    # What a job on several nodes (or tasks per node) of a cluster gets: one Hydra job per task; rank 0 owns the
    # folder and runs the job, the other task joins it as rank 1 through the rank environment submitit exports.
    plain = ["trainer.device=cpu", "trainer.epochs=2", "model.dropout=0", "model.conv_dropout=0"]
    alone = hsci("train", *plain, "hydra.run.dir=alone", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    result = hsci_process("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *plain,
                          "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job, single = summary_of(job_folder(tmp_path / "sweep", 0)), summary_of(tmp_path / "alone")
    assert (job["status"], job["world_size"], job["backend"]) == ("completed", 2, "gloo")
    assert job["test"] == pytest.approx(single["test"], abs=1e-5)
    assert json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())["jobs"][0]["status"] == "completed"
    assert "[rank 1]" not in (job_folder(tmp_path / "sweep", 0) / "train.log").read_text()


@pytest.mark.slow
def test_a_joblib_job_on_two_processes_starts_its_ranks(tmp_path):
    # joblib's workers start processes their own way (loky), which the ranks of a job cannot: they are spawned.
    result = hsci_process("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1",
                          "trainer.devices=2", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for job in ("0", "1"):
        summary = summary_of(job_folder(tmp_path / "sweep", job))
        assert (summary["status"], summary["world_size"]) == ("completed", 2)


def trained_an_epoch(sweep: Path, proc: subprocess.Popen) -> Path:
    """The metrics.jsonl of the sweep's job 0, once it holds an epoch (the job trains)."""
    while True:
        found = [m for m in sweep.glob("0*/metrics.jsonl") if m.read_text().strip()]
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_ends_as_if_never_stopped(tmp_path):
    # Two identical jobs; job 0 gets submitit's preemption signal, as SLURM sends it (here from the test), while it
    # trains. It stops after a step and saves its place, submitit's local executor requeues it, and it carries on.
    sweep = tmp_path / "sweep"
    args = ["seed=3,3", "trainer.epochs=30", "trainer.limit_batches=5", "trainer.device=cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "hsci", "train", "-m", "hydra/launcher=submitit_local", *args,
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = trained_an_epoch(sweep, proc)
    first = owner_pid(job_folder(sweep, 0))
    os.kill(first, signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert owner_pid(job_folder(sweep, 0)) != first  # a new process: the requeued job
    [resumed] = summary_of(job_folder(sweep, 0))["resumed"]
    assert 2 <= resumed["epoch"] <= 30  # the epoch under way: it carried on past epoch 1, before the end
    assert "job 0" in out and "job 1" in out  # the summary, once both ended
    job_id = yaml.safe_load((job_folder(sweep, 0) / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"]
    log = (sweep / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
    assert "SIGUSR2: preempted or out of time: stopping after this step and saving" in log
    assert_same_run(job_folder(sweep, 0), job_folder(sweep, 1))
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == list(range(1, 31))


@pytest.mark.slow
def test_a_sweep_whose_submitit_job_was_killed_outright_still_ends_with_its_summary(tmp_path):
    # A job killed outright (SIGKILL: out of memory, scancel --signal=KILL, a node lost) leaves submitit no result,
    # and the launcher fails the sweep; the summary is written all the same, the job in it as it was left.
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "hsci", "train", "-m", "hydra/launcher=submitit_local",
                             "trainer.epochs=30", "trainer.limit_batches=5", "trainer.device=cpu",
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    trained_an_epoch(sweep, proc)
    os.kill(owner_pid(job_folder(sweep, 0)), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "has not produced any output" in err
    [job] = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert job["job"] == "0" and job["status"] == "running"  # as a run killed outright says: resume it
    assert "job 0" in out and f"sweep summary: {sweep / 'sweep_summary.csv'}" in out


@pytest.fixture
def job_config(tmp_path):
    """set(job_id, overrides): Hydra's config of a sweep job with that submitit id, as the job's process has it."""
    schema.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        def make(job_id: str, overrides: list[str]) -> None:
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.job.id, cfg.hydra.sweep.dir = job_id, str(tmp_path)
                cfg.hydra.overrides.task = overrides
            HydraConfig.instance().set_config(cfg)

        yield make
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


def test_only_a_requeued_submitit_job_gets_its_folder_back(job_config, tmp_path, monkeypatch):
    folder = tmp_path / "0"
    (folder / ".hydra").mkdir(parents=True)  # what job 4242_0 left: Hydra's record of it, and its run
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"job": {"id": "4242_0", "num": 0}, "overrides": {"task": ["seed=1"], "hydra": []}}}))
    (folder / "summary.json").write_text('{"status": "interrupted"}')
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")

    job_config("4242_0", ["seed=1"])  # the same job, requeued
    assert job_dir("0") == "0" and not requeued(folder)  # its folder, but nothing saved yet: it starts afresh
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.pt").write_bytes(b"")
    assert job_dir("0") == "0" and requeued(folder)  # it carries on
    for job_id, overrides in (("4243_0", ["seed=1"]), ("4242_0", ["seed=2"])):  # another job
        job_config(job_id, overrides)
        assert not requeued(folder)
        with pytest.raises(Refused) as refused:
            job_dir("0")
        assert f"{folder} already holds a run" in refused.value.message
    job_config("4242_0", ["seed=1"])
    monkeypatch.delenv("SUBMITIT_EXECUTOR")  # not a submitit job: never requeued
    assert not requeued(folder)
    with pytest.raises(Refused) as refused:
        job_dir("0")
    assert f"{folder} already holds a run" in refused.value.message


def test_submitit_exports_the_rank_environment_hsci_reads(monkeypatch):
    # A SLURM job of 2 nodes x 8 tasks, as sbatch and srun describe it to each task; submitit's
    # TorchDistributedEnvironment turns that into what torch.distributed's env:// start and hsci read.
    from submitit.helpers import TorchDistributedEnvironment

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2",
                       "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(key, value)
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CUDA_VISIBLE_DEVICES")
    for name in names:  # recorded as they are now, to be put back after the test
        monkeypatch.setenv(name, "")
    exported = []
    for node in range(2):
        for local in range(8):
            for key, value in (("SLURM_NODEID", node), ("SLURM_PROCID", node * 8 + local), ("SLURM_LOCALID", local)):
                monkeypatch.setenv(key, str(value))
            for name in names:
                monkeypatch.delenv(name, raising=False)
            TorchDistributedEnvironment().export()
            exported.append({name: os.environ[name] for name in names})
    assert [int(e["RANK"]) for e in exported] == list(range(16))  # SLURM_PROCID
    assert [int(e["LOCAL_RANK"]) for e in exported] == list(range(8)) * 2  # SLURM_LOCALID
    assert {(e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["MASTER_ADDR"]) for e in exported} == {("16", "8", "gpu07")}
    [port] = {e["MASTER_PORT"] for e in exported}  # drawn from the job id: the same on every node
    assert 20000 <= int(port) <= 60000
    # By default each task sees only its own GPU, as cuda:0; export(set_cuda_visible_devices=False) keeps them all.
    assert [e["CUDA_VISIBLE_DEVICES"] for e in exported] == [str(e["LOCAL_RANK"]) for e in exported]
    with pytest.raises(RuntimeError, match="is already set"):  # under torchrun, say: it never overwrites
        TorchDistributedEnvironment().export()
