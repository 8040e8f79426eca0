"""Every key a run keeps is one hsci reads: an unknown key, at the top level, in `trainer`, in a logger or in a
group, and a builder's setting of the wrong type are refused before any work, in one line naming the key, the
nearest known one and where it came from; a run's saved config starts a new run with `from=`, tagged runs are
found by their tags, and `latest` says which run it took."""

import json
import shutil
from pathlib import Path
from typing import Literal, Optional

import pytest
import torch
import yaml

from conftest import hsci, job_folder, summary_of
from hsci import config_dir
from hsci.parts.annotated import fits, named
from hsci.record.comparable import experiment

SAVED = Path(__file__).parent / "fixtures" / "saved_runs"


def own(where: Path, file: str, text: str) -> str:
    """A user's own config file, <where>/my_conf/<file>, and the argument that adds their folder."""
    (where / "my_conf" / file).parent.mkdir(parents=True, exist_ok=True)
    (where / "my_conf" / file).write_text(text)
    return f"--config-dir={where / 'my_conf'}"


def received(finished: Path, where: Path) -> Path:
    """A finished run from elsewhere (unsigned) whose config names shutil.copyfile as its model."""
    run = where / "received"
    shutil.copytree(finished, run)
    (run / ".hydra" / "config.sig").unlink()
    config = (run / ".hydra" / "config.yaml").read_text()
    (run / ".hydra" / "config.yaml").write_text(config.replace("_target_: hsci.models.cnn", (
        f"_target_: shutil.copyfile\n  src: {run / 'summary.json'}\n  dst: {where / 'written-by-the-config'}")))
    return run


def renamed_copy(where: Path, finished: Path) -> list[str]:
    (where / "kept").mkdir()
    shutil.copy(finished / ".hydra" / "config.yaml", where / "kept" / "myrun.yaml")
    return [f"--config-dir={where / 'kept'}", "--config-name=myrun"]


