"""hsci: config-driven deep-learning experiments.

This module holds what every layer may use without importing torch or Hydra: where the shipped configs
are, the errors hsci reports to the user in one line, and a console that never fails a run.
"""

import io
import itertools
import os
import re
import sys
import time
from pathlib import Path

__version__ = "0.1.0"
STARTED = time.time()  # about when the process started: startup_s in summary.json counts from here


class UserError(Exception):
    """A problem the user can fix: the message names it and says how, in one line."""


class Refused(SystemExit):
    """A run refused before it started, raised from inside Hydra (whose error report would bury it under a
    traceback): `hsci train` prints `message` as one line and exits with `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(code)
        self.message = message


def user_error(e: BaseException | None) -> UserError | None:
    """The UserError behind `e`, if any: Hydra's instantiate wraps what a builder raises, and a DataLoader
    worker's error comes back with its traceback in the message."""
    while e is not None and not isinstance(e, UserError):
        e = e.__cause__
    if e is not None and "Traceback" in str(e):
        return UserError(str(e).strip().splitlines()[-1].removeprefix("hsci.UserError: "))
    return e


def flat(text: object) -> str:
    """A message (an exception's, say) on one line: its lines and runs of spaces joined by single spaces."""
    return " ".join(str(text).split())


def new_folder(base: Path) -> Path:
    """Create the folder `base`, or base_2, base_3, ... when another process took it at the same moment (runs,
    tunes and comparisons are named by the second they start)."""
    for n in itertools.count(1):
        folder = base if n == 1 else base.with_name(f"{base.name}_{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue


def config_dir() -> Path:
    """The shipped configs: inside the installed package, or the repository's top-level conf/."""
    here = Path(__file__).resolve().parent
    return next(d for d in (here / "conf", here.parent / "conf") if d.is_dir())


def one_line(report: str) -> str:
    """Hydra's multi-line report of a config error as one line: the problem, then its details."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # an error outside composition: its last line
        lines = [line for line in lines if not line.startswith("Set the environment")][-1:]
    noise = ("full_key:", "object_type=", "reference_type=", "Set the environment variable HYDRA_FULL_ERROR",
             "To append to your config use", "provider=", "Config search path:")
    out, options = [], []
    for line in lines:
        if line.startswith(noise):
            continue
        if out and out[-1].startswith("Available options in"):
            options.append(line)
            continue
        out.append(line)
    if options:
        out[-1] += " " + ", ".join(options)
    return "; ".join(line.rstrip(".:") if i < len(out) - 1 else line for i, line in enumerate(out))


def quote(value: str, mark: str = "'") -> str:
    """A value quoted for Hydra's override grammar (and OmegaConf's, which quotes alike) with `mark`, ' or ":
    the mark is escaped, and so are the backslashes right before it or the closing one; any other backslash
    stands as it is."""
    escaped = re.sub(rf"(\\*)({mark}|\Z)", lambda m: m[1] * 2 + ("\\" + mark if m[2] else ""), value)
    return mark + escaped + mark


class BestEffort:
    """The console as a best-effort stream: a pipe that closes (`hsci train | head`) or a terminal that goes
    away never fails the run, whose record is its directory. Characters the console cannot encode are
    escaped; after the first failed write, output goes to /dev/null."""

    def __init__(self, stream):
        self.stream = stream
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")

    @classmethod
    def around(cls, stream):
        return stream if isinstance(stream, cls) or stream is None else cls(stream)

    def write(self, s: str) -> int:
        try:
            self.stream.write(s)
        except (OSError, ValueError):  # EPIPE, EIO from a hung-up terminal; ValueError: the stream was closed
            self._drop()
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self._drop()

    def _drop(self) -> None:
        """From now on write to /dev/null, through the same file descriptor, so that the interpreter's own
        flush at exit does not fail either."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        self.stream = open(os.devnull, "w")

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str):  # fileno, encoding, errors, buffer ...: the stream's own
        return getattr(self.stream, name)


def best_effort() -> None:
    """Make this process's console (stdout and stderr) best effort: `BestEffort`."""
    sys.stdout, sys.stderr = BestEffort.around(sys.stdout), BestEffort.around(sys.stderr)
