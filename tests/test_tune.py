"""`hsci tune`: a search that Optuna drives and prunes, read back with Optuna's own client."""

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from PIL import Image

from conftest import OFFLINE, hsci, once

SEARCH = ("experiment=smoke", "trainer.epochs=4", "optimizer.lr=tag(log,interval(1e-5,1))")


def tune_dir(cwd: Path) -> Path:
    [found] = (cwd / "outputs" / "tune").glob("*/*")
    return found


def study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="hsci", storage=f"sqlite:///{folder / 'study.db'}")


@pytest.fixture(scope="session")
def tuned(tmp_path_factory) -> Path:
    """A tune of six trials of digits, made once for the tests that read it."""

    def make(cwd: Path) -> dict:
        result = hsci("tune", *SEARCH, "trials=6", cwd=cwd)
        assert result.returncode == 0, result.stderr
        return {"tune": str(tune_dir(cwd)), "stdout": result.stdout}

    return Path(once(tmp_path_factory, "tuned", make)["tune"])


def test_a_tune_prunes_hopeless_trials_and_records_each_as_an_ordinary_run(tuned):
    s = study(tuned)
    states = [t.state for t in s.trials]
    assert len(states) == 6 and TrialState.PRUNED in states and TrialState.COMPLETE in states
    assert s.direction == optuna.study.StudyDirection.MAXIMIZE  # trainer.monitor auto: val_acc
    for t in s.trials:
        summary = json.loads((tuned / f"trial_{t.number}" / "summary.json").read_text())
        assert summary["status"] == {"COMPLETE": "completed", "PRUNED": "pruned"}[t.state.name]
        assert f"optimizer.lr={t.params['optimizer.lr']}" in summary["overrides"]
        if t.state == TrialState.COMPLETE:
            assert t.value == summary["best_val"]["val_acc"]
        else:  # pruned after an epoch past the first, the values it reported being those of its epochs
            records = [json.loads(x) for x in (tuned / f"trial_{t.number}" / "metrics.jsonl").read_text().split("\n")
                       if x]
            assert t.intermediate_values == {r["epoch"]: r["val_acc"] for r in records} and len(records) >= 2
    out = json.loads((tuned / "tune_summary.json").read_text())
    assert out["finished"] == 6 and out["pruned"] == states.count(TrialState.PRUNED)
    assert out["best"]["trial"] == s.best_trial.number and out["best"]["value"] == s.best_value
    assert out["best"]["command"] == ("hsci train experiment=smoke trainer.epochs=4 "
                                      f"optimizer.lr={s.best_trial.params['optimizer.lr']}")
    assert list(out["importances"]) == ["optimizer.lr"]
    for name in ("history.png", "slice.png"):
        with Image.open(tuned / name) as png:
            assert png.format == "PNG"


def test_a_tune_runs_only_its_missing_trials_when_resumed_and_draws_the_same_from_the_same_command(tuned, tmp_path):
    copy = tmp_path / "outputs" / "tune" / "day" / "copy"
    copy.parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(tuned), str(copy)], check=True)
    before = {t.number: t.params for t in study(copy).trials}
    result = hsci("tune", "resume=latest", "trials=7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = study(copy).trials
    assert len(trials) == 7 and {t.number: t.params for t in trials[:6]} == before
    assert (copy / "trial_6" / "summary.json").is_file()
    (tmp_path / "again").mkdir()
    again = hsci("tune", *SEARCH, "trials=2", cwd=tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert [t.params for t in study(tune_dir(tmp_path / "again")).trials] == [before[0], before[1]]


@pytest.mark.slow  # two more processes, each importing torch and training: half a minute
def test_two_tune_processes_on_one_study_never_run_the_same_trial(tuned, tmp_path):
    copy = tmp_path / "tune"
    subprocess.run(["cp", "-r", str(tuned), str(copy)], check=True)
    command = [sys.executable, "-m", "hsci", "tune", f"resume={copy}", "trials=10"]
    import os

    env = {**os.environ, **OFFLINE}
    both = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in both]
    assert [p.returncode for p in both] == [0, 0], outs
    trials = study(copy).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and 10 <= len(trials) <= 11  # each process may start one more
    ran = [line.split(":")[0] for out, _ in outs for line in out.splitlines() if line.startswith("trial ")]
    assert len(ran) == len(set(ran)) == len(trials) - 6  # the new trials, each run by one process only
    assert all(t.user_attrs["run_dir"].endswith(f"trial_{t.number}") for t in trials)


def test_tune_refuses_what_it_cannot_search_in_one_line(tmp_path):
    for args, message in [(["trainer.epochs=2"], "no search space given"),
                          (["optimizer.lr=interval(0.1,1)", "pruner=hyperband"], "pruner=hyperband: give median"),
                          (["optimizer.lr=shuffle(0.1,1)"], "hsci tune searches interval(...), choice(...)"),
                          (["optimizer.lr=interval(0.1,1)", "trainer.devices=2", "trainer.device=cpu"],
                           "hsci tune runs each trial in one process"),
                          (["optimizer.lrr=interval(0.1,1)"], "lrr"),
                          (["optimizer.lr=interval(0.1,1)", "trials=many"], "trials=many: give the number")]:
        result = hsci("tune", *args, cwd=tmp_path)
        assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1, args
    assert not (tmp_path / "outputs").exists()
    result = hsci("tune", "resume=latest", cwd=tmp_path)
    assert "no tune under outputs/tune here" in result.stderr


def test_a_tune_minimises_what_is_better_lower(tmp_path):
    result = hsci("tune", "experiment=smoke", "trainer.monitor=val_loss", "optimizer=choice(adam,sgd)", "trials=0",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads((tune_dir(tmp_path) / "tune.json").read_text())
    assert plan["direction"] == "minimize" and plan["space"] == ["optimizer=choice(adam,sgd)"]
    assert study(tune_dir(tmp_path)).direction == optuna.study.StudyDirection.MINIMIZE
    refused = hsci("tune", f"resume={tune_dir(tmp_path)}", "seed=3", cwd=tmp_path)
    assert refused.returncode == 1 and "a tune keeps the space and settings it started with" in refused.stderr


def test_failed_trials_are_recorded_as_failed_and_the_tune_goes_on(tmp_path):
    result = hsci("tune", "experiment=smoke", "optimizer.lr=choice(1e9,1e10)", "pruner=none", "trials=2", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("error: run diverged") == 2  # each trial says why
    assert result.stderr.strip().splitlines()[-1].startswith("error: no trial of ")
    trials = study(tune_dir(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert {t.user_attrs["status"] for t in trials} == {"diverged"}