REFUSED = {
    # name: (arguments, or a function (tmp_path, finished) -> arguments; texts the one line holds)
    "a trainer key typo": (["+trainer.epoch=3"], ["trainer.epoch is not a key hsci reads (given on the command line "
                                                  "as +trainer.epoch=3): did you mean trainer.epochs?"]),
    "a Lightning trainer flag": (["+trainer.profiler=simple"], ["trainer.profiler is not a key hsci reads (given on "
                                                                "the command line as +trainer.profiler=simple)"]),
    "a misspelt new trainer key": (["+trainer.accumulate_grad_batchez=4"], ["trainer.accumulate_grad_batchez is not a"
                                                                            " key hsci reads (given on the command"]),
    "a top-level key": (["+foo=1"], ["foo is not a key hsci reads (given on the command line as +foo=1): remove it"]),
    "a top-level typo": (["+tag=[a]"], ["tag is not a key hsci reads (given on the command line as +tag=[a]): did "
                                        "you mean tags?"]),
    "a logger hsci does not have": (["+logger=csv"], ["Could not find 'logger/csv'; Available options in 'logger': "
                                                      "mlflow, tensorboard"]),
    "a key beside the chosen logger": (["logger=tensorboard", "+logger.csv=1"], ["logger.csv is not a logger hsci "
                                                                                 "has"]),
    "a trainer key in one's own overlay": (lambda tmp, run: ["experiment=mine", own(
        tmp, "experiment/mine.yaml", "# @package _global_\ntrainer:\n  max_epochs: 3\n")],
                                           ["trainer.max_epochs is not a key hsci reads (in ", "/my_conf/experiment/"
                                            "mine.yaml): did you mean trainer."]),
    "a group of one's own at the top level": (lambda tmp, run: ["+augment=strong", own(
        tmp, "augment/strong.yaml", "flip: true\n")], ["augment is not a key hsci reads (in ",
                                                       "/my_conf/augment/strong.yaml): remove it"]),
    "a word for a number": (["model.hidden=abc"], ["model.hidden=abc is invalid: hsci.models.cnn takes hidden: int "
                                                   "(given on the command line as model.hidden=abc)"]),
    "a bool for a number": (["model.hidden=true"], ["model.hidden=true is invalid: hsci.models.cnn takes hidden: int"]),
    "a word in a list of numbers": (["model=mlp", "model.hidden=[64,abc]"],
                                    ["model.hidden=[64, abc] is invalid: hsci.models.mlp takes hidden: list[int]"]),
    "a number for torch's bool": (["optimizer=sgd", "optimizer.nesterov=3"],
                                  ["optimizer.nesterov=3 is invalid: torch.optim.SGD takes nesterov: bool"]),
    "a word for a number in one's own file": (lambda tmp, run: ["model=wide", own(
        tmp, "model/wide.yaml", "defaults:\n  - cnn\n  - _self_\nhidden: wide\n")],
                                              ["model.hidden=wide is invalid: hsci.models.cnn takes hidden: int (in ",
                                               "/my_conf/model/wide.yaml)"]),
    "a key the config lacks": (["optimizer.lrr=0.1"], ["optimizer.lrr is not a key of this config (given on the "
                                                       "command line as optimizer.lrr=0.1): did you mean "
                                                       "optimizer.lr?"]),
    "a group the config lacks": (["optimiser.lr=0.1"], ["optimiser.lr is not a key of this config (given on the "
                                                        "command line as optimiser.lr=0.1): did you mean "
                                                        "optimizer.lr?"]),
    "a key of the option chosen": (["model=mlp", "model.conv_dropout=0.1"], ["did you mean model.dropout?"]),
    "a setting the option leaves out": (["optimizer.amsgrad=true"], ["torch.optim.Adam takes amsgrad, which this "
                                                                     "option leaves at its default: add it with "
                                                                     "+optimizer.amsgrad=true"]),
    "a shared key a sweep's jobs would all keep": (["-m", "seed=1,2", "+trainer.epoch=3"],
                                                    ["trainer.epoch is not a key hsci reads"]),
    "a run's saved config as Hydra's": (lambda tmp, run: [f"--config-dir={run / '.hydra'}", "--config-name=config"],
                                        ["/.hydra/config.yaml is a run's saved config", "hsci train from="]),
    "a renamed copy of one": (renamed_copy, ["kept/myrun.yaml is a run's saved config",
                                             "hsci train from=<the run directory it was saved in>"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_key_hsci_does_not_read_is_refused_before_any_work(case, tmp_path, finished):
    args, texts = REFUSED[case]
    args = sorted(args(tmp_path, finished) if callable(args) else args, key=lambda a: not a.startswith("-"))
    result = hsci("train", *args, *[] if any(a.startswith("experiment=") for a in args) else ["experiment=smoke"],
                  cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(text in lines[0] for text in texts), lines[0]
    assert not (tmp_path / "outputs").exists()


FROM_REFUSED = {
    "a run from elsewhere naming code": (lambda tmp, run: [f"from={received(run, tmp)}"],
                                         "from: refusing ", "model._target_ names shutil.copyfile"),
    "no run yet": (lambda tmp, run: ["from=latest"], "from=latest: no run under", ""),
    "two runs": (lambda tmp, run: [f"from={run},{run}"], "from= takes one run directory", ""),
    "with resume": (lambda tmp, run: [f"from={run}", f"resume={run}"], "give one of them", ""),
}


@pytest.mark.parametrize("case", FROM_REFUSED)
def test_from_is_refused_in_one_line(case, tmp_path, finished):
    args, *texts = FROM_REFUSED[case]
    result = hsci("train", *args(tmp_path, finished), cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert all(text in line for text in texts), line
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "written-by-the-config").exists()


def test_a_swept_unknown_key_fails_each_job_that_keeps_it(tmp_path):
    result = hsci("train", "-m", "experiment=smoke", "+trainer.epoch=1,2", cwd=tmp_path)
    assert result.returncode == 1
    [sweep] = (tmp_path / "outputs" / "multirun").glob("*/*")
    for job in (0, 1):
        summary = summary_of(job_folder(sweep, job))
        assert summary["status"] == "failed" and summary["error"].startswith(
            f"trainer.epoch is not a key hsci reads (given on the command line as +trainer.epoch={job + 1})")


def test_from_a_run_replicates_it_with_other_seeds_and_tags(tmp_path, finished):
    result = hsci("train", "-m", f"from={finished}", "seed=1,2", "tags=[replica,cpu]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [sweep] = (tmp_path / "outputs" / "multirun").glob("*/*")
    saved = yaml.safe_load((finished / ".hydra" / "config.yaml").read_text())
    comparable = []
    for job, seed in ((0, 1), (1, 2)):
        folder = job_folder(sweep, job)
        config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
        assert config == saved | {"seed": seed, "tags": ["replica", "cpu"]}  # the saved config, the seed apart
        summary = summary_of(folder)
        assert summary["from"] == str(finished) and summary["tags"] == ["replica", "cpu"]
        assert summary["overrides"] == [f"seed={seed}", "tags=[replica,cpu]"]
        comparable.append(summary["comparable"]["config"])
    assert comparable[0] == comparable[1] == experiment(saved)  # tags are not part of the experiment
    listed = hsci("runs", "tag=replica", "--json", cwd=tmp_path)
    assert [row["tags"] for row in json.loads(listed.stdout)] == ["replica,cpu", "replica,cpu"]
    assert json.loads(hsci("runs", "tag=rep*", "status=completed", "--json", cwd=tmp_path).stdout)
    assert json.loads(hsci("runs", "tag=baseline", "--json", cwd=tmp_path).stdout) == []
    again = hsci("train", "from=latest", "--cfg", "job", cwd=tmp_path)  # the newest of the two
    assert again.stdout.startswith(f"from=latest: {job_folder(sweep, 1)}\n")
    assert yaml.safe_load(again.stdout.split("\n", 1)[1])["seed"] == 2


def test_from_a_run_saved_before_changes_what_the_command_line_changes(tmp_path):
    old = SAVED / "whole"  # unsigned, saved before trainer.monitor and the top-level tags existed
    saved = yaml.safe_load((old / ".hydra" / "config.yaml").read_text())
    result = hsci("train", f"from={old}", "optimizer.lr=0.5", "model=cnn", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["optimizer"] == saved["optimizer"] | {"lr": 0.5}
    assert config["data"] == saved["data"] and config["name"] == saved["name"] == "digits_mlp"
    assert config["model"]["_target_"] == "hsci.models.cnn" and config["model"]["hidden"] == 128  # the option's own
    defaults = yaml.safe_load((config_dir() / "trainer" / "default.yaml").read_text())
    assert config["trainer"] == defaults | saved["trainer"] and config["tags"] == []  # keys since then: defaults
    regression = yaml.safe_load(hsci("train", f"from={old}", "data=diabetes", "--cfg", "job", cwd=tmp_path).stdout)
    assert regression["loss"]["_target_"] == "torch.nn.MSELoss"  # chosen by data=diabetes, as on a fresh run
    smoke = yaml.safe_load(hsci("train", f"from={old}", "experiment=smoke", "--cfg", "job", cwd=tmp_path).stdout)
    assert smoke["trainer"]["limit_batches"] == 3 and smoke["data"]["batch_size"] == 16  # the overlay on top


def test_latest_says_which_run_it_took(tmp_path, finished):
    run = tmp_path / "outputs" / "2026-01-01" / "00-00-00_digits_cnn"
    shutil.copytree(finished, run)
    result = hsci("trust", "run=latest", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"run=latest: {run}"


def test_train_help_lists_the_groups_one_chooses_from(tmp_path):
    result = hsci("train", "--help", own(tmp_path, "augment/strong.yaml", "flip: true\n"), cwd=tmp_path)
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "model: cnn, mlp, resnet18" in groups and "augment: strong" in groups
    assert "base" not in groups and "_from_run" not in groups


def test_what_a_builder_annotation_admits():
    assert fits(3, float) and not fits(True, float) and not fits(True, int) and not fits(2.5, int)
    assert fits(None, Optional[int]) and fits(None, int | None) and not fits(None, int)
    assert fits("auto", int | str) and fits("sgd", Literal["sgd", "adam"]) and not fits("x", Literal["sgd"])
    assert not fits(1, Literal[True]) and fits(True, Literal[True])
    assert fits([1, 2], list[int]) and not fits([1, "a"], list[int]) and not fits(1, list[int])
    assert fits([0.9, 0.99], tuple[float, float]) and not fits([0.9], tuple[float, float])
    assert fits([1, 2, 3], tuple[int, ...]) and fits({"a": 1}, dict[str, int]) and not fits([1], dict)
    assert fits("abc", float | torch.Tensor) and fits("abc", Path)  # what a config value cannot tell: unchecked
    assert fits({"_target_": "torch.nn.ReLU"}, int)  # built by instantiate: its type shows then
    assert named(int | None) == "int | None" and named(Optional[list[float]]) == "Optional[list[float]]"


def test_a_resume_changing_a_key_the_run_lacks_gets_the_nearest(tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    result = hsci("train", f"resume={run}", "trainer.epoch=3", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: resume: trainer.epoch=3: the run's config has no "
                                                  "trainer.epoch: did you mean trainer.epochs?"]
    assert summary_of(run) == summary_of(finished)  # left as it was
