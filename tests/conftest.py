"""Shared test helpers: compose the real configs, run the real CLI, write datasets in their real formats.

`hsci(...)` runs the CLI's `main` in this process, as `hsci ...` would run in a process of its own: in its own
folder and environment, with its own console (captured, in the encoding PYTHONIOENCODING names), Hydra's global
state, stop signals, logging and warnings as a fresh process has them; when it returns, the run directories it
owned are released and what it left for the interpreter's exit runs, as when a process ends. `hsci_process(...)`
runs it in a subprocess, for what needs one: signals, pipes, several processes, the installed executable, a fresh
interpreter's start-up.

The suite runs several torch processes at once on few cores (pytest-xdist's workers, and the processes tests
start): their idle OpenMP threads sleep rather than spin (OMP_WAIT_POLICY), which changes no result.
"""

import atexit
import io
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported here or in any process started

import numpy as np
import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from PIL import Image

import hsci as hsci_package
from hsci import interrupt
from hsci.cli import config_dir, main
from hsci.parts import schema
from hsci.parts.keys import FROM_RUN
from hsci.record import owner

OFFLINE = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
FRESH_WARNINGS = list(warnings.filters)  # as the interpreter starts (pytest sets its own around each test)
STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture
def cfg_of():
    """compose(overrides) -> the composed config, as `hsci train` would see it (hydra node removed)."""
    schema.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()


def hsci(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI's `main` in this process, as `hsci *args` in `cwd` with `env` (stdout a pipe: plain
    output); `timeout` is a subprocess's only. One call at a time: the folder and the console are the process's."""
    assert threading.current_thread() is threading.main_thread(), "hsci() runs in the main thread only"
    with _as_a_process(cwd, env) as (out, err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return subprocess.CompletedProcess(["hsci", *args], code, _text(out), _text(err))


def hsci_process(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would, with stdout a pipe (plain output)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "", **OFFLINE, **(env or {})}  # no downloads, network or not
    return subprocess.run([sys.executable, "-m", "hsci", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _console(encoding: str, errors: str) -> io.TextIOWrapper:
    """A console stream as Python makes it for a pipe: `encoding`, and what it does with a character that the
    encoding lacks."""
    return io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors, write_through=True)


def _text(stream: io.TextIOWrapper) -> str:
    return stream.buffer.getvalue().decode(stream.encoding, errors="backslashreplace")


@contextmanager
def _as_a_process(cwd: Path, env: dict | None):
    """This process, for the length of one CLI call, as a fresh `hsci` process would be; put back afterwards."""
    env = {"HYDRA_FULL_ERROR": "", **OFFLINE, **(env or {})}
    saved = {"cwd": os.getcwd(), "env": dict(os.environ), "argv": sys.argv[:], "streams": (sys.stdout, sys.stderr),
             "signals": {s: signal.getsignal(s) for s in STOPS}, "path": sys.path[:]}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]  # as a new interpreter adds them
    root = logging.getLogger()
    saved_logging = (root.handlers[:], root.level)
    encoding, _, errors = env.get("PYTHONIOENCODING", "utf-8").partition(":")
    out, err = _console(encoding, errors or "strict"), _console(encoding, "backslashreplace")  # as Python has them
    at_exit = []  # what the call leaves for the interpreter's exit (not what a module registers as it is imported)
    register, unregister = atexit.register, atexit.unregister

    def registered(func, *args, **kwargs):
        if sys._getframe(1).f_code.co_name != "<module>":
            at_exit.append((func, args, kwargs))
        return register(func, *args, **kwargs)

    def unregistered(func):
        at_exit[:] = [entry for entry in at_exit if entry[0] is not func]
        return unregister(func)

    os.chdir(cwd)
    os.environ.update(env)
    sys.stdout, sys.stderr = out, err
    sys.path[:0] = paths
    for s in STOPS:
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    _fresh_hydra()
    hsci_package.STARTED = time.time()
    interrupt.received.clear()
    interrupt.quit_now.clear()
    interrupt.taken.clear()
    atexit.register, atexit.unregister = registered, unregistered
    try:
        with warnings.catch_warnings():
            warnings.filters[:] = FRESH_WARNINGS  # shown on the captured stderr, as a process would show them
            yield out, err
            atexit.register, atexit.unregister = register, unregister
            for func, args, kwargs in at_exit:  # the process ends
                unregister(func)
                func(*args, **kwargs)
    finally:
        atexit.register, atexit.unregister = register, unregister
        for folder in list(owner._held):  # what a process owned is free once it ends
            owner.release(folder)
        interrupt.received.clear()
        interrupt.quit_now.clear()
        interrupt.taken.clear()
        for handler in root.handlers:
            if handler not in saved_logging[0]:
                handler.close()
        root.handlers[:], _ = saved_logging
        root.setLevel(saved_logging[1])
        _fresh_hydra()
        _forget(ConfigStore.instance().repo)
        for s, handler in saved["signals"].items():
            signal.signal(s, handler)
        sys.stdout, sys.stderr = saved["streams"]
        sys.argv[:] = saved["argv"]
        sys.path[:] = saved["path"]
        for name, module in list(sys.modules.items()):  # what came from its PYTHONPATH goes with the process
            if any(str(getattr(module, "__file__", None) or "").startswith(p) for p in paths):
                del sys.modules[name]
        os.environ.clear()
        os.environ.update(saved["env"])
        os.chdir(saved["cwd"])


def _forget(folder: dict) -> None:
    """Take out of Hydra's ConfigStore the configs that `hsci train from=<run>` kept there for its process."""
    folder.pop(f"{FROM_RUN}.yaml", None)
    for entry in folder.values():
        if isinstance(entry, dict):
            _forget(entry)


