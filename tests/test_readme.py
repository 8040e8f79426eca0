"""The README describes what ships: its tables name exactly the config options and keys under conf/, the keys
a run records, and the metrics each task records."""

import json
import re
from pathlib import Path

import pytest

from hsci.cli import config_dir
from hsci.loop.evaluate import make_metrics
from hsci.parts.schema import MONITORS

README = (Path(__file__).parents[1] / "README.md").read_text()
GROUPS = sorted(d.name for d in config_dir().iterdir() if d.is_dir())
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def row(first_cell: str) -> list[str]:
    """The cells of the README table row whose first cell is `first_cell`."""
    [line] = [line for line in README.splitlines() if line.startswith(f"| {first_cell} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def named(text: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", text))


@pytest.mark.parametrize("group", GROUPS)
def test_the_config_table_names_every_option_of_each_group(group):
    assert named(row(f"`{group}`")[1]) == set(options(group))


@pytest.mark.parametrize("group", [g for g in GROUPS if g not in ("experiment", "debug")])  # overlays: no keys of their own
def test_the_config_table_names_every_key_of_each_group(cfg_of, group):
    shipped = set()
    for option in options(group):
        shipped |= {f"{group}.{key}" for key in cfg_of(f"{group}={option}")[group] if key not in HYDRA_KEYS}
    assert {name for name in named(row(f"`{group}`")[2]) if name.startswith(f"{group}.")} == shipped


def test_the_run_directory_table_names_exactly_what_a_run_records(finished):
    epoch = json.loads((finished / "metrics.jsonl").read_text().splitlines()[0])
    val = {k for k in epoch if k.startswith("val_")}
    assert named(row("`metrics.jsonl`")[1]) == (set(epoch) - val) | {"val_loss", "val_<metric>"}
    reading = json.loads((finished / "steps.jsonl").read_text().splitlines()[0])
    assert named(row("`steps.jsonl`")[1]) == set(reading) | {"trainer.log_every"}
    summary = json.loads((finished / "summary.json").read_text())
    # resumed: once a run is resumed; mlflow_run_id: with logger=mlflow; weights_from: with model.weights or init_from;
    # from: with from=<run>
    assert named(row("`summary.json`")[1]) == set(summary) | {"resumed", "mlflow_run_id", "weights_from", "from"}


def test_the_metrics_sentence_names_what_each_task_records():
    sentence = README[README.index("Metrics, recorded as"):]
    classification, regression = sentence[:sentence.index("\n\n")].split(" for classification;")
    assert named(classification) - {"val_<metric>", "test"} == set(make_metrics("multiclass", 100))
    assert set(make_metrics("binary", 1)) <= named(classification)
    assert named(regression) == set(make_metrics("regression", 1))


@pytest.mark.parametrize("task, classes", [("multiclass", 100), ("multiclass", 10), ("binary", 1), ("regression", 1)])
def test_trainer_monitor_may_name_what_each_task_records(task, classes):
    recorded = {"val_loss", *(f"val_{k}" for k in make_metrics(task, classes))}
    assert recorded == set(MONITORS[task]) - ({"val_top5"} if classes <= 10 else set())


def test_the_predictions_row_names_what_the_file_holds(finished):
    import numpy as np

    with np.load(finished / "test_predictions.npz", allow_pickle=False) as f:
        assert set(f.files) <= named(row("`test_predictions.npz`")[1])
