"""The trainer's controls that Lightning users reach for, through the real CLI: the checkpoints kept (the K best,
one every N epochs, across a resume), the model's layer table, a profile of a few steps read back with torch's own
reader, anomaly mode naming the backward op that gave NaN, and a quick check that leaves no run behind."""

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from conftest import hsci, once, run_dirs, summary_of
from hsci import report
from hsci.loop.layers import layers, show_layers

# One run for what several tests read: 4 epochs of 5 steps (digits' 1,221 training images in batches of 240, the 21
# left over dropped; no schedule: the learning rate does not depend on the run's length), the 2 best epochs kept,
# one checkpoint every 2 epochs, a profile, every layer in the table.
CONTROLS = ["experiment=smoke", "trainer.epochs=4", "trainer.limit_batches=null", "data.batch_size=240",
            "scheduler=none", "trainer.save_top_k=2", "trainer.save_every_n_epochs=2", "trainer.profile=true",
            "trainer.summary_depth=-1"]


@pytest.fixture(scope="session")
def controls(tmp_path_factory) -> tuple[Path, str]:
    def make(cwd: Path) -> dict:
        result = hsci("train", *CONTROLS, cwd=cwd)
        assert result.returncode == 0, result.stderr
        [run] = run_dirs(cwd)
        return {"run": str(run), "stdout": result.stdout}

    made = once(tmp_path_factory, "controls", make)
    return Path(made["run"]), made["stdout"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def two_best(run: Path) -> list[dict]:
    """The 2 best epochs by val_acc, ties to the lower validation loss, then to the earlier epoch."""
    return sorted(records(run), key=lambda r: (-r["val_acc"], r["val_loss"], r["epoch"]))[:2]


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_the_k_best_epochs_are_kept_and_one_every_n_epochs(controls):
    run = controls[0]
    folder = run / "checkpoints"
    names = sorted(p.name for p in (folder / "top").iterdir())
    assert names == sorted(f"epoch_{r['epoch']:03d}_val_acc_{r['val_acc']:.4f}.pt" for r in two_best(run))
    for name in names:
        assert weights(folder / "top" / name)["epoch"] == int(name.split("_")[1])
    best = weights(folder / "best.pt")
    assert best["epoch"] == two_best(run)[0]["epoch"] == summary_of(run)["best_epoch"]
    [top] = [weights(folder / "top" / n) for n in names if int(n.split("_")[1]) == best["epoch"]]
    assert all(torch.equal(top["model"][k], best["model"][k]) for k in best["model"])
    assert sorted(p.name for p in folder.glob("*.pt")) == ["best.pt", "epoch_002.pt", "epoch_004.pt", "last.pt"]
    assert [weights(folder / f"epoch_00{n}.pt")["epoch"] for n in (2, 4)] == [2, 4]


def test_a_resume_keeps_the_same_k_best_as_a_run_never_stopped(controls, tmp_path):
    # The run put back at the end of epoch 2 (its epoch_002.pt as last.pt), with the top/ files it had then and those
    # of later epochs, as a kill after an epoch's top/ file was written and before last.pt would leave them.
    run = tmp_path / "run"
    shutil.copytree(controls[0], run)
    folder = run / "checkpoints"
    shutil.copy(folder / "epoch_002.pt", folder / "last.pt")
    for record in records(run)[:2]:  # top/ at the end of epoch 2: both epochs (their files' contents do not matter)
        name = f"epoch_{record['epoch']:03d}_val_acc_{record['val_acc']:.4f}.pt"
        shutil.copy(folder / "epoch_002.pt", folder / "top" / name)
    result = hsci("train", f"resume={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resuming at epoch 3, step 0" in result.stdout
    assert sorted(p.name for p in (run / "checkpoints" / "top").iterdir()) == sorted(
        p.name for p in (controls[0] / "checkpoints" / "top").iterdir())
    for name in ("last.pt", "best.pt", "epoch_004.pt"):
        mine, theirs = (weights(r / "checkpoints" / name)["model"] for r in (run, controls[0]))
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_layer_table_is_on_the_console_and_in_the_log(controls, smoke):
    run, stdout = controls
    header = "model Sequential: 53.0 K parameters (53.0 K trainable, 0 frozen), 0.21 MB\n"
    assert header in stdout and f"INFO {header}" in (run / "train.log").read_text()
    assert re.search(r"^ 0  0  +Conv2d  +320  yes$", stdout, re.M) and re.search(r"^10  10 +Linear +1\.3 K  yes$",
                                                                                   stdout, re.M)
    assert "model Sequential" in smoke[1].stdout  # depth 1 by default


def test_the_layer_table_goes_as_deep_as_asked_and_says_what_trains():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), nn.Flatten(), nn.Linear(8, 2))
    model[0][0].requires_grad_(False)  # a frozen layer in a block that still trains its batch norm
    assert [(name, count, trains) for name, _, count, trains in layers(model, 1)] == [
        ("0", 240, "part"), ("1", 0, "-"), ("2", 18, "yes")]
    assert [name for name, *_ in layers(model, 2)] == [name for name, *_ in layers(model, -1)] == [
        "0", "0.0", "0.1", "1", "2"]
    shown = Console(file=io.StringIO(), force_terminal=True, width=100)
    saved, report.console = report.console, shown
    try:
        show_layers(model, 2)
        show_layers(model, 0)
    finally:
        report.console = saved
    text = re.sub(r"\x1b\[[0-9;]*m", "", shown.file.getvalue())
    assert "model Sequential: 258 parameters (34 trainable, 224 frozen), 0.00 MB" in text
    assert re.search(r"│ 1 │ 0\.0  +│ Conv2d +│ +224 │ no +│", text)  # a rich table, as a terminal shows it
    assert text.count("model Sequential") == 1  # depth 0: no table


