"""The run directory is the record: summary.json, metrics.jsonl and checkpoints, each written safely."""

import json
import os
import platform
import random
import subprocess
import tempfile
import time
import warnings
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from hsci import UserError
from hsci.parts import schema
from hsci.parts.keys import nearest
from hsci.record import signing


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write `path` through a new temporary file, fsync and rename: a reader sees the old file or the new,
    whole. Neither is written through a link (the temporary file is made anew under a name of its own, so
    two processes writing one file, two `hsci eval` of a run, never meet there; the rename replaces a link at
    `path` itself, not what it points to)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # O_EXCL: a new file
    try:
        with open(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode() + b"\n"))


def append_jsonl(path: Path, record: dict) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644), "w") as f:
        f.write(json.dumps(record) + "\n")


def write_config(run_dir: Path, config: dict) -> None:
    """Save the run's config as .hydra/config.yaml, signed as this user's (hsci/record/signing.py)."""
    text = OmegaConf.to_yaml(config).encode()
    (run_dir / ".hydra").mkdir(exist_ok=True)  # absent when hydra.output_subdir=null
    write_atomic(run_dir / ".hydra" / "config.yaml", lambda f: f.write(text))
    signatures = signing.signatures(run_dir, text)
    if signatures:
        write_atomic(run_dir / signing.SIGNATURE, lambda f: f.write(signatures.encode()))


def load_config(run_dir: Path, changes: list[str], allowed: tuple[str, ...], verb: str) -> DictConfig:
    """A run's saved config (.hydra/config.yaml) with `changes` (key=value) applied to keys starting with `allowed`.

    A config this user's hsci did not sign may name only what hsci's own configs can (hsci/record/signing.py)."""
    path = run_dir / ".hydra" / "config.yaml"
    try:
        text = path.read_bytes()
        saved = OmegaConf.create(text.decode())
        cfg = OmegaConf.merge(OmegaConf.structured(schema.Config), saved)
    except (OSError, OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{verb}: cannot read the config of {run_dir} ({str(e).splitlines()[0]})") from e
    OmegaConf.set_struct(cfg, True)
    try:
        for change in OverridesParser.create().parse_overrides(list(changes)):
            if not change.key_or_group.startswith(allowed) or change.is_sweep_override():
                raise UserError(f"{verb}: {change.input_line} would change the experiment; {verb} may change only "
                                f"{', '.join(a + ('*' if a.endswith('.') else '') for a in allowed)}")
            near = nearest(cfg, change.key_or_group) if OmegaConf.select(
                cfg, change.key_or_group, default="absent", throw_on_missing=False) == "absent" else None
            if near:
                raise UserError(f"{verb}: {change.input_line}: the run's config has no {change.key_or_group}: did you "
                                f"mean {near}?")
            OmegaConf.update(cfg, change.key_or_group, change.value(), merge=False)
    except (OmegaConfBaseException, ValueError) as e:
        raise UserError(f"{verb}: {' '.join(changes)}: {str(e).splitlines()[0]}") from e
    if not signing.signed(run_dir, text):
        signing.check(cfg, path, verb)
    return cfg


def keep_records(path: Path, last: dict[str, int]) -> None:
    """Keep the records of a metrics.jsonl or steps.jsonl up to `last` ({"step": 120}, or {"step": 120, "epoch": 3}),
    once each: a resumed run redoes the rest. A record is judged by the first key of `last` it holds (metrics.jsonl
    records written before they held `step`, by their `epoch`)."""
    if not path.exists():
        return
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        key = next((k for k in last if k in record), None)
        if key and record[key] <= last[key]:
            records[key, record[key]] = line
    write_atomic(path, lambda f: f.write("".join(records[k] + "\n" for k in sorted(records)).encode()))


def save_checkpoint(path: Path, state: dict) -> None:
    """Save tensors and plain Python values only, so the file loads with `torch.load(weights_only=True)`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, needs: tuple[str, ...] = ()) -> dict:
    """A checkpoint's contents, loaded as tensors and plain values only, holding the keys in `needs`: a file
    that holds code, or that would expand beyond its own size while loading, is refused."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass an existing .pt file")
    _refuse_expanding(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickle protocols; the error below says enough
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the reason, the file is not a checkpoint hsci can use
        code = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if code:  # the file names a Python object to build: running it is what weights_only prevents
            raise UserError(f"refusing {path}: it holds more than tensors and plain values, and loading it could run "
                            f"code ({code[:100]}); use a checkpoint written by hsci") from e
        raise UserError(f"{path} is not a readable checkpoint (hsci loads only tensors and plain values; it may be "
                        "truncated or another kind of file): use checkpoints/best.pt or last.pt of a run") from e
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a checkpoint dict: use a checkpoint written by hsci")
    missing = [key for key in needs if key not in state]
    if missing:
        raise UserError(f"{path} is not a checkpoint hsci wrote to resume from (it lacks {', '.join(missing)}): "
                        "use a run's own checkpoints/last.pt")
    return state


def _refuse_expanding(path: Path) -> None:
    """torch.save stores a checkpoint's records uncompressed in a zip archive, so they add up to at most the
    file's size; records that would inflate beyond it (a few MB that decompress to gigabytes) are refused
    from the archive's directory, before a byte of them is read."""
    if not zipfile.is_zipfile(path):
        return  # the pre-1.6 format, or not a checkpoint at all: torch.load says which
    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return  # a damaged archive: torch.load refuses it below
    size = path.stat().st_size
    if expanded > size:
        raise UserError(f"refusing {path}: its records expand to {expanded / 1e6:,.1f} MB from a {size / 1e3:,.0f} kB "
                        "file, and torch.save never compresses them (a file made to exhaust memory while loading); "
                        "use a checkpoint written by torch.save")


def load_weights(model: nn.Module, weights: dict, source: Path) -> None:
    """Load a state dict into `model`, naming the first layer that does not fit."""
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise UserError(f"{source} holds no model weights (a dict of tensors by layer name) where hsci looks for "
                        f"them, but a {type(weights).__name__}: use a checkpoint written by hsci or a model's "
                        "state_dict()")
    own = model.state_dict()
    for name, tensor in weights.items():
        if name not in own:
            raise UserError(f"{source} does not fit this model: it has a layer {name} that the model lacks; "
                            "build the model the checkpoint was trained with (model=..., data=...)")
        if own[name].shape != tensor.shape:
            raise UserError(f"{source} does not fit this model: layer {name} is {tuple(tensor.shape)} in the "
                            f"checkpoint but {tuple(own[name].shape)} in the model; build the model the checkpoint "
                            "was trained with (model=..., data=...)")
    missing = [name for name in own if name not in weights]
    if missing:
        raise UserError(f"{source} does not fit this model: it lacks layer {missing[0]}"
                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
    model.load_state_dict(weights)


def rng_state() -> dict:
    """Every random number generator a run draws from, as tensors and plain values."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def now() -> str:
    """The time as the record writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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
