"""The real CLI in a subprocess: help, a smoke run and its run directory, sweeps, config errors."""

import csv
import json
import os
import pty
import re
import select
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import hsci, run_dirs, summary_of, write_cifar, write_imagefolder
from hsci.cli import _home
from hsci.parts.schema import MONITORS


def test_help_lists_verbs_and_groups_without_importing_torch():
    code = "import sys; from hsci.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
    assert "train" in out
    for group, option in [("data", "digits"), ("data", "imagefolder"), ("model", "resnet50"), ("loss", "bce"),
                          ("optimizer", "adamw"), ("scheduler", "onecycle"), ("experiment", "smoke")]:
        line = next(line for line in out.splitlines() if line.strip().startswith(group + " "))
        assert option in line


def test_unknown_command_fails_in_one_line(tmp_path):
    result = hsci("trian", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown command 'trian'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_smoke_run_writes_a_complete_run_directory(smoke):
    run, result = smoke  # hsci train experiment=smoke
    assert result.returncode == 0, result.stderr
    assert run.name.endswith("_digits_cnn")
    for path in [".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "metrics.jsonl", "steps.jsonl",
                 "checkpoints/best.pt", "checkpoints/last.pt", "summary.json"]:
        assert (run / path).is_file(), path
    summary = summary_of(run)
    assert summary["status"] == "completed"
    assert summary["seed"] == 0 and summary["device"] == "cpu"
    assert summary["overrides"] == ["experiment=smoke"]
    assert {f"val_{k}" for k in summary["test"]} == set(MONITORS["multiclass"]) - {"val_top5"}  # top-5 past 10 classes
    assert 0 <= summary["test"]["acc"] <= 1
    assert summary["best_epoch"] in (1, 2) and "val_acc" in summary["best_val"]
    assert {"torch", "hydra-core", "python"} <= set(summary["versions"])
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert {"train_loss", "val_loss", "val_acc", "lr", "epoch_s", "train_img_per_s"} <= set(epochs[0])
    # A reading every step (the smoke experiment's trainer.log_every=1): numbered across epochs.
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in steps] == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (2, 6)]
    assert set(steps[0]) == {"step", "epoch", "train_loss", "lr", "img_per_s", "grad_norm"}
    assert all(r["grad_norm"] > 0 and r["img_per_s"] > 0 for r in steps) and steps[0]["lr"] == 1e-3
    assert sum(r["train_loss"] for r in steps[:3]) / 3 == pytest.approx(epochs[0]["train_loss"])
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "config"} <= set(last)
    assert last["epoch"] == 2 and last["config"]["data"]["_target_"] == "hsci.data.digits"
    # Plain output for a pipe: no escape codes, one row per epoch, the test metrics and the run directory.
    assert "\x1b[" not in result.stdout
    assert "epoch 2  train_loss" in result.stdout and f"run directory: {run}" in result.stdout
    reading = "epoch 2/2 step 3/3  loss "  # the last reading, printed and logged
    assert reading in result.stdout and reading in (run / "train.log").read_text()


def test_typo_and_wrong_type_fail_before_any_work(tmp_path):
    for override, message in [("optimizer.lrr=0.1", "optimizer.lrr is not a key of this config"),
                              ("trainer.epochs=abc", "could not be converted to Integer"),
                              ("data=cifar11", "Could not find 'data/cifar11'")]:
        result = hsci("train", override, cwd=tmp_path)
        assert result.returncode != 0
        assert message in result.stderr + result.stdout
        assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "outputs").exists()


def test_a_config_error_reads_the_same_where_hydra_raises_it(tmp_path, monkeypatch):
    # Under a debugger (or coverage's tracer) Hydra raises its error instead of reporting it.
    plain = [hsci("train", override, cwd=tmp_path).stderr for override in ("optimizer.lrr=0.1", "trainer.epochs=abc")]
    monkeypatch.setattr("hydra._internal.utils.is_under_debugger", lambda: True)
    raised = [hsci("train", override, cwd=tmp_path).stderr for override in ("optimizer.lrr=0.1", "trainer.epochs=abc")]
    assert raised == plain and "did you mean optimizer.lr?" in raised[0]


