"""Metrics, the evaluation pass over a validation or test split, and `hsci eval` (of a run's own split, or of a
labelled folder of images).

torchmetrics computes the metrics (and sums them over the ranks of a run on several processes). Importing it
costs seconds, as it imports SciPy and torchvision, so a run imports it when it first evaluates (`Metrics`).
"""

from __future__ import annotations

import re
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from hsci import UserError, interrupt, report
from hsci.loop.predict import as_data, recorded_inputs, restored
from hsci.parts.build import Parts, build, compose, stage_limit
from hsci.parts.datafiles import folder_classes, labelled_folder
from hsci.parts.datasets import Data
from hsci.parts.loaders import limited_samples
from hsci.record import rundir
from hsci.record.comparable import lower_is_better
from hsci.record.owner import find_run

if TYPE_CHECKING:  # torchmetrics is imported when the metrics are made
    from torchmetrics import MetricCollection


def metric_names(task: str, num_outputs: int) -> list[str]:
    """What `make_metrics` computes for a task, named without importing torchmetrics."""
    if task == "regression":
        return ["mse", "mae", "r2"]
    return ["acc", "precision", "recall", "f1"] + (["top5"] if task == "multiclass" and num_outputs > 10 else [])


class Metrics:
    """A task's metrics on `device`: their `names` at once, the torchmetrics collection when first used."""

    def __init__(self, task: str, num_outputs: int, device: torch.device):
        self.task, self.num_outputs, self.device = task, num_outputs, device
        self.names = metric_names(task, num_outputs)

    @cached_property
    def collection(self) -> MetricCollection:
        return make_metrics(self.task, self.num_outputs).to(self.device)


def make_metrics(task: str, num_outputs: int) -> MetricCollection:
    """Accuracy, precision, recall, F1 (+ top-5 past 10 classes) for classification; MSE, MAE, R^2 for regression."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (BinaryAccuracy, BinaryF1Score, BinaryPrecision, BinaryRecall,
                                             MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision,
                                             MulticlassRecall)
    from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

    if task == "regression":
        return MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()})
    if task == "binary":
        return MetricCollection({"acc": BinaryAccuracy(validate_args=False),
                                 "precision": BinaryPrecision(validate_args=False),
                                 "recall": BinaryRecall(validate_args=False), "f1": BinaryF1Score(validate_args=False)})
    k = {"num_classes": num_outputs, "validate_args": False}
    metrics = {"acc": MulticlassAccuracy(average="micro", **k), "precision": MulticlassPrecision(average="macro", **k),
               "recall": MulticlassRecall(average="macro", **k), "f1": MulticlassF1Score(average="macro", **k)}
    if num_outputs > 10:
        metrics["top5"] = MulticlassAccuracy(average="micro", top_k=5, **k)
    return MetricCollection(metrics)


def monitor(choice: str, task: str, metrics: Metrics) -> tuple[str, str]:
    """The validation value that picks the best checkpoint and drives early stopping (`trainer.monitor`), and
    whether higher ("max") or lower ("min") is better: `auto` is accuracy for classification and the loss for
    regression; losses and errors are better lower, every other metric higher."""
    key = ("val_loss" if task == "regression" else "val_acc") if choice == "auto" else choice
    recorded = ["val_loss", *(f"val_{name}" for name in metrics.names)]
    if key not in recorded:
        raise UserError(f"trainer.monitor={choice} is not recorded for this {task} dataset: use auto or one of "
                        + ", ".join(recorded))
    return key, "min" if lower_is_better(key) else "max"


def evaluate(parts: Parts, loader: DataLoader, metrics: Metrics, keep: list | None = None) -> dict[str, float] | None:
    """Mean loss and metrics of `parts.model` over `loader`, read once at the end; None when a stop signal arrives
    first. With several ranks, each evaluates its part of the split and the sums are taken over all of them.
    `keep`, if given, gets each batch's (scores, targets) on the device (`scores`)."""
    model, world = parts.model, parts.world
    collection = metrics.collection  # made outside inference mode, as before this function ran in it
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        collection.reset()
        loss_sum, n = torch.zeros((), device=device), torch.zeros((), device=device)
        for x, y in loader:
            x, y = parts.to_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            with parts.amp():
                out = model(x)
                loss_sum += parts.loss_fn(out, y).float() * len(y)
            n += len(y)
            predictions = _predictions(out.float(), y, parts.data)
            collection.update(*predictions)
            if keep is not None:
                keep.append(scores(*predictions, parts.data.task))
            if interrupt.requested():
                break
        if world.stop():  # every rank agrees, once its part is done or it got the signal
            return None
        loss_sum, n = world.total(torch.stack([loss_sum, n])).tolist()
        if n == 0:
            raise UserError("nothing to evaluate: the split is empty")
        return {"loss": loss_sum / n, **{k: v.item() for k, v in collection.compute().items()}}  # summed over ranks


def _predictions(out: torch.Tensor, y: torch.Tensor, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, targets) in the form the task's metrics take."""
    if data.task == "binary":
        return out.sigmoid().squeeze(1), y.squeeze(1).long()
    if data.task == "regression":  # back to the dataset's own units
        mean, std = data.scaling.target_mean, data.scaling.target_std
        return out.squeeze(1) * std + mean, y.squeeze(1) * std + mean
    return out, y


