"""Plots drawn from a run's own records, after its training (they cost the epochs nothing), and `hsci plot`.

- `curves.png`: per epoch (per optimizer step where epochs validate more than once), the train and validation
  loss, the monitored validation value, the learning rate (metrics.jsonl);
- `confusion.png` for classification: the test split's confusion matrix, with the class names (summary.json's
  `classes`, test_predictions.npz); `predicted.png` for regression: predicted against true values;
- a sweep's `sweep.png`: the monitored validation value against each numeric value swept (log scale for learning
  rates and weight decays, and wherever the values span a factor of 100 or more), each value's mean over its
  jobs with its interval where there are 3 or more.

matplotlib draws without pyplot or a display (its Agg canvas): headless, in CI, over SSH.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hsci import UserError
from hsci.record import predictions

CURVES, CONFUSION, PREDICTED, SWEEP = "curves.png", "confusion.png", "predicted.png", "sweep.png"
DPI = 80


def _figure(width: float, height: float, **margins: float):
    """A figure of this size in inches, its plots within `margins` (fractions of it, as subplots_adjust takes them:
    set, not computed for each figure, which would double its cost)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(**({"left": 0.1, "right": 0.95, "bottom": 0.15, "top": 0.88} | margins))
    return fig


def draw_run(run_dir: Path) -> list[Path]:
    """Every plot a run's records allow, into the run directory; the files drawn."""
    summary = json.loads((run_dir / "summary.json").read_text())
    drawn = []
    records = _records(run_dir / "metrics.jsonl")
    if records:
        drawn.append(curves(records, summary, run_dir / CURVES))
    if (run_dir / predictions.FILE).is_file():
        p = predictions.load(run_dir)
        if "prob" in p:
            drawn.append(confusion(p, summary.get("classes"), run_dir / CONFUSION))
        else:
            drawn.append(predicted(p, run_dir / PREDICTED))
    return drawn


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(records: list[dict], summary: dict, path: Path) -> Path:
    monitor = summary.get("monitor") or ("val_acc" if any("val_acc" in r for r in records) else "val_loss")
    by_step = len({r["epoch"] for r in records}) < len(records)  # validations within epochs
    unit = "step" if by_step else "epoch"
    epochs = [r[unit] for r in records]
    fig = _figure(11, 3.6, left=0.06, right=0.98, top=0.8, wspace=0.3)
    loss, metric, lr = fig.subplots(1, 3)
    loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train", markersize=3)
    validated = [r for r in records if "val_loss" in r]  # an epoch that does not validate has no val_*
    loss.plot([r[unit] for r in validated], [r["val_loss"] for r in validated], "o-", label="validation", markersize=3)
    loss.set_title("loss")
    loss.legend()
    metric.plot([r[unit] for r in validated], [r.get(monitor) for r in validated], "o-", color="tab:green",
                markersize=3)
    best = summary.get(f"best_{unit}")
    if best:
        metric.axvline(best, color="gray", linestyle="--", linewidth=1, label=f"best {unit} ({best})")
        metric.legend()
    metric.set_title(monitor)
    lr.plot(epochs, [r["lr"] for r in records], "o-", color="tab:purple", markersize=3)
    lr.set_title("learning rate (at the epoch's start)")
    from matplotlib.ticker import MaxNLocator

    for ax in (loss, metric, lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step" if by_step else "epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary.get('name', '')}: {summary.get('status', '')}", fontsize=10)
    fig.savefig(path, dpi=DPI)
    return path


def confusion(p: dict, classes: list[str] | None, path: Path) -> Path:
    """Rows: the true class; columns: the predicted one; each cell's count, shaded by its share of the row."""
    k = p["prob"].shape[1] if p["prob"].ndim == 2 else 2
    names = classes if classes and len(classes) == k else [str(i) for i in range(k)]
    counts = np.zeros((k, k), dtype=int)
    np.add.at(counts, (p["target"].astype(int), p["predicted"].astype(int)), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = min(14.0, 2.5 + 0.45 * k)
    fig = _figure(size, size, left=0.14, right=0.97, bottom=0.14, top=0.93)
    ax = fig.subplots()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right" if
                      max(map(len, names)) > 2 else "center")
        ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test split: {len(p['target'])} examples, accuracy {np.mean(p['target'] == p['predicted']):.4f}; "
                 "shade: share of the true class", fontsize=9)
    fig.savefig(path, dpi=DPI)
    return path


def predicted(p: dict, path: Path) -> Path:
    fig = _figure(4.5, 4.5, left=0.16, bottom=0.12, top=0.92)
    ax = fig.subplots()
    ax.scatter(p["target"], p["predicted"], s=10, alpha=0.6)
    low, high = float(min(p["target"].min(), p["predicted"].min())), float(max(p["target"].max(),
                                                                                p["predicted"].max()))
    ax.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1, label="predicted = true")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(f"test split: {len(p['target'])} examples", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=DPI)
    return path


def draw_sweep(sweep_dir: Path, jobs: list[dict], metric: str) -> Path | None:
    """`metric` (a sweep summary row's key, e.g. best_val_acc) against each numeric value swept: every completed
    job as a point, each value's mean over its jobs (seeds, other settings) with a 95% interval where there are 3
    or more. None when nothing numeric was swept."""
    from hsci.analysis.found import assignments, numeric_axes
    from hsci.analysis.stats import describe

    done = [job | {"swept": assignments(job["overrides"].split())} for job in jobs
            if job.get("status") == "completed" and job.get(metric) is not None]
    axes = numeric_axes([job["swept"] for job in done])
    if not done or not axes:
        return None
    fig = _figure(4.2 * len(axes), 3.5, left=0.16 / len(axes), wspace=0.3)
    panels = fig.subplots(1, len(axes), squeeze=False)[0]
    for ax, key in zip(panels, axes):
        xs = [float(job["swept"][key]) for job in done]
        ys = [job[metric] for job in done]
        ax.scatter(xs, ys, s=14, alpha=0.5, label="jobs")
        values = sorted(set(xs))
        stats = [describe([y for x, y in zip(xs, ys) if x == v]) for v in values]
        means = [s["mean"] for s in stats]
        ax.plot(values, means, "o-", color="black", markersize=4, label="mean")
        with_ci = [(v, s) for v, s in zip(values, stats) if s["ci_low"] is not None]
        if with_ci:
            ax.errorbar([v for v, _ in with_ci], [s["mean"] for _, s in with_ci],
                        yerr=[[s["mean"] - s["ci_low"] for _, s in with_ci], [s["ci_high"] - s["mean"] for _, s in
                                                                              with_ci]],
                        fmt="none", color="black", capsize=3, label="95% interval")
        if min(values) > 0 and (max(values) / min(values) >= 100 or key.endswith(("lr", "weight_decay"))):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = sweep_dir / SWEEP
    fig.savefig(path, dpi=DPI)
    return path


def run_plot(args: list[str]) -> int:
    """`hsci plot run=<run dir>|latest`: draw a run's plots again from its records."""
    from hsci import report
    from hsci.record.owner import find_run

    options = dict(a.split("=", 1) for a in args if "=" in a)
    if set(options) != {"run"} or len(args) != 1:
        raise UserError("usage: hsci plot run=<run dir>|latest")
    run = find_run(options["run"], "run", needs="summary.json")
    drawn = draw_run(run)
    if not drawn:
        raise UserError(f"run={options['run']}: {run} has no records to draw yet (no epoch finished)")
    report.say("drawn: " + ", ".join(str(p) for p in drawn))
    return 0
