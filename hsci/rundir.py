"""The run directory is the record: summary.json, metrics.jsonl and checkpoints, each written safely."""

import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write `path` through a temporary file, fsync and rename: a reader sees the old file or the new, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode() + b"\n"))


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_checkpoint(path: Path, state: dict) -> None:
    """Save tensors and plain Python values only, so the file loads with `torch.load(weights_only=True)`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(state, f))


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide a run's numbers."""
    found = {"python": platform.python_version()}
    for pkg in ("hsci", "torch", "torchvision", "torchmetrics", "hydra-core", "omegaconf", "numpy", "scikit-learn"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def git_commit(folder: Path) -> str | None:
    """The commit checked out in `folder` (with "-dirty" for uncommitted changes), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
