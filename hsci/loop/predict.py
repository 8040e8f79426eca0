"""`hsci predict run=<run dir>|latest inputs=<image folder | files | glob | rows.csv> [top_k=3] [out=<file.csv>]`: a
run's best checkpoint on new inputs, prepared as the run prepared its test split, written to predictions.csv.

What the model was trained on (task, input shape, class names, scaling) is read from the run: its checkpoint records
it (hsci/record/resume.py's `inputs`); for a run saved before checkpoints did, it is recovered by building the run's
dataset from its config. The model and the input step come from `build` with the run's config, as for `hsci eval`:
an image file is decoded, resized and centre-cropped as an image folder's test images are (hsci/parts/datafiles.py),
then normalised on the device, with a pretrained model's own resize and normalisation; a table's row is standardised
with the training split's statistics. `hsci eval` on a labelled folder restores the run the same way (`restored`).
"""

import csv
import glob
import io
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hsci import UserError, flat, new_folder, report, user_error
from hsci.parts.build import Parts, build
from hsci.parts.datafiles import ImageFiles
from hsci.parts.datasets import Data, Loading, Scaling, Tensors
from hsci.record import resume, rundir
from hsci.record.owner import find_run

USAGE = ("usage: hsci predict run=<run dir>|latest inputs=<image folder | files,... | glob | rows.csv> [top_k=3] "
         "[out=<file.csv>] (see hsci --help)")
OPTIONS = ("run", "inputs", "top_k", "out")
# How predict runs, never what the model sees: the run's own preprocessing is not a setting.
CHANGES = ("trainer.device", "trainer.precision", "trainer.channels_last", "trainer.compile", "data.batch_size",
           "data.num_workers")
SHOWN = 10  # rows of the table on the console
LISTED = 3  # inputs left out that the console line names


def run_predict(args: list[str]) -> int:
    """Predict on every input `inputs=` names; what cannot be read is listed and left out, with a count."""
    opts = dict(a.split("=", 1) for a in args if a.split("=", 1)[0] in OPTIONS)
    changes = [a for a in args if a.split("=", 1)[0] not in OPTIONS]
    if "run" not in opts or "inputs" not in opts:
        raise UserError(USAGE)
    run = find_run(opts["run"], "run", needs="checkpoints/best.pt")
    cfg = rundir.load_config(run, changes, CHANGES, "predict")
    for limit in ("limit_batches", "limit_test_batches"):  # a smoke run's limit is for its epochs: every input counts
        OmegaConf.update(cfg, f"trainer.{limit}", None)
    checkpoint = run / "checkpoints" / "best.pt"
    if not checkpoint.exists():
        raise UserError(f"run={opts['run']}: {run} has no checkpoints/best.pt yet (no epoch finished)")
    state = rundir.load_checkpoint(checkpoint)
    seen = recorded_inputs(state, cfg, run)
    top_k = _top_k(opts.get("top_k"), seen)
    tabular = len(seen["input_shape"]) == 1
    files = find_inputs(opts["inputs"], ".csv" if tabular else None)
    if tabular:
        x, names, left_out = read_rows(files, seen)
        if not names:
            raise UserError(f"inputs={opts['inputs']}: nothing to predict on: " + _nothing(seen, len(files), left_out))
        dataset = Tensors(torch.from_numpy(x).float(), torch.zeros(len(x)))  # (N, F), as the run's table holds them
    else:
        names, dataset = files, Readable(files, seen["input_shape"])
    p = restored(cfg, as_data(seen, dataset, cfg), state, checkpoint)
    scores, why = predict(p)
    if not tabular:
        left_out = [f"{name} ({reason})" for name, reason in zip(names, why) if reason]
        read = np.array([not reason for reason in why], dtype=bool)
        names, scores = [name for name, ok in zip(names, read) if ok], scores[read]
    if not names:
        raise UserError(f"inputs={opts['inputs']}: nothing to predict on: " + _nothing(seen, len(files), left_out))
    rows = table_rows(names, scores, seen, top_k, "row" if tabular else "file")
    out = _out_path(opts.get("out"))
    write_csv(out, rows)
    report.say(f"predict: {run}, best checkpoint (epoch {state.get('epoch', '?')}), {len(rows)} "
               f"{'rows' if tabular else 'files'}")
    report.rows_table(rows[:SHOWN], f"predictions{f' (the first {SHOWN})' if len(rows) > SHOWN else ''}",
                      numbers=tuple(k for k in rows[0] if k.startswith(("prob", "p_", "value"))))
    if left_out:
        report.say(_left_out(left_out, len(names) + len(left_out), seen, tabular))
    report.say(f"written: {out}")
    return 0


