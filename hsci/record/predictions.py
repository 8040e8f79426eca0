"""A run's per-example test predictions (`test_predictions.npz` in the run directory) and what they say of the test
metrics: a 95% interval for each (`intervals`).

The file is what a paired comparison of two models on the same test examples needs (`hsci compare`: McNemar's
test, the per-class table): for each example its index in the split (and its file, for image files), the true
label and the predicted one, and the class probabilities (float16); for regression the prediction, in the
dataset's units. The image file of each example is `path`. It is read with NumPy's loader, which runs no code
from it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FILE = "test_predictions.npz"
LEVEL = 0.95
RESAMPLES = 1000  # bootstrap resamples of the test examples, seeded with the run's seed


def save(run_dir: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write the predictions (`index`, `target`, `predicted`, and `prob` and `path` where there are) compactly."""
    path = run_dir / FILE
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def load(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / FILE, allow_pickle=False) as f:
        return dict(f)


def arrays(task: str, scores: np.ndarray, targets: np.ndarray, files: list[str] | None = None) -> dict[str, np.ndarray]:
    """What `save` writes, from a split's outputs in order: class probabilities (N, C) for multiclass, the
    positive class's probability (N,) for binary, predictions (N,) for regression; and the targets."""
    n = len(targets)
    out = {"index": np.arange(n, dtype=np.int32)}
    if files is not None:
        out["path"] = np.asarray(files[:n], dtype=str)
    if task == "regression":
        return out | {"target": targets.astype(np.float32), "predicted": scores.astype(np.float32)}
    predicted = scores.argmax(1) if task == "multiclass" else (scores > 0.5).astype(np.int64)
    return out | {"target": targets.astype(np.int16), "predicted": predicted.astype(np.int16),
                  "prob": scores.astype(np.float16)}


def intervals(p: dict[str, np.ndarray], task: str, names: list[str], seed: int) -> dict:
    """A 95% interval for each test metric in `names`, from the predictions: accuracy (and top-5 accuracy), a
    proportion of examples, gets the Wilson score interval (`scipy.stats.binomtest`); the others a percentile
    bootstrap over the test examples (`scipy.stats.bootstrap`, RESAMPLES resamples, seeded)."""
    from scipy import stats

    target, predicted, n = p["target"], p["predicted"], len(p["target"])
    out = {"level": LEVEL, "n": n}
    if n == 0:
        return out
    for name in [name for name in names if name in ("acc", "top5")]:
        hits = predicted == target if name == "acc" else top5_hits(p)
        ci = stats.binomtest(int(hits.sum()), n).proportion_ci(LEVEL, method="wilson")
        out[name] = {"low": float(ci.low), "high": float(ci.high), "method": "wilson"}
    rest = [name for name in names if name not in ("acc", "top5")]
    if not rest or n < 2:
        return out
    if task == "regression":
        def statistic(t: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:  # all on the same resamples
            return np.stack([STATISTICS[name](t, q, axis) for name in rest])
    else:
        statistic = classification(rest, task, p)
    result = stats.bootstrap((target, predicted), statistic, paired=True, vectorized=True, n_resamples=RESAMPLES,
                             confidence_level=LEVEL, method="percentile", batch=250,
                             random_state=np.random.default_rng(seed))
    for name, low, high in zip(rest, *(np.atleast_1d(v) for v in result.confidence_interval)):
        if np.isfinite(low) and np.isfinite(high):
            out[name] = {"low": float(low), "high": float(high),
                         "method": f"bootstrap ({RESAMPLES} resamples of the test examples)"}
    return out


def per_class(p: dict[str, np.ndarray], classes: list[str]) -> dict[str, float | None]:
    """Each class's accuracy (its recall: the share of its test examples predicted as it); None for a class
    without test examples."""
    hits = np.bincount(p["target"][p["predicted"] == p["target"]], minlength=len(classes))
    totals = np.bincount(p["target"], minlength=len(classes))
    return {name: float(h / t) if t else None for name, h, t in zip(classes, hits, totals)}


def top5_hits(p: dict[str, np.ndarray]) -> np.ndarray:
    top = np.argsort(-p["prob"].astype(np.float32), axis=1)[:, :5]
    return (top == p["target"][:, None]).any(1)


def classification(names: list[str], task: str, p: dict[str, np.ndarray]):
    """The statistic of classification metrics (precision, recall, f1), stacked, as torchmetrics computes them
    (tests check they agree): binary for the positive class; macro over the classes present in the targets or the
    predictions, with 0 where a ratio has nothing below it."""
    classes = np.arange(2 if task == "binary" else p["prob"].shape[1])

    def statistic(target: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
        cells = np.apply_along_axis(np.bincount, -1, target * len(classes) + predicted, minlength=len(classes) ** 2)
        confusion = cells.reshape(*cells.shape[:-1], len(classes), len(classes))  # (..., true, predicted)
        tp = np.diagonal(confusion, axis1=-2, axis2=-1)
        fp, fn = confusion.sum(-2) - tp, confusion.sum(-1) - tp  # (..., C)
        scores = {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
                  "f1": _ratio(2 * tp, 2 * tp + fp + fn)}
        if task == "binary":
            return np.stack([scores[name][..., 1] for name in names])
        present = (tp + fp + fn) > 0
        return np.stack([(scores[name] * present).sum(-1) / np.maximum(present.sum(-1), 1) for name in names])

    return statistic


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(b > 0, a / np.maximum(b, 1), 0.0)


def _mse(target, predicted, axis=-1):
    return ((predicted - target) ** 2).mean(axis)


def _mae(target, predicted, axis=-1):
    return np.abs(predicted - target).mean(axis)


def _r2(target, predicted, axis=-1):
    residual = ((target - predicted) ** 2).sum(axis)
    total = ((target - target.mean(axis, keepdims=True)) ** 2).sum(axis)
    return 1 - residual / total


STATISTICS = {"mse": _mse, "mae": _mae, "r2": _r2}
