"""A run imports what it uses, when it uses it (each case in a fresh interpreter, whose imports are what is checked):
the default run reaches its first step without torchvision, scikit-learn, SciPy or torchmetrics, and a config
refused before any work never imports torch. benchmarks/startup.py measures what this saves."""

import subprocess
import sys

import hsci.data

HEAVY = ("torchvision", "sklearn", "scipy", "torchmetrics", "PIL")
PROBE = f"""
import sys
import hsci.loop.train as loop

first = loop.train_epoch


def probe(*args, **kwargs):
    print("at the first step:", *sorted(m for m in {HEAVY!r} if m in sys.modules), flush=True)
    loop.train_epoch = first
    return first(*args, **kwargs)


loop.train_epoch = probe
from hsci.cli import main

code = main(sys.argv[1:])
print("at the end:", *sorted(m for m in {HEAVY!r} if m in sys.modules), flush=True)
sys.exit(code)
"""


def fresh(code: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_default_run_reaches_its_first_step_without_the_libraries_it_does_not_use(tmp_path):
    result = fresh(PROBE, "train", "experiment=smoke", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "at the first step:" in lines  # nothing heavy yet
    assert "torchmetrics" in next(line for line in lines if line.startswith("at the end:"))  # at the first evaluation


def test_a_config_refused_before_any_work_never_imports_torch(tmp_path):
    code = "import sys; from hsci.cli import main; code = main(sys.argv[1:]); print('torch' in sys.modules); sys.exit(code)"
    for args in (["train", "optimizer.lrr=0.1"], ["train", "trainer.epochs=0"], ["train", "data=cifar11"]):
        result = fresh(code, *args, cwd=tmp_path)
        assert result.returncode == 2 and result.stdout.strip() == "False", (args, result.stdout, result.stderr)
    assert not (tmp_path / "outputs").exists()


def test_digits_are_read_as_scikit_learn_loads_them(monkeypatch):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for found in (True, False):  # the file scikit-learn ships, or (where it is not found) load_digits itself
        if not found:
            monkeypatch.setattr(hsci.data, "find_spec", lambda name: None)
        pixels, labels = hsci.data._digits()
        assert (pixels == bunch.images).all() and (labels == bunch.target).all()
        assert (pixels.dtype, labels.dtype) == (bunch.images.dtype, bunch.target.dtype)


def test_hsci_runs_reads_records_without_torch_or_scipy(smoke, tmp_path):
    import shutil

    shutil.copytree(smoke[0], tmp_path / "outputs" / "day" / "run")
    code = ("import sys; from hsci.cli import main; code = main(sys.argv[1:]); "
            "print(*sorted(m for m in ('torch', 'scipy', 'matplotlib', 'hydra') if m in sys.modules)); sys.exit(code)")
    result = fresh(code, "runs", cwd=tmp_path)
    assert result.returncode == 0 and "1 of 1 runs" in result.stdout, result.stderr
    assert result.stdout.splitlines()[-1] == ""  # none of them