def recorded_inputs(state: dict, cfg: DictConfig, run: Path) -> dict:
    """What the run's model was trained on (hsci/record/resume.py's `inputs`), as its checkpoint records it; for a
    run saved before checkpoints recorded it, recovered by building the run's dataset from its config."""
    if isinstance(state.get("inputs"), dict):
        return state["inputs"]
    try:
        data = instantiate(cfg.data)
    except Exception as e:  # whatever keeps the dataset from loading: the line says what
        cause = user_error(e)
        raise UserError(f"{run} was saved before hsci recorded a model's inputs in its checkpoint, and its dataset, "
                        f"which would tell them, cannot be read ({cause or f'{type(e).__name__}: {flat(e)}'}): put "
                        "the run's data back where its config says, or train the run again") from e
    return resume.inputs(data)


def as_data(seen: dict, dataset, cfg: DictConfig) -> Data:
    """A `Data` of `dataset` alone (as train, val and test), with what the run recorded of its own data: its
    task, input shape, outputs and scaling; fed in the run's batch size, by a DataLoader."""
    s = seen["scaling"]
    pixels = [tuple(s[k]) if s[k] is not None else None for k in ("mean", "std")]  # None for a table
    scaling = Scaling(*pixels, target_mean=s["target_mean"], target_std=s["target_std"])
    loading = Loading(cfg.data.get("batch_size", 64), cfg.data.get("num_workers", 0), "torch")
    return Data(dataset, dataset, dataset, seen["task"], tuple(seen["input_shape"]), seen["num_outputs"], loading,
                scaling)


def restored(cfg: DictConfig, data: Data, state: dict, checkpoint: Path) -> Parts:
    """The run's parts around `data` (in place of its own dataset), holding the checkpoint's weights: the model and
    the input step (normalisation, a pretrained model's resize) as the run built them."""
    p = build(cfg, data=data, restoring=True)
    rundir.load_weights(p.model, state.get("model"), checkpoint)
    return p


class Readable(ImageFiles):
    """Image files, read as an image folder's test images are (`ImageFiles`: decoded, resized and centre-cropped to
    the model's size), each with why it could not be read ("" if it could): a blank image stands in for a file that
    cannot, and is left out of the predictions."""

    def __init__(self, files: list[str], shape: list[int]):
        if len(shape) != 3 or shape[1] != shape[2]:
            raise UserError(f"hsci predict reads image files for a model of square images; this run's model takes "
                            f"inputs of shape {tuple(shape)}")
        super().__init__([(f, 0) for f in files], shape[1], shape[0])
        self.blank = torch.zeros(tuple(shape), dtype=torch.uint8)  # (C, H, W)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return super().__getitem__(i)[0], ""
        except (UserError, OSError, ValueError, RuntimeError) as e:  # not an image, damaged, too large, a folder...
            return self.blank, _reason(e, self.samples[i][0])


def _reason(e: Exception, path: str) -> str:
    """Why a file could not be read, in a few words: the error, without the file's name."""
    cause = e.__cause__ or e
    text = flat(cause).replace(repr(path), "").replace(path, "").removeprefix("data=imagefolder:").strip(" :")
    return (text or type(cause).__name__)[:60]


def predict(p: Parts) -> tuple[np.ndarray, list[str]]:
    """The model's scores for every input of `p.loaders.test`, in order: class probabilities (N, C) for multiclass,
    the positive class's (N,) for binary, values in the target's units (N,) for regression (as test_predictions.npz
    keeps them); and, per input, why it could not be read ("" where it could)."""
    model, data = p.model.eval(), p.data
    scores, why = [], []
    with torch.inference_mode():
        for x, reasons in p.loaders.test:
            with p.amp():
                out = model(p.to_input(x.to(p.device, non_blocking=True)))
            out = out.float()  # the ops hsci/loop/evaluate.py applies to the test split's outputs
            if data.task == "multiclass":
                out = out.softmax(1)
            elif data.task == "binary":
                out = out.sigmoid().squeeze(1)
            else:
                out = out.squeeze(1) * data.scaling.target_std + data.scaling.target_mean
            scores.append(out.cpu())
            why += [""] * len(x) if isinstance(reasons, torch.Tensor) else list(reasons)  # a table's rows all read
    return torch.cat(scores).numpy() if scores else np.zeros(0), why


def table_rows(names: list[str], scores: np.ndarray, seen: dict, top_k: int, first: str) -> list[dict]:
    """A row per input: its name, then the `top_k` classes with their probabilities, most likely first (and, for a
    binary task, the positive class's probability), or the predicted value."""
    if seen["task"] == "regression":
        return [{first: name, "value": float(v)} for name, v in zip(names, scores)]
    classes = seen["classes"]
    probs = np.stack([1 - scores, scores], 1) if seen["task"] == "binary" else scores  # (N, C)
    rows = []
    for name, prob in zip(names, probs):
        row = {first: name}
        for rank, c in enumerate(np.argsort(-prob, kind="stable")[:top_k], 1):
            row |= {f"class_{rank}": classes[c], f"prob_{rank}": prob[c]}
        if seen["task"] == "binary":
            row[f"p_{classes[1]}"] = prob[1]
        rows.append(row)
    return rows


