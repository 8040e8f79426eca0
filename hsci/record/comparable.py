"""What makes two runs comparable, as summary.json records it (`comparable`): the same experiment (the config
without its seed and without the settings that change how a run is carried out, not what it tests) on the same
held-out data (fingerprints of the test and validation splits). `hsci compare` groups runs by it, and refuses to
compare runs whose test splits differ. Importing it imports no torch: `hsci runs` and `hsci compare` read these.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the fingerprints are taken in a training run, which has imported torch
    from torch.utils.data import Dataset

    from hsci.parts.datasets import Data

# Keys that do not change the experiment: where the data lies and how it is fed, on which devices and how fast, how
# often the loop reports, the run's name, tags and seed. Two runs that differ in these only are replicates of one
# config.
NOT_EXPERIMENT = ("seed", "name", "tags", "resume", "data.root", "data.download", "data.num_workers", "data.loader",
                  "trainer.device", "trainer.devices", "trainer.log_every", "trainer.channels_last", "trainer.compile",
                  "trainer.deterministic", "trainer.dist_timeout_s")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of a metric (val_loss, test.mse, ...) is the better one: losses and errors."""
    return metric.endswith(("loss", "mse", "mae"))


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config as {"data.batch_size": 128, ...}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def experiment(config: dict) -> dict:
    """The config's keys that define the experiment, flattened: all but NOT_EXPERIMENT and the loggers' (where a
    run is watched from is not what it is)."""
    return {k: v for k, v in flatten(config).items() if k not in NOT_EXPERIMENT and k.split(".")[0] != "logger"}


def comparable(config: dict, data: Data) -> dict:
    """What summary.json records under `comparable`: the dataset's builder, its splits' fingerprints and sizes,
    and the experiment's config."""
    return {"data": config["data"].get("_target_"), "test_split": fingerprint(data.test), "test_size": len(data.test),
            "val_split": fingerprint(data.val), "val_size": len(data.val), "config": experiment(config)}


def fingerprint(split: Dataset) -> str | None:
    """A hash of what a split holds, in order: an in-memory split's values and labels; image files' names (class
    folder and file), sizes and labels; another dataset's length and `targets`. None when none of these is known
    (a user's own dataset without `targets`)."""
    import numpy as np
    import torch

    from hsci.parts.datasets import Tensors

    h = hashlib.sha256()
    if isinstance(split, Tensors):
        for t in (split.x, split.y):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.contiguous().numpy().tobytes())
    elif hasattr(split, "samples"):  # ImageFiles (and torchvision's ImageFolder): (path, label) pairs
        for path, label in split.samples:
            h.update(f"{os.path.join(*os.path.normpath(path).split(os.sep)[-2:])}\0{os.path.getsize(path)}\0{label}\n"
                     .encode())
    elif hasattr(split, "targets"):
        h.update(f"{len(split)}\0".encode() + np.asarray(torch.as_tensor(split.targets)).tobytes())
    else:
        return None
    return "sha256:" + h.hexdigest()[:16]


def class_names(data: Data) -> list[str] | None:
    """The names of a classification dataset's classes: the test split's `classes` (torchvision's convention:
    CIFAR's names, an image folder's folder names), else the class numbers; None for regression."""
    if data.task == "regression":
        return None
    names = getattr(data.test, "classes", None)
    count = 2 if data.task == "binary" else data.num_outputs
    if names is None or len(names) != count:
        return [str(i) for i in range(count)]
    return [str(name) for name in names]
