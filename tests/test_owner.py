"""A run directory is owned and never silently lost: one process at a time, no run or sweep written over, a
moved run lives where it is, a console that goes away fails nothing, a read-only disk is one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import hsci, summary_of
from hsci import interrupt
from hsci.cli import one_line_errors
from hsci.record import rundir
from hsci.record.owner import owner


def snapshot(run: Path) -> dict:
    """Every file of a run directory, as bytes."""
    return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_a_training_run_is_owned_by_its_process_until_it_dies(tmp_path):
    run = tmp_path / "outputs" / "long"
    # It only has to train on while the others try its folder: one thread leaves the cores to the rest of the suite.
    proc = subprocess.Popen([sys.executable, "-m", "hsci", "train", "trainer.epochs=300", "data.num_workers=2",
                             f"hydra.run.dir={run}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not (run / "metrics.jsonl").exists():  # training, with two DataLoader workers forked
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert owner(run) == f"process {proc.pid} on {os.uname().nodename}"
    second, fixed = (hsci("train", *args, cwd=tmp_path)
                     for args in ([f"resume={run}"], ["experiment=smoke", f"hydra.run.dir={run}"]))
    latest = hsci("train", "resume=latest", cwd=tmp_path)
    assert proc.poll() is None  # none of them touched the run
    for result, code in ((second, 1), (fixed, 2)):
        assert result.returncode == code
        [line] = result.stderr.strip().splitlines()
        assert f"{run} is in use by process {proc.pid}" in line
    assert latest.returncode == 1 and "no run under" in latest.stderr and "that is not in use" in latest.stderr
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))  # each epoch once, by one process
    proc.kill()  # SIGKILL: no chance to clean up; its workers may live on a few seconds
    proc.wait()
    assert owner(run) is None  # the lock was the dead process's alone


def test_new_runs_never_write_into_an_old_one_wherever_the_path_comes_from(finished, tmp_path):
    runs = tmp_path / "runs"
    victim, moved = runs / "victim", tmp_path / "elsewhere" / "mo\\ved"  # a backslash in the path, too
    shutil.copytree(finished, victim)
    shutil.copytree(finished, moved)
    before = snapshot(victim)
    commands = [(["experiment=smoke", "hydra.run.dir=${oc.env:RUNS}/victim"], {"RUNS": str(runs)}),
                (["experiment=smoke", "hydra.run.dir=~/victim"], {"HOME": str(runs)}),
                ([f"resume={moved}", "trainer.epochs=3"], {})]
    interpolated, home, resumed = (hsci("train", *args, cwd=tmp_path, env=env) for args, env in commands)
    for result in (interpolated, home):
        assert result.returncode == 2
        assert result.stderr.strip() == (f"error: hydra.run.dir={victim} already holds a run: continue it with "
                                          f"resume={victim}, or choose a new directory")
    assert snapshot(victim) == before
    # A moved run resumes where it is now, and says so.
    assert resumed.returncode == 0, resumed.stderr
    assert summary_of(moved)["run_dir"] == str(moved) and summary_of(moved)["epochs_run"] == 3
    assert f"run directory: {moved}\n" in resumed.stdout and str(finished) not in resumed.stdout


def test_eval_of_a_received_run_never_writes_through_a_planted_link(finished, tmp_path):
    run = tmp_path / "received"
    shutil.copytree(finished, run)
    (run / ".eval_test.json.tmp").symlink_to(tmp_path / "elsewhere")  # a temporary file's name of the past
    (run / "eval_test.json").symlink_to(tmp_path / "there")
    result = hsci("eval", f"run={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "there").exists()
    assert (run / "eval_test.json").is_file() and not (run / "eval_test.json").is_symlink()


def test_two_writers_of_one_record_never_meet_in_its_temporary_file(tmp_path):
    # Two `hsci eval` of one run write its eval_<split>.json at the same moment; each write is whole.
    def write(text: str) -> None:
        for _ in range(300):
            rundir.write_json(tmp_path / "eval_val.json", {"by": text})

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, ["a", "b"]))  # raises what either writer raised
    assert json.loads((tmp_path / "eval_val.json").read_text())["by"] in ("a", "b")
    assert [p.name for p in tmp_path.iterdir()] == ["eval_val.json"]  # no temporary file left


def test_a_console_that_goes_away_or_cannot_encode_never_fails_the_run(tmp_path):
    piped = subprocess.run(["bash", "-c", f'"{sys.executable}" -m hsci train experiment=smoke hydra.run.dir=piped '
                            '| head -2; exit "${PIPESTATUS[0]}"'], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    ascii_console = hsci("train", "experiment=smoke", "hydra.run.dir='été/run'", cwd=tmp_path,
                         env={"PYTHONIOENCODING": "ascii"})
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 2 and piped.stderr == ""
    assert ascii_console.returncode == 0, ascii_console.stderr
    assert "run directory: " + str(tmp_path / "\\xe9t\\xe9" / "run") in ascii_console.stdout  # escaped, not fatal
    for run in (tmp_path / "piped", tmp_path / "été" / "run"):
        assert summary_of(run)["status"] == "completed"
        assert "test split, best checkpoint" in (run / "train.log").read_text()  # the record is whole


def test_resuming_on_a_read_only_disk_is_one_line_and_changes_nothing(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    resume = [sys.executable, "-m", "hsci", "train", f"resume={run}", "trainer.epochs=3"]
    if shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0:
        # In a mount namespace of its own, the run directory is bind-mounted read-only over itself.
        command = ["unshare", "-rm", "sh", "-c", f'mount --bind "{run}" "{run}" && '
                   f'mount -o remount,ro,bind "{run}" "{run}" && exec "$@"', "sh", *resume]
    elif os.geteuid() != 0:  # without namespaces, permissions make it read-only for anyone but root
        run.chmod(0o555)
        command = resume
    else:
        pytest.skip("root without user and mount namespaces: no way here to make a folder read-only")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    run.chmod(0o755)
    assert result.returncode == 1
    reason = "Read-only file system" if command[0] == "unshare" else "Permission denied"
    assert result.stderr.strip() == (f"error: resume: cannot write to {run} ({reason}): copy the run directory to a "
                                     "writable folder and resume the copy, or start hsci where it can write")
    assert snapshot(run) == before


def test_ctrl_c_during_eval_or_bench_is_one_line(finished, tmp_path):
    def interrupted(args: list[str]) -> subprocess.CompletedProcess:
        # Ctrl-C as a terminal delivers it, even when the tests run in the background of a shell script,
        # which starts them with SIGINT ignored (hsci keeps an ignored Ctrl-C ignored, as nohup and & expect).
        proc = subprocess.Popen([sys.executable, "-m", "hsci", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(1.5)  # past the interpreter's start, where Python's own Ctrl-C handling begins
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # and a second one
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # it did not stop: fail, without leaving it to run on past the test
            proc.kill()
            proc.communicate()
            raise
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    with ThreadPoolExecutor(2) as pool:
        # Both would take minutes: eval on 100,000 generated images, bench over 100,000 steps.
        eval_args = ["eval", f"checkpoint={finished / 'checkpoints' / 'best.pt'}", "model=cnn", "data=fake",
                     "data.image_shape=[1,8,8]", "data.mean=[0.5]", "data.std=[0.25]", "data.test_size=100000"]
        results = list(pool.map(interrupted, [eval_args, ["bench", "steps=100000"]]))
    for result in results:
        # 130; or killed by SIGINT itself (which a shell reports as 130 too), as CPython ends a process whose
        # Ctrl-C landed in code that torch's import runs through PyRun_*, even once the exception was handled.
        assert result.returncode in (130, -signal.SIGINT)
        assert result.stderr.strip() == "error: stopped by Ctrl-C"


def test_a_ctrl_c_that_python_turned_into_another_error_is_still_a_ctrl_c(capsys):
    # Landing inside a class's creation (an import), Python 3.11 wraps the KeyboardInterrupt in a RuntimeError.
    def verb(args: list[str]) -> int:
        try:
            interrupt.at_once(signal.SIGINT, None)
        except KeyboardInterrupt:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance 'choices' in 'RuntimeConf'") from None

    before = signal.getsignal(signal.SIGINT)
    try:
        assert one_line_errors(verb, []) == 130
    finally:
        signal.signal(signal.SIGINT, before)
        interrupt.quit_now.clear()
    assert capsys.readouterr().err == "error: stopped by Ctrl-C\n"

    def failing(args: list[str]) -> int:  # the same error without a Ctrl-C is an error
        raise RuntimeError("Error calling __set_name__")

    assert one_line_errors(failing, []) == 1 and "RuntimeError: Error calling __set_name__" in capsys.readouterr().err
