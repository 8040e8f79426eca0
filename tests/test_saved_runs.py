"""Run directories saved by an earlier hsci (tests/fixtures/saved_runs, made before the modules moved into packages)
still evaluate to their own numbers and resume to where they would have ended."""

import json
import shutil
from pathlib import Path

import torch

from conftest import hsci, summary_of

SAVED = Path(__file__).parent / "fixtures" / "saved_runs"


def test_the_saved_runs_name_the_public_builders():
    config = (SAVED / "whole" / ".hydra" / "config.yaml").read_text()
    for target in ("hsci.data.digits", "hsci.models.mlp", "hsci.schedulers.cosine"):
        assert f"_target_: {target}" in config


def test_a_completed_run_saved_before_evaluates_to_its_own_test_metrics(tmp_path):
    run = tmp_path / "whole"
    shutil.copytree(SAVED / "whole", run)
    result = hsci("eval", f"run={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "eval_test.json").read_text())["metrics"] == summary_of(run)["test"]


def test_a_run_stopped_before_resumes_to_what_it_would_have_ended_with(tmp_path):
    run = tmp_path / "cut"
    shutil.copytree(SAVED / "cut", run)
    assert summary_of(run)["status"] == "interrupted"
    result = hsci("train", f"resume={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resuming at epoch 2, step 16" in result.stdout
    whole = SAVED / "whole"
    summary = summary_of(run)
    assert summary["status"] == "completed" and summary["test"] == summary_of(whole)["test"]
    mine, theirs = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in (run, whole))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]


def test_runs_saved_before_hsci_recorded_what_makes_them_comparable_are_listed_and_compared(tmp_path):
    for name in ("whole", "cut"):
        shutil.copytree(SAVED / name, tmp_path / "outputs" / "day" / name)
    listed = json.loads(hsci("runs", "--json", cwd=tmp_path).stdout)
    assert {(r["name"], r["status"], r["epochs"]) for r in listed} == {("digits_mlp", "completed", "3/3"),
                                                                      ("digits_mlp", "interrupted", "1/3")}
    again = tmp_path / "outputs" / "day" / "again"  # the same run with another seed, as an old sweep left it
    shutil.copytree(SAVED / "whole", again)
    (again / "summary.json").write_text(json.dumps(summary_of(again) | {"seed": 1}))
    config = again / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0\n", "seed: 1\n", 1))  # the first line; not split_seed
    result = hsci("compare", "outputs", f"out={tmp_path / 'cmp'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    [group] = out["groups"]  # one config, read from the runs' saved configs: the seed is not part of it
    assert group["n"] == 2 and group["config"]["model.hidden"] == [32] and "seed" not in group["config"]
    assert out["unfingerprinted"] == 2 and "2 run(s) saved before hsci recorded test splits" in result.stdout
    assert out["left_out"]["not_completed"] == 1  # cut
