"""Finding runs and reading their records: a run directory, a sweep's folder, any folder that holds runs (such as
outputs/), or a glob of these; summary.json and test_predictions.npz are read, never a checkpoint."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hsci import UserError
from hsci.record.comparable import experiment, lower_is_better

# Folders that hold no run: inside a run, and outputs/mlflow/, MLflow's store (logger=mlflow), whose artifacts are
# copies of runs' records.
SKIP = {"checkpoints", ".hydra", "__pycache__", "mlflow"}


@dataclass(frozen=True)
class Run:
    """A run directory and its summary.json; `sweep` is the sweep's (or the tune's) folder when the run is one of its
    jobs (trials)."""

    dir: Path
    summary: dict
    sweep: Path | None = None

    @property
    def status(self) -> str:
        return self.summary.get("status", "unknown")

    @property
    def seed(self):
        return self.summary.get("seed")

    @property
    def comparable(self) -> dict:
        """summary.json's `comparable`; for a run saved before hsci recorded it, its experiment's config from its
        saved config (.hydra/config.yaml), and no fingerprint of its splits."""
        if self.summary.get("comparable"):
            return self.summary["comparable"]
        import yaml

        try:
            config = yaml.safe_load((self.dir / ".hydra" / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return {}
        data = config.get("data") if isinstance(config, dict) else None
        return {"data": data.get("_target_") if isinstance(data, dict) else None, "test_split": None,
                "config": experiment(config) if isinstance(config, dict) else {}}

    def value(self, metric: str) -> float | None:
        """`test.acc` (the best checkpoint's test metric) or `val.acc` (the best validation value)."""
        stage, _, name = metric.partition(".")
        found = (self.summary.get("test") or {}) if stage == "test" else (self.summary.get("best_val") or {})
        value = found.get(name if stage == "test" else f"val_{name}")
        return float(value) if isinstance(value, (int, float)) else None


def arguments(args: list[str], known: tuple[str, ...]) -> tuple[dict[str, str], list[str], list[str]]:
    """A verb's arguments as (options: `key=value` of a `known` key, places: runs and folders, unknown options). A
    sweep job's folder holds `=` too (`3_optimizer=sgd,seed=0`): an argument with a path's `/`, or that names what
    exists, is a place."""
    options, places, unknown = {}, [], []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key in known:
            options[key] = value
        elif arg.startswith("-") or eq and "/" not in key and not glob.has_magic(arg) and not Path(arg).exists():
            unknown.append(key)
        else:
            places.append(arg)
    return options, places, unknown


def find(places: list[str]) -> tuple[list[Run], int]:
    """The runs in `places` (run dirs, sweep dirs, folders of runs, globs), each once, in the order given (a
    folder's runs by path), and how many run folders had no readable summary.json."""
    runs: dict[Path, Run] = {}
    unreadable = 0
    for place in places:
        matches = sorted(glob.glob(os.path.expanduser(place))) if glob.has_magic(place) else [place]
        if not matches or not Path(os.path.expanduser(matches[0])).exists():
            raise UserError(f"{place}: no such run directory or folder; give run directories, sweep folders, "
                            "folders of runs (outputs) or globs of these")
        for match in matches:
            for folder in _run_dirs(Path(os.path.expanduser(match))):
                if folder.resolve() in runs:
                    continue
                try:
                    summary = json.loads((folder / "summary.json").read_text())
                except (OSError, ValueError):
                    unreadable += 1
                    continue
                sweep = folder.parent if any((folder.parent / f).is_file() for f in ("multirun.yaml", "tune.json")) \
                    else None
                runs[folder.resolve()] = Run(folder, summary if isinstance(summary, dict) else {}, sweep)
    return list(runs.values()), unreadable


def _run_dirs(folder: Path) -> list[Path]:
    if (folder / "summary.json").is_file():
        return [folder]
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIP)
        if "summary.json" in files:
            found.append(Path(root))
            dirs[:] = []  # a run holds no other run
    return found


def assignments(overrides: list[str]) -> dict[str, str]:
    """Overrides as {key: value}: `optimizer.lr=0.1` (or `+x=1`, `~x`) as {"optimizer.lr": "0.1"}."""
    return dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)


def numeric_axes(each: list[dict[str, str]]) -> list[str]:
    """The keys besides the seed whose values vary among `each` (assignments) and are all numbers."""
    keys = sorted({k for a in each for k in a})
    axes = []
    for key in keys:
        values = [a.get(key) for a in each]
        if key == "seed" or len(set(values)) < 2:
            continue
        try:
            [float(v) for v in values]
        except (TypeError, ValueError):
            continue
        axes.append(key)
    return axes


def monitored(runs: list[Run]) -> str:
    """The metric to compare by default: the test value of what the runs monitored (trainer.monitor: val_acc
    compares test.acc; val_loss test.loss)."""
    monitors = {run.summary.get("monitor") for run in runs if run.summary.get("monitor")}
    key = sorted(monitors)[0] if monitors else "val_acc"
    return "test." + key.removeprefix("val_")


def higher_is_better(metric: str) -> bool:
    return not lower_is_better(metric)