def _fresh_hydra() -> None:
    """Hydra's global state as a process starts with it: not initialised, no job's config."""
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


def once(tmp_path_factory, name: str, make: Callable[[Path], dict]) -> dict:
    """What `make(folder)` returns (plain values), made once per test session: under pytest-xdist by the first
    worker that asks, in a folder the workers share, while the others wait (a file lock) and then read it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # this session's, above each worker's own
    with FileLock(str(shared / f"{name}.lock")):
        made = shared / f"{name}.json"
        if not made.is_file():
            (shared / name).mkdir()
            made.write_text(json.dumps(make(shared / name)))
        return json.loads(made.read_text())


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One finished smoke run (digits, cnn) and what `hsci train experiment=smoke` printed, made once for the tests
    that only read it; tests that change it copy it first."""

    def make(cwd: Path) -> dict:
        result = hsci("train", "experiment=smoke", cwd=cwd)
        assert result.returncode == 0, result.stderr
        [run] = run_dirs(cwd)
        return {"run": str(run), "args": result.args, "returncode": result.returncode, "stdout": result.stdout,
                "stderr": result.stderr}

    made = once(tmp_path_factory, "smoke", make)
    return Path(made["run"]), subprocess.CompletedProcess(made["args"], made["returncode"], made["stdout"],
                                                          made["stderr"])


@pytest.fixture(scope="session")
def finished(smoke) -> Path:
    """The shared smoke run's directory (see `smoke`)."""
    return smoke[0]


def run_dirs(cwd: Path) -> list[Path]:
    """The single-run directories under cwd/outputs/<date>/, oldest first."""
    return sorted(p for p in (cwd / "outputs").glob("*/*") if p.parent.name != "multirun" and p.is_dir())


def job_folder(sweep: Path, number: int | str) -> Path:
    """A sweep's job folder by the job's number: `<number>_<what the job varies>`, or the number alone."""
    [folder] = [d for d in sweep.iterdir() if d.is_dir() and d.name.split("_")[0] == str(number)]
    return folder


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def write_idx(root: Path, folder: str, n_train: int = 120, n_test: int = 40) -> None:
    """MNIST-style idx files (big-endian header, uint8 payload) in <root>/<folder>/raw, as torchvision keeps them."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_cifar(root: Path, hundred: bool = False, per_batch: int = 40) -> None:
    """CIFAR python-pickle batches (dicts of a uint8 (N, 3072) array and label lists) as the real tarball unpacks."""
    rng = np.random.default_rng(0)
    classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = "fine_labels" if hundred else "labels"
    for name in names:
        n = per_batch * (5 if name == "train" else 1)
        batch = {"batch_label": name, key: [int(i % classes) for i in range(n)],
                 "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "filenames": [f"img_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = ({"fine_label_names": [f"fine_{i}" for i in range(100)]} if hundred else
            {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]})
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)


def write_imagefolder(root: Path, splits=("train",), classes=("cat", "dog", "fox"), per_class: int = 12) -> None:
    """<root>/<split>/<class>/*.png|jpg with images of varied sizes and modes."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = (20 + 3 * i, 16 + 2 * c)
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(pixels).convert("L" if i % 3 == 0 else "RGB").save(folder / f"{i}.{ext}")