def write_csv(out: Path, rows: list[dict]) -> None:
    """The rows as CSV; numbers as the shortest text that reads back as the same float32."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: str(np.float32(v)) if isinstance(v, (float, np.floating)) else v for k, v in row.items()}
                     for row in rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(out, lambda f: f.write(text.getvalue().encode()))


def _out_path(out: str | None) -> Path:
    """`out=<file.csv>`, or predictions.csv in `out=<folder>`; by default in outputs/predict/<date>/<time>/."""
    if out is None:
        return new_folder(Path("outputs", "predict", time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S"))) \
            / "predictions.csv"
    path = Path(out).expanduser()
    return path / "predictions.csv" if path.is_dir() or out.endswith(os.sep) else path


def _top_k(value: str | None, seen: dict) -> int:
    if value is None:
        return 3
    if seen["task"] == "regression":
        raise UserError(f"top_k={value}: this run predicts values (regression), not classes: leave top_k out")
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"top_k={value}: give a whole number of classes to list, 1 or more (top_k=3)")
    return int(value)


GLOB = re.compile(r"[*?[]")


def find_inputs(value: str, suffix: str | None) -> list[str]:
    """The files `inputs=` names, each once, in the order given: a folder (the files under it, hidden ones left out;
    those ending in `suffix` only, if given), a file, a glob (`**` for any depth), or several of these separated by
    commas (a path that exists as written is one, commas and all)."""
    items = [value] if os.path.exists(os.path.expanduser(value)) else [i for i in value.split(",") if i]
    found = []
    for item in map(os.path.expanduser, items):
        paths = sorted(glob.glob(item, recursive=True)) if GLOB.search(item) else [item]
        if not paths or not os.path.exists(paths[0]):
            raise UserError(f"inputs={value}: {item} {'matches' if GLOB.search(item) else 'is'} no file or folder: "
                            "give an image folder, files or a glob (quoted, so the shell leaves it to hsci)")
        for path in paths:
            found += _walk(path, suffix) if os.path.isdir(path) else [path]
    if not found:
        raise UserError(f"inputs={value}: no {suffix + ' ' if suffix else ''}files there")
    return list(dict.fromkeys(found))


def _walk(folder: str, suffix: str | None) -> list[str]:
    """The files under `folder`, sorted, hidden files and folders (.DS_Store, .ipynb_checkpoints) left out."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(here, f) for f in sorted(files)
                  if not f.startswith(".") and (suffix is None or f.lower().endswith(suffix))]
    return found


def read_rows(files: list[str], seen: dict) -> tuple[np.ndarray, list[str], list[str]]:
    """The rows of CSV `files` that hold the run's features (as many numbers as its table has columns, in that
    order; a first line that is not numbers is a header), standardised as the run's table was: (N, F); each row's
    name (file:line); and the rows and files left out, with why."""
    features, s = seen["input_shape"][0], seen["scaling"]
    rows, names, left_out = [], [], []
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
            lines = csv.reader(io.StringIO(text))
            first = True
            for cells in lines:
                where = f"{path}:{lines.line_num}"
                if not any(c.strip() for c in cells):
                    continue
                try:
                    values = [float(c) for c in cells]
                except ValueError:
                    if not first:
                        left_out.append(f"{where} (not numbers)")
                    first = False  # a header
                    continue
                first = False
                if len(values) != features or not np.isfinite(values).all():
                    left_out.append(f"{where} ({len(values)} values)" if len(values) != features else
                                    f"{where} (not finite)")
                    continue
                rows.append(values)
                names.append(where)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            left_out.append(f"{path} (not a CSV file: {type(e).__name__})")
    x = np.asarray(rows, dtype=np.float64).reshape(-1, features)
    if s["feature_mean"] is not None:
        x = (x - np.asarray(s["feature_mean"])) / np.asarray(s["feature_std"])
    return x, names, left_out


def _left_out(left_out: list[str], total: int, seen: dict, tabular: bool) -> str:
    """One line: how many inputs were left out, and the first few of them."""
    what = (f"rows that do not hold the run's {seen['input_shape'][0]} features as numbers" if tabular else
            "files that are not readable images")
    listed = ", ".join(left_out[:LISTED]) + (f" and {len(left_out) - LISTED} more" if len(left_out) > LISTED else "")
    return f"left out {len(left_out)} of {total} {what}: {listed}"


def _nothing(seen: dict, files: int, left_out: list[str]) -> str:
    if len(seen["input_shape"]) == 1:
        return (f"no row of the {files} file(s) holds the run's {seen['input_shape'][0]} features as numbers "
                f"(comma-separated, in the order of the dataset's columns; a header line is optional): "
                + ", ".join(left_out[:LISTED]))
    return f"none of the {files} file(s) is a readable image: " + ", ".join(left_out[:LISTED])