def test_a_profile_of_three_steps_opens_with_torchs_reader_and_names_the_top_ops(controls):
    run, stdout = controls
    [trace] = (run / "profile").glob("*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert len([e for e in events if e.get("name", "").startswith("ProfilerStep#")]) == 3
    assert any(e.get("cat") == "cpu_op" and e["name"] == "aten::convolution" for e in events)
    try:
        from torch.profiler._trace_validator import validate_trace  # torch's own reader of its traces, where it has one
    except ImportError:
        validate_trace = None
    if validate_trace:
        assert validate_trace(str(trace)) == (True, [])
    assert "aten::" in (run / "profile" / "ops.txt").read_text()
    table = stdout[stdout.index("profile: epoch 1, steps 3-5, operators by their own CPU time"):]
    assert re.search(r"^aten::\w+ +\d+\.\d\d +\d+\.\d +\d+$", table, re.M)  # an operator, its ms, %, calls
    assert f"profile trace: {trace}" in stdout
    assert "profile: epoch 1, steps 3-5" in (run / "train.log").read_text()


def test_the_first_lines_say_how_many_samples_each_epoch_leaves_out(controls, smoke):
    run, stdout = controls
    note = "note: each epoch leaves out 21 of the 1221 training samples, its incomplete last batch"
    assert note in stdout and note in (run / "train.log").read_text()
    assert [json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()][-1] == 20
    assert "leaves out" not in smoke[1].stdout  # experiment=smoke: 3 batches an epoch, the last never reached


def test_no_profile_no_extra_checkpoints_by_default(finished):
    assert not (finished / "profile").exists() and not (finished / "checkpoints" / "top").exists()
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_anomaly_mode_names_the_backward_op_that_gave_nan(tmp_path):
    # A rate of 1e30 takes the weights past float32's range after one step: the next forward pass makes NaN.
    result = hsci("train", "experiment=smoke", "optimizer=sgd", "optimizer.lr=1e30", "trainer.detect_anomaly=true",
                  cwd=tmp_path)
    assert result.returncode == 1
    [run] = run_dirs(tmp_path)
    summary = summary_of(run)
    assert summary["status"] == "diverged"
    assert re.match(r"the backward pass gave NaN at epoch 1, step 2: Function '\w+Backward\d' returned nan values in "
                    r"its 0th output; its forward call: .+ \(\w+\.py:\d+, in \w+\) \(trainer\.detect_anomaly",
                    summary["error"])
    assert summary["error"] in result.stderr
    assert "Traceback of forward call that caused the error" in (run / "train.log").read_text()


def test_a_fast_dev_run_checks_every_stage_on_one_batch_and_leaves_no_run(tmp_path):
    result = hsci("train", "experiment=smoke", "debug=fdr", "trainer.summary_depth=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model Sequential" not in result.stdout  # no layer table at depth 0
    assert "epoch 1/1 step 1/1" in result.stdout and "fast_dev_run passed" in result.stdout
    assert run_dirs(tmp_path) == []
    assert "0 of 0 runs" in hsci("runs", cwd=tmp_path).stdout


@pytest.mark.slow
def test_a_fast_dev_run_that_fails_keeps_its_run_directory(tmp_path):
    result = hsci("train", "experiment=smoke", "trainer.fast_dev_run=2", "optimizer=sgd", "optimizer.lr=1e30",
                  cwd=tmp_path)
    assert result.returncode == 1 and "run diverged" in result.stderr
    [run] = run_dirs(tmp_path)
    assert summary_of(run)["status"] == "diverged" and "step 2" in summary_of(run)["error"]
    assert "epoch 1/1 step 1/2" in (run / "train.log").read_text()  # its epoch of 2 steps