def test_cfg_job_prints_the_composed_config_without_running(tmp_path):
    result = hsci("train", "--cfg", "job", "model=resnet50", "data=cifar10", cwd=tmp_path)
    assert result.returncode == 0
    assert "arch: resnet50" in result.stdout and "hsci.data.cifar10" in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_tables_train_with_the_loss_and_metrics_of_their_task(tmp_path):
    for data, loss, task in [("breast_cancer", "BCEWithLogitsLoss", "binary"), ("diabetes", "MSELoss", "regression")]:
        result = hsci("train", f"data={data}", "model=mlp", "trainer.epochs=3", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        summary = summary_of(run_dirs(tmp_path)[-1])
        assert {f"val_{k}" for k in summary["test"]} == set(MONITORS[task])
        config = (run_dirs(tmp_path)[-1] / ".hydra" / "config.yaml").read_text()
        assert f"torch.nn.{loss}" in config
    assert summary["monitor"] == "val_loss" and summary["mode"] == "min"  # regression keeps the lowest loss


def test_a_loss_that_does_not_fit_the_task_is_a_clear_error(tmp_path):
    result = hsci("train", "data=breast_cancer", "model=mlp", "loss=cross_entropy", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: loss CrossEntropyLoss is for multiclass tasks, but this dataset is a "
                                     "binary task: use loss=bce")
    assert summary_of(run_dirs(tmp_path)[-1])["status"] == "failed"


def test_missing_dataset_without_network_fails_in_one_line(tmp_path):
    result = hsci("train", "model=resnet50", "data=cifar10", cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert str(tmp_path / "data" / "cifar-10-batches-py") in line
    assert "data_batch_1" in line and "test_batch" in line
    summary = summary_of(run_dirs(tmp_path)[-1])
    assert summary["status"] == "failed" and "cifar-10-batches-py" in summary["error"]


def test_cifar10_in_torchvision_format_trains_resnet50(tmp_path):
    write_cifar(tmp_path / "cifar")
    result = hsci("train", "model=resnet50", "data=cifar10", "data.root=cifar", "data.download=false",
                  "experiment=smoke", "trainer.epochs=1", "trainer.limit_batches=1", "data.batch_size=4",
                  "data.num_workers=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = summary_of(run_dirs(tmp_path)[-1])
    assert summary["status"] == "completed" and run_dirs(tmp_path)[-1].name.endswith("_cifar10_resnet50")


def test_sweep_runs_every_job_and_summarises_them_best_first(tmp_path):
    # breast_cancer with cross-entropy fails (wrong loss for a binary task); the other jobs still run.
    result = hsci("train", "-m", "experiment=smoke", "model=mlp", "loss=cross_entropy",
                  "data=digits,breast_cancer", "optimizer.lr=0.01,0.001", cwd=tmp_path)
    assert result.returncode == 1
    [sweep] = (tmp_path / "outputs" / "multirun").glob("*/*")
    jobs = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert len(jobs) == 4
    statuses = [job["status"] for job in jobs]
    assert statuses == ["completed", "completed", "failed", "failed"]
    assert jobs[0]["best_val_acc"] >= jobs[1]["best_val_acc"]
    assert all("data=digits" in job["overrides"] for job in jobs[:2])
    assert "use loss=bce" in jobs[2]["error"]
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == statuses
    assert "2 of 4 jobs did not complete" in result.stderr
    # A later sweep pointed at this one is refused before any job, and leaves it as it was.
    before = (sweep / "sweep_summary.json").read_bytes()
    again = hsci("train", "-m", "experiment=smoke", "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip() == (f"error: hydra.sweep.dir={sweep} already holds a run or sweep: choose a new "
                                    "directory")
    assert (sweep / "sweep_summary.json").read_bytes() == before
    assert sorted(p.name for p in sweep.glob("[0-9]_*")) == ["0_data=digits,optimizer.lr=0.01",
                                                             "1_data=digits,optimizer.lr=0.001",
                                                             "2_data=breast_cancer,optimizer.lr=0.01",
                                                             "3_data=breast_cancer,optimizer.lr=0.001"]


def test_a_sweep_whose_jobs_choose_other_options_checks_each_job_as_it_starts(tmp_path):
    # Checked per job: val_mse, which the default task (multiclass) does not record, and the keys of a file
    # only some jobs choose.
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "wide_mlp.yaml").write_text("defaults:\n  - mlp\n  - _self_\nhiden: [512]\n")
    result = hsci("train", "-m", f"--config-dir={tmp_path / 'my_conf'}", "experiment=smoke", "trainer.epochs=1",
                  "trainer.monitor=val_mse", "data=diabetes,breast_cancer", "model=mlp,wide_mlp", cwd=tmp_path)
    assert result.returncode == 1
    jobs = [summary_of(run) for run in sorted((tmp_path / "outputs" / "multirun").glob("*/*/[0-9]_*"))]
    assert [job["status"] for job in jobs] == ["completed", "failed", "failed", "failed"]
    assert jobs[0]["monitor"] == "val_mse" and jobs[0]["mode"] == "min"
    assert jobs[1]["error"] == (f"model.hiden is not a setting of hsci.models.mlp (in {tmp_path}/my_conf/model/"
                                "wide_mlp.yaml): did you mean model.hidden? (its settings: hidden, dropout)")
    assert jobs[2]["error"].startswith("trainer.monitor=val_mse is not recorded for this binary task")


def test_a_home_path_on_the_command_line_is_expanded_as_a_shell_would(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _home("data.root=~/pets") == f"data.root='{tmp_path}/pets'"
    assert _home("data.root=~/a,~/b") == f"data.root='{tmp_path}/a','{tmp_path}/b'"  # a sweep's list, item by item
    assert _home("resume=~/run") == "resume=~/run"  # read by hsci itself, which expands it
    assert _home("name=a~b") == "name=a~b"


def test_an_imagefolder_at_a_home_path_with_16_bit_images_and_a_link_loop(tmp_path):
    write_imagefolder(tmp_path / "pets", per_class=6)
    for c in ("cat", "dog", "fox"):
        Image.fromarray(np.full((12, 12), 40000, np.uint16)).save(tmp_path / "pets" / "train" / c / "deep.png")
    (tmp_path / "pets" / "train" / "cat" / "up").symlink_to(tmp_path / "pets" / "train")
    result = hsci("train", "data=imagefolder", "data.root=~/pets", "experiment=smoke", "data.image_size=16",
                  cwd=tmp_path, env={"HOME": str(tmp_path)})  # the README's example, with ~ as written
    assert result.returncode == 0, result.stderr
    assert "train/val/test 15/3/3" in result.stdout  # 3 x 7 images, each once: carved 15 + 3 + 3
    [run] = run_dirs(tmp_path)
    assert f"root: {tmp_path / 'pets'}" in (run / ".hydra" / "config.yaml").read_text()
    assert f"not entering {tmp_path / 'pets' / 'train' / 'cat' / 'up'}" in (run / "train.log").read_text()


def test_your_own_config_folder_adds_options(tmp_path):
    (tmp_path / "my_conf" / "data").mkdir(parents=True)
    (tmp_path / "my_conf" / "data" / "small_digits.yaml").write_text(
        "# digits with a larger validation split\ndefaults:\n  - digits\n  - _self_\nval_fraction: 0.3\n")
    result = hsci("train", "--config-dir", "my_conf", "data=small_digits", "experiment=smoke", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    assert run.name.endswith("_small_digits_cnn")
    assert "val_fraction: 0.3" in (run / ".hydra" / "config.yaml").read_text()


def test_early_stop_precision_and_grad_clip(tmp_path):
    # lr=1e-30 leaves the weights as they are, so nothing beats epoch 1 and patience 2 stops after epoch 3;
    # bf16 autocast and clipping run on the CPU.
    result = hsci("train", "experiment=smoke", "trainer.epochs=10", "optimizer.lr=1e-30", "trainer.early_stop_patience=2",
                  "trainer.precision=bf16", "trainer.grad_clip=1.0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    summary = summary_of(run)
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 1
    assert "early stop: no better val_acc for 2 validations" in result.stdout


def test_monitor_picks_the_best_checkpoint_by_any_validation_value(tmp_path):
    result = hsci("train", "-m", "experiment=smoke", "trainer.epochs=4", "trainer.monitor=val_loss,val_f1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for job, key, pick in (("0", "val_loss", min), ("1", "val_f1", max)):  # a loss is better lower, F1 higher
        [run] = (tmp_path / "outputs" / "multirun").glob(f"*/*/{job}_*")
        summary = summary_of(run)
        values = [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert summary["monitor"] == key and summary["mode"] == ("min" if pick is min else "max")
        assert summary["best_val"][key] == pick(values) and values[summary["best_epoch"] - 1] == pick(values)


def test_fp16_runs_with_a_grad_scaler(tmp_path):
    result = hsci("train", "experiment=smoke", "trainer.precision=fp16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scaler = torch.load(run_dirs(tmp_path)[0] / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0  # an enabled scaler saves its state; a disabled one saves nothing


def test_pretrained_resnet_uses_the_weights_resize_and_normalisation(tmp_path):
    # Weights already in torch's hub cache are used without a download (here: a stand-in of the right shapes).
    from torchvision.models import ResNet18_Weights, resnet18

    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(resnet18().state_dict(), cache / ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1])
    env_home = {"TORCH_HOME": str(tmp_path / "torch_home")}
    result = hsci("train", "model=resnet18", "model.pretrained=true", "experiment=smoke", "trainer.limit_batches=1",
                  "trainer.epochs=1", "data.batch_size=4", cwd=tmp_path, env=env_home)
    assert result.returncode == 0, result.stderr
    assert "resized to 224 px" in result.stdout and "normalised with the weights' mean/std" in result.stdout
    missing = hsci("train", "model=resnet18", "model.pretrained=true", "experiment=smoke", cwd=tmp_path,
                   env={"TORCH_HOME": str(tmp_path / "empty")})
    assert missing.returncode == 2 and "model.arch=resnet18 model.pretrained=true: the weights are not in" in missing.stderr
    assert len(run_dirs(tmp_path)) == 1  # refused before its run directory was made


def test_a_terminal_gets_the_config_tree_progress_bars_and_tables(tmp_path):
    main, child = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "hsci", "train", "experiment=smoke"], cwd=tmp_path,
                            stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    out = b""
    while True:
        ready, _, _ = select.select([main], [], [], 120)
        try:
            chunk = os.read(main, 65536) if ready else b""
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=60) == 0
    styled = out.decode(errors="replace")
    assert "\x1b[" in styled  # styled, as a terminal should be
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", styled)
    assert "├── trainer" in text and "epochs: 2" in text  # the config tree
    assert "━" in text and "3/3" in text  # a progress bar per epoch
    rows = [line for line in re.split(r"[\r\n]+", text) if re.match(r"epoch +train +val|\s+[12]  \d\.\d{3} ", line)]
    assert rows[0].split()[:5] == ["epoch", "train", "val", "acc", "f1"] and len(rows) == 3  # a header, 2 epochs
    assert max(len(row) for row in rows) <= 80  # the epoch table fits 80 columns
    assert "┏" in text and "test split, best checkpoint" in text  # the final table
    [run] = run_dirs(tmp_path)
    assert "epoch 2/2 step 3/3  loss " in (run / "train.log").read_text()  # readings are logged on a terminal too