def scores(predicted: torch.Tensor, target: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's (scores, targets) as hsci/record/predictions.py keeps them: class probabilities (B, C) for
    multiclass, the positive class's (B,) for binary, predictions (B,) for regression."""
    return (predicted.softmax(1) if task == "multiclass" else predicted), target


def kept(batches: list, world) -> tuple[np.ndarray, np.ndarray]:
    """The (scores, targets) that `evaluate` kept, of the whole split: every rank's part, in order."""
    if not batches:
        return np.zeros((0,)), np.zeros((0,))
    mine = [torch.cat(column).float().cpu().numpy() for column in zip(*batches)]
    return tuple(np.concatenate(whole) for whole in zip(*world.gather(mine)))


def run_eval(args: list[str]) -> int:
    """`hsci eval run=<run dir>|latest [split=test|val] [data.*=... trainer.*=...]`: a run's best checkpoint
    with the run's own config; `data.root=<folder>` of <class>/ images (no train/): on that folder (`on_folder`);
    or `hsci eval checkpoint=<file.pt> model=... data=... [key=value ...]`."""
    opts = dict(a.split("=", 1) for a in args if a.split("=", 1)[0] in ("run", "checkpoint", "split"))
    changes = [a for a in args if a.split("=", 1)[0] not in opts]
    split = opts.get("split", "test")
    if split not in ("test", "val") or ("run" in opts) == ("checkpoint" in opts):
        raise UserError("usage: hsci eval run=<run dir>|latest [split=test|val], or hsci eval checkpoint=<file.pt> "
                        "model=... data=... (see hsci --help)")
    if "run" in opts:
        run = find_run(opts["run"], "run", needs="checkpoints/best.pt")
        folder = labelled(changes)
        if folder and "split" in opts:
            raise UserError(f"split={split}: a labelled folder is evaluated whole; leave split out")
        # A labelled folder's images are prepared as the run prepared its own: only how they are fed may change.
        allowed = ("data.batch_size", "data.num_workers", "trainer.") if folder else ("data.", "trainer.")
        cfg = rundir.load_config(run, [c for c in changes if c != folder], allowed, "eval")
        checkpoint, out = run / "checkpoints" / "best.pt", run / f"eval_{split}.json"
        if not checkpoint.exists():
            raise UserError(f"run={opts['run']}: {run} has no checkpoints/best.pt yet (no epoch finished): "
                            f"resume it with hsci train resume={run}")
        if folder:
            return on_folder(run, cfg, Path(_value(folder)).expanduser().resolve(), changes)
    else:
        cfg, checkpoint, out = compose(changes), Path(opts["checkpoint"]).expanduser().resolve(), None
    state = rundir.load_checkpoint(checkpoint)
    p = build(cfg, restoring=True)
    rundir.load_weights(p.model, state.get("model", state), checkpoint)  # an hsci checkpoint or a bare state dict
    results = evaluate(p, p.loaders.test if split == "test" else p.loaders.val, Metrics(p.data.task, p.data.num_outputs,
                                                                                     p.device))
    report.metrics_table(f"{split} split, {checkpoint}", results)
    if out:
        rundir.write_json(out, {"split": split, "checkpoint": str(checkpoint), "metrics": results,
                                "device": str(p.device), "changes": changes, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "versions": rundir.versions()})
        report.say(f"written: {out}")
    return 0


def on_folder(run: Path, cfg: DictConfig, folder: Path, changes: list[str]) -> int:
    """`hsci eval run=<run dir> data.root=<folder>`: the run's best checkpoint on every image of a labelled folder,
    <folder>/<class>/, its classes matched to the run's by name, prepared as the run's test images; the result in
    <run>/eval_on_<folder name>.json, beside the run's own."""
    checkpoint = run / "checkpoints" / "best.pt"
    state = rundir.load_checkpoint(checkpoint)
    seen = recorded_inputs(state, cfg, run)
    shape = seen["input_shape"]
    if seen["task"] != "multiclass" or len(shape) != 3:
        raise UserError(f"data.root={folder}: a folder of <class>/ images evaluates a model that classifies images; "
                        f"this run's is a {seen['task']} model of inputs {tuple(shape)}")
    images = labelled_folder(str(folder), seen["classes"], (shape[0], shape[1]))
    p = restored(cfg, as_data(seen, images, cfg), state, checkpoint)
    results = evaluate(p, p.loaders.test, Metrics(p.data.task, p.data.num_outputs, p.device))
    n = limited_samples(stage_limit(cfg.trainer, "test"), len(images), p.data.loading.batch_size)
    classes = sorted({images.classes[label] for _, label in images.samples})
    report.metrics_table(f"{folder}: {n} images of {len(classes)} classes (matched by name), {checkpoint}", results)
    out = run / f"eval_on_{re.sub(r'[^A-Za-z0-9_.-]+', '_', folder.name)}.json"
    rundir.write_json(out, {"data": str(folder), "images": n, "classes": classes, "checkpoint": str(checkpoint),
                            "metrics": results, "device": str(p.device), "changes": changes,
                            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": rundir.versions()})
    report.say(f"written: {out}")
    return 0


def labelled(changes: list[str]) -> str | None:
    """The `data.root=` change, if it names a labelled folder (<class>/ folders of images, no train/)."""
    for change in changes:
        if change.startswith("data.root="):
            try:
                folder = Path(_value(change)).expanduser()
            except (OverrideParseException, ValueError, TypeError):
                return None  # load_config says what is wrong with it
            return change if folder_classes(folder) is not None else None
    return None


def _value(change: str) -> str:
    """The value of a key=value change, as Hydra's grammar reads it (quotes removed)."""
    return str(OverridesParser.create().parse_overrides([change])[0].value())
