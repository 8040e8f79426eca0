"""Bad input: each case fails with one clear line on stderr, a non-zero exit and no traceback, and leaves no
run directory that looks like a finished run. Untrusted checkpoints never run code."""

import os
import pickle
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from conftest import hsci, run_dirs, summary_of, write_idx, write_imagefolder


def broken_run(finished: Path, where: Path) -> Path:
    """A copy of `finished` stopped mid-run, whose last.pt was cut short."""
    run = where / "outputs" / "2026-01-01" / "00-00-00_broken"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text((finished / ".hydra" / "config.yaml").read_text())
    last = (finished / "checkpoints" / "last.pt").read_bytes()
    (run / "checkpoints" / "last.pt").write_bytes(last[: len(last) // 2])
    return run


def corrupt_imagefolder(root: Path) -> Path:
    write_imagefolder(root, per_class=6)
    bad = root / "train" / "cat" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated JPEG
    return bad


def empty_imagefolder(root: Path) -> list[str]:
    (root / "train").mkdir()
    return [f"data.root={root}"]


def class_without_images(root: Path) -> list[str]:
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return [f"data.root={root}"]


def empty_val(root: Path) -> list[str]:
    write_imagefolder(root, per_class=4)
    (root / "val").mkdir()
    return [f"data.root={root}"]


def stranger_class(root: Path) -> list[str]:
    write_imagefolder(root, splits=("train", "val"), per_class=4)
    (root / "val" / "wolf").mkdir()
    return [f"data.root={root}"]


def text_as_last_pt(finished: Path, where: Path) -> Path:
    run = broken_run(finished, where)
    (run / "checkpoints" / "last.pt").write_text("epoch,loss\n1,0.5\n")
    return run


def outputs_is_a_file(cwd: Path) -> list[str]:
    (cwd / "outputs").write_text("not a folder")
    return []


def one_image_class(root: Path) -> list[str]:
    write_imagefolder(root, classes=("cat", "dog"), per_class=6)
    write_imagefolder(root, classes=("fox",), per_class=1)
    return [f"data.root={root}"]


def huge_image(root: Path) -> list[str]:
    """A PNG whose header declares 20,000 x 10,000 pixels, beyond Pillow's decompression-bomb limit."""
    write_imagefolder(root, per_class=6)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    (root / "train" / "dog" / "huge.png").write_bytes(png)
    return [f"data.root={root}"]


def same_file_in_two_splits(root: Path) -> list[str]:
    write_imagefolder(root, splits=("train", "val"), per_class=4)
    (root / "val" / "cat" / "extra.png").symlink_to(root / "train" / "cat" / "1.png")
    return [f"data.root={root}"]


def truncated_mnist(root: Path) -> list[str]:
    write_idx(root, "MNIST")
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    return [f"data.root={root}", "data.download=false"]


def tensor_as_model(where: Path) -> list[str]:
    torch.save({"model": torch.zeros(3)}, where / "bare.pt")
    return [f"checkpoint={where / 'bare.pt'}"]


def foreign_last_pt(finished: Path, where: Path) -> list[str]:
    run = broken_run(finished, where)
    torch.save({"model": torch.load(finished / "checkpoints" / "best.pt", weights_only=True)["model"]},
               run / "checkpoints" / "last.pt")
    return [f"resume={run}"]


def expanding_checkpoint(where: Path) -> list[str]:
    """A zip checkpoint whose 50 MB record of zeros is deflated to about 50 KB (torch.save never compresses)."""
    torch.save({"model": {"w": torch.zeros(50_000_000, dtype=torch.uint8)}}, where / "plain.pt")
    with zipfile.ZipFile(where / "plain.pt") as src:
        with zipfile.ZipFile(where / "small.pt", "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info.filename))
    (where / "plain.pt").unlink()
    assert (where / "small.pt").stat().st_size < 1_000_000
    return [f"checkpoint={where / 'small.pt'}"]


def run_naming_code(finished: Path, where: Path) -> Path:
    """A finished run from elsewhere (unsigned) whose config names shutil.copyfile as its model."""
    run = where / "received"
    shutil.copytree(finished, run)
    (run / ".hydra" / "config.sig").unlink()
    config = (run / ".hydra" / "config.yaml").read_text()
    evil = f"_target_: shutil.copyfile\n  src: {run / 'summary.json'}\n  dst: {where / 'written-by-the-config'}"
    (run / ".hydra" / "config.yaml").write_text(config.replace("_target_: hsci.models.cnn", evil))
    return run


def linked_lock(finished: Path, where: Path) -> list[str]:
    """A received run whose .lock links to a file elsewhere: taking the lock must not create or write it."""
    run = where / "received"
    shutil.copytree(finished, run)
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(where / "written-by-the-config")
    return [f"resume={run}"]


def own_config(where: Path, group: str, name: str, text: str) -> list[str]:
    """A user's own config, <where>/my_conf/<group>/<name>.yaml, and the argument that adds their folder."""
    (where / "my_conf" / group).mkdir(parents=True, exist_ok=True)
    (where / "my_conf" / group / f"{name}.yaml").write_text(text)
    return [f"--config-dir={where / 'my_conf'}"]


CASES = {
    # name: (arguments, setup(tmp_path, finished) -> extra arguments, text the one line holds, or texts it holds)
    "unknown option": (["train", "data=cifar11"], None, "Could not find 'data/cifar11'; Available options in 'data': "
                                                        "breast_cancer, cifar10"),
    "unknown key": (["train", "optimizer.lrr=0.1"], None, "optimizer.lrr is not a key of this config (given on the "
                                                          "command line as optimizer.lrr=0.1): did you mean "
                                                          "optimizer.lr?"),
    "wrong type": (["train", "trainer.epochs=abc"], None, "Value 'abc' of type 'str' could not be converted to Integer"),
    "zero epochs": (["train", "trainer.epochs=0"], None, "trainer.epochs=0 is invalid: it must be at least 1"),
    "negative batch size": (["train", "data.batch_size=-8"], None, "data.batch_size=-8 is invalid: it must be at least 1"),
    "negative learning rate": (["train", "optimizer.lr=-0.1"], None, "optimizer.lr=-0.1 is invalid: it must be above 0"),
    "val_fraction outside (0, 1)": (["train", "data.val_fraction=1.5"], None,
                                    "data.val_fraction=1.5 is invalid: it must be between 0 and 1"),
    "missing dataset folder": (["train", "data=imagefolder"], lambda tmp, run: [f"data.root={tmp / 'nowhere'}"],
                               "train does not exist"),
    "empty dataset folder": (["train", "data=imagefolder"],
                             lambda tmp, run: empty_imagefolder(tmp),
                             "has no class folders"),
    "no root given": (["train", "data=imagefolder"], None, "data.root must be set"),
    "corrupted image": (["train", "data=imagefolder", "experiment=smoke", "trainer.limit_batches=null",
                         "data.num_workers=2"],
                        lambda tmp, run: [f"data.root={corrupt_imagefolder(tmp / 'images').parents[2]}"],
                        "cannot read image"),
    "truncated checkpoint to resume": (["train"], lambda tmp, run: [f"resume={broken_run(run, tmp)}"],
                                       "is not a readable checkpoint"),
    "non-checkpoint file to eval": (["eval"], lambda tmp, run: [f"checkpoint={run / 'summary.json'}", "model=cnn"],
                                    "is not a readable checkpoint"),
    "checkpoint that does not fit the model": (["eval", "data=fake", "model=cnn"],
                                               lambda tmp, run: [f"checkpoint={run / 'checkpoints' / 'best.pt'}"],
                                               "layer 0.weight is (32, 1, 3, 3) in the checkpoint but (32, 3, 3, 3)"),
    "run directory that does not exist (resume)": (["train", "resume=/no/such/run"], None,
                                                   "/no/such/run is not a run directory"),
    "run directory that does not exist (eval)": (["eval", "run=/no/such/run"], None, "holds no hsci run"),
    "class folders with no images": (["train", "data=imagefolder"], lambda tmp, run: class_without_images(tmp),
                                     "no images"),
    "an empty val/ folder": (["train", "data=imagefolder"], lambda tmp, run: empty_val(tmp), "val/<class>/"),
    "a class in val/ that train/ lacks": (["train", "data=imagefolder"], lambda tmp, run: stranger_class(tmp),
                                          "has class folders that train/ lacks (wolf)"),
    "truncated checkpoint to eval": (["eval", "model=cnn"],
                                     lambda tmp, run: [f"checkpoint={broken_run(run, tmp) / 'checkpoints' / 'last.pt'}"],
                                     "is not a readable checkpoint"),
    "non-checkpoint file to resume": (["train"], lambda tmp, run: [f"resume={text_as_last_pt(run, tmp)}"],
                                      "is not a readable checkpoint"),
    "a run directory given as hydra.run.dir": (["train"], lambda tmp, run: [f"hydra.run.dir={run}"],
                                               "already holds a run: continue it with resume="),
    "output folder that cannot be written": (["train", "experiment=smoke"],
                                             lambda tmp, run: outputs_is_a_file(tmp),
                                             "cannot create the run directory"),
    "a step schedule stepping every 0 epochs": (["train", "scheduler=step", "scheduler.step_epochs=0"], None,
                                                "scheduler.step_epochs=0 is invalid: it must be at least 1"),
    "a seed beyond NumPy's range": (["train", "seed=4294967296"], None, "seed=4294967296 is invalid"),
    "a device hsci cannot train on": (["train", "trainer.device=meta"], None,
                                      "trainer.device=meta is invalid: it must be a device hsci trains on"),
    "three-value normalisation for one channel": (["train", "data=imagefolder", "data.channels=1"],
                                                  lambda tmp, run: [f"data.root={tmp}"],
                                                  "data.mean=[0.485, 0.456, 0.406] has 3 value(s) but the images "
                                                  "have 1 channel(s)"),
    "a class with one image": (["train", "data=imagefolder", "experiment=smoke"],
                               lambda tmp, run: one_image_class(tmp / "images"),
                               "class fox has 1 image(s) in train/, too few to carve test and val"),
    "a huge image read in a worker process": (["train", "data=imagefolder", "experiment=smoke",
                                               "trainer.limit_batches=null", "data.num_workers=2"],
                                              lambda tmp, run: huge_image(tmp / "images"),
                                              "huge.png is too large to read safely"),
    "the same image in two splits": (["train", "data=imagefolder"], lambda tmp, run: same_file_in_two_splits(tmp),
                                     "extra.png is the same file as"),
    "a truncated MNIST file": (["train", "data=mnist", "experiment=smoke"], lambda tmp, run: truncated_mnist(tmp),
                               "the idx files in"),
    "MNIST without a network": (["train", "data=mnist", "experiment=smoke"], None, "(download failed: "),
    "a checkpoint whose model is a bare tensor": (["eval", "model=cnn"], lambda tmp, run: tensor_as_model(tmp),
                                                  "holds no model weights"),
    "a last.pt that hsci did not write": (["train"], lambda tmp, run: foreign_last_pt(run, tmp),
                                          "lacks optimizer, scheduler"),
    "a small checkpoint that expands to 50 MB": (["eval", "model=cnn"], lambda tmp, run: expanding_checkpoint(tmp),
                                                 "its records expand to 50.0 MB from a "),
    "a received run whose config names code (eval)": (["eval"],
                                                       lambda tmp, run: [f"run={run_naming_code(run, tmp)}"],
                                                       "model._target_ names shutil.copyfile"),
    "a received run whose config names code (resume)": (["train", "trainer.epochs=3"],
                                                         lambda tmp, run: [f"resume={run_naming_code(run, tmp)}"],
                                                         "model._target_ names shutil.copyfile"),
    "a received run whose .lock is a link (resume)": (["train", "trainer.epochs=3"],
                                                      lambda tmp, run: linked_lock(run, tmp),
                                                      "/received/.lock is a link (to "),
    "a config kept outside the run directory": (["train", "experiment=smoke", "hydra.output_subdir=../elsewhere"],
                                                None, "hydra.output_subdir=../elsewhere: hsci keeps a run's config"),
    "a sweep job's folder outside the sweep's": (["train", "-m", "experiment=smoke", "seed=5",
                                                  "hydra.sweep.subdir=../escaped"], None,
                                                 "hydra.sweep.subdir=../escaped leads out of the sweep's folder"),
    "two sweep jobs in one folder": (["train", "-m", "experiment=smoke", "seed=0,1", "hydra.sweep.subdir=same"],
                                     None, "hydra.sweep.subdir=same: "),
    "a sweep whose shared value cannot work": (["train", "-m", "trainer.epochs=0", "seed=1,2"], None,
                                               "trainer.epochs=0 is invalid: it must be at least 1"),
    "a key typo in one's own data config": (["train", "data=small_digits"],
                                            lambda tmp, run: own_config(tmp, "data", "small_digits", (
                                                "# digits, more validation\ndefaults:\n  - digits\n  - _self_\n"
                                                "val_fracton: 0.3\n")),
                                            ("data.val_fracton is not a setting of hsci.data.digits (in /",
                                             "/my_conf/data/small_digits.yaml): did you mean data.val_fraction?")),
    "a key typo in one's own model config": (["train", "model=wide_cnn"],
                                             lambda tmp, run: own_config(tmp, "model", "wide_cnn", (
                                                 "# a wider cnn\ndefaults:\n  - cnn\n  - _self_\nhiden: 256\n")),
                                             ("model.hiden is not a setting of hsci.models.cnn (in /",
                                              "/my_conf/model/wide_cnn.yaml): did you mean model.hidden?")),
    "a model that cannot be imported": (["train", "model=mine"],
                                        lambda tmp, run: own_config(tmp, "model", "mine",
                                                                    "# my model\n_target_: mymodels.tiny\n"),
                                        ("model._target_=mymodels.tiny cannot be imported (in /",
                                         "/my_conf/model/mine.yaml): ModuleNotFoundError: No module named 'mymodels'")),
    "a key added to a shipped option": (["train", "data=mnist", "+data.meen=[0.5]"], None,
                                        "data.meen is not a setting of hsci.data.mnist (given on the command line as "
                                        "+data.meen=[0.5]): did you mean data.mean?"),
    "a key typo shared by a sweep's jobs": (["train", "-m", "seed=1,2", "+model.hiden=64"], None,
                                            "model.hiden is not a setting of hsci.models.cnn (given on the command "
                                            "line as +model.hiden=64)"),
    "a monitor no run records": (["train", "trainer.monitor=val_f2"], None,
                                 "trainer.monitor=val_f2 is invalid: it must be auto or a validation value: val_loss, "
                                 "val_acc"),
    "a monitor this task does not record": (["train", "data=diabetes", "model=mlp", "trainer.monitor=val_acc"], None,
                                            "trainer.monitor=val_acc is not recorded for this regression task: use "
                                            "auto or one of val_loss, val_mse, val_mae, val_r2"),
    "top-5 accuracy of ten classes": (["train", "trainer.monitor=val_top5"], None,
                                      "trainer.monitor=val_top5 is not recorded for this multiclass task"),
    "bench with no steps": (["bench", "steps=0"], None, "steps=0 is invalid: it must be a whole number, at least 1"),
    "bench with negative steps": (["bench", "steps=-1"], None, "steps=-1 is invalid"),
    "bench with steps that are not a number": (["bench", "steps=abc"], None, "steps=abc is invalid"),
}
# Values that cannot work are refused before a run directory is made.
BEFORE_ANY_WORK = ["zero epochs", "negative batch size", "negative learning rate", "val_fraction outside (0, 1)",
                   "no root given", "a step schedule stepping every 0 epochs", "a seed beyond NumPy's range",
                   "a device hsci cannot train on", "three-value normalisation for one channel",
                   "a run directory given as hydra.run.dir", "a config kept outside the run directory",
                   "a sweep whose shared value cannot work", "a key typo in one's own data config",
                   "a key typo in one's own model config", "a model that cannot be imported",
                   "a key added to a shipped option", "a key typo shared by a sweep's jobs", "a monitor no run records",
                   "a monitor this task does not record", "top-5 accuracy of ten classes"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_in_one_clear_line(case, tmp_path, finished):
    args, setup, expected = CASES[case]
    result = hsci(*args, *(setup(tmp_path, finished) if setup else []), cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(text in lines[0] for text in ([expected] if isinstance(expected, str) else expected)), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    for run in run_dirs(tmp_path):
        assert not (run / "summary.json").exists() or summary_of(run)["status"] != "completed"
    if case in BEFORE_ANY_WORK:  # refused as a config error is, with exit status 2
        assert result.returncode == 2 and not (tmp_path / "outputs").exists()
    assert not (tmp_path / "written-by-the-config").exists()  # a received config never runs its code


def test_a_failed_run_keeps_the_traceback_in_its_log(tmp_path):
    corrupt_imagefolder(tmp_path / "images")
    result = hsci("train", "data=imagefolder", f"data.root={tmp_path / 'images'}", "experiment=smoke",
                  "trainer.limit_batches=null", cwd=tmp_path)
    assert result.returncode == 1
    [run] = run_dirs(tmp_path)
    assert summary_of(run)["status"] == "failed" and "0.jpg" in summary_of(run)["error"]
    assert "Traceback" in (run / "train.log").read_text()


class _CreatesAFile:
    """Unpickling this runs code: it would create the file `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_checkpoint_that_would_run_code_is_refused_by_eval_and_resume(tmp_path, finished, how):
    marker = tmp_path / "created-by-unpickling"
    payload = {"model": _CreatesAFile(marker), "epoch": 1}
    evil = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    run = broken_run(finished, tmp_path)
    os.replace(evil, run / "checkpoints" / "last.pt")
    evil = run / "checkpoints" / "last.pt"
    results = [hsci(*args, cwd=tmp_path) for args in (["eval", f"checkpoint={evil}", "model=cnn"],
                                                      ["train", f"resume={run}"])]
    for result in results:
        assert result.returncode == 1
        [line] = result.stderr.strip().splitlines()
        assert f"refusing {evil}" in line and "could run code" in line
    assert not marker.exists()
