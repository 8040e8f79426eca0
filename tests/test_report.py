"""What a run prints fits a terminal: the epoch table in 80 columns whatever the task records, the settings a run
starts with in short lines, each still `key value` as summary.json names it."""

import io

import pytest
from rich.console import Console

from hsci import report

CLASSES = {"val_loss": 2.302585, "val_acc": 0.98125, "val_precision": 0.9813, "val_recall": 0.98, "val_f1": 0.9811}
MANY_CLASSES = CLASSES | {"val_top5": 0.9999}  # past 10 classes
REGRESSION = {"val_loss": 2915.34, "val_mse": 2915.34, "val_mae": 43.21, "val_r2": -0.4123}
SPEED = {"lr": 0.0009330127, "epoch_s": 812.4, "train_img_per_s": 123456.7, "data_wait_s": 12.31, "max_mem_gb": 23.45}


def table(records: list[dict], width: int) -> list[str]:
    """The epoch table's lines as a terminal `width` columns wide shows them."""
    shown = Console(file=io.StringIO(), force_terminal=True, width=width, highlight=False)
    saved, report.console = report.console, shown
    try:
        for record in records:
            report.epoch_row(record, first=record["epoch"] == 1)
    finally:
        report.console = saved
    return [line.rstrip() for line in shown.file.getvalue().replace("\x1b[1m", "").replace("\x1b[0m", "").splitlines()]


@pytest.mark.parametrize("metrics", [CLASSES, MANY_CLASSES, REGRESSION], ids=["classes", "top5", "regression"])
def test_the_epoch_table_fits_80_columns_whatever_the_task_records(metrics):
    records = [{"epoch": n, "train_loss": loss, **metrics, **SPEED} for n, loss in ((1, 4.6052), (10, 0.0004))]
    lines = table(records, width=200)
    assert len(lines) == 3 and max(map(len, lines)) <= 80
    header = lines[0].split()
    assert header[:3] == ["epoch", "train", "val"] and "lr" in header and "img/s" in header
    assert len({len(line) for line in lines}) == 1  # aligned: every value within its column
    assert header[3:] == [{"val_acc": "acc", "val_precision": "prec", "val_recall": "rec"}.get(k, k[4:])
                          for k in metrics if k != "val_loss"] + ["lr", "secs", "img/s", "wait", "mem"]  # every value
    assert lines[1].split()[1:3] == ["4.605", "2.303" if metrics is not REGRESSION else "2915"]
    assert lines[2].split()[1] == "4e-04"  # a small loss keeps its digit


def test_a_narrow_terminal_drops_what_matters_least_first():  # precision and recall (f1 sums them up), then ...
    lines = table([{"epoch": 1, "train_loss": 1.0, **MANY_CLASSES, **SPEED}], width=60)
    assert max(map(len, lines)) <= 60 and lines[0].split() == ["epoch", "train", "val", "acc", "f1", "top5", "lr",
                                                               "secs", "img/s"]


def test_the_settings_a_run_starts_with_are_short_lines(smoke):
    run, result = smoke
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(" parameters") or " parameters  " in line)
    settings = lines[start:start + 4]
    assert settings[0].startswith("53,002 parameters  train/val/test ") and " startup_s " in settings[0]
    assert settings[1].startswith("device cpu  precision fp32  channels_last False  loader torch  compile_s ")
    assert settings[2] == "world_size 1  nodes 1  backend None"
    assert settings[3] == f"run dir {run}"
    assert max(len(line) for line in settings[:3]) <= 80
