"""Output for people: rich on a terminal, plain lines when stdout is a pipe or a CI log.

Everything shown is also written to the run's train.log through the `hsci` logger, and so are the tracebacks of
errors (`described`).
"""

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from hsci import flat, user_error

log = logging.getLogger("hsci")
console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)


def say(msg: str) -> None:
    """One line for the console and the log."""
    log.info(msg)
    console.print(msg, markup=False, soft_wrap=True)


def error(msg: str) -> None:
    """One line on stderr (the caller logs the details)."""
    errors.print(f"error: {msg}", style="bold red" if errors.is_terminal else None, markup=False, soft_wrap=True)


def described(e: Exception, log_file: Path) -> str:
    """An error as summary.json records it, in one line: the user's problem as hsci put it, or any other by its
    type and where its traceback is; logged with that traceback (in `log_file`, the run's train.log)."""
    cause = user_error(e)
    line = str(cause) if cause else f"{type(e).__name__}: {flat(e)} (traceback in {log_file})"
    log.exception(line)
    return line


def config(cfg: dict, yaml: str) -> None:
    """The composed config: a tree on a terminal; the YAML goes to the log (and .hydra/config.yaml)."""
    log.info("config:\n%s", yaml)
    if console.is_terminal:
        console.print(_tree(Tree("[bold]config"), cfg))


def _tree(node: Tree, cfg: dict) -> Tree:
    for key, value in cfg.items():
        if isinstance(value, dict):
            _tree(node.add(f"[bold cyan]{key}"), value)
        else:
            node.add(f"{key}: [green]{value}")
    return node


@contextmanager
def epoch_progress(epoch: int, epochs: int, first: int, stop: int) -> Iterator["EpochProgress"]:
    """An epoch's progress from step `first` to `stop`: a live bar on a terminal, plain lines otherwise."""
    desc = f"epoch {epoch}/{epochs}"
    if not console.is_terminal:
        yield EpochProgress(desc, stop)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[reading]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        yield EpochProgress(desc, stop, bar, bar.add_task(desc, total=stop, completed=first, reading=""))


class EpochProgress:
    """`advance(done)` after each step, `show(done, reading)` at each reading (hsci/loop/step.py's Readings): on a
    terminal the bar moves and shows the reading; otherwise each reading is a line. train.log gets it either way."""

    def __init__(self, desc: str, stop: int, bar: Progress | None = None, task=None):
        self.desc, self.stop, self.bar, self.task = desc, stop, bar, task

    def advance(self, done: int) -> None:
        if self.bar:
            self.bar.update(self.task, completed=done)

    def show(self, done: int, reading: dict) -> None:
        norm = reading["grad_norm"]
        text = (f"loss {reading['train_loss']:.4f}  lr {reading['lr']:.2e}  "
                + (f"grad_norm {norm:.3g}  " if norm is not None else "") + f"{speed(reading['img_per_s'])} img/s")
        line = f"{self.desc} step {done}/{self.stop}  {text}"
        if self.bar:
            log.info(line)
            self.bar.update(self.task, reading=text)
        else:
            say(line)


def epoch_row(record: dict, first: bool) -> None:
    """One row per validation or epoch: a plain line of every value (and in train.log); on a terminal, aligned
    columns under a header, short enough for 80 columns (`columns`). A value that is None (the validation of an
    epoch that does not validate) is left out of the line, and blank in its column."""
    line = "  ".join(f"{k} {_fmt(k, v)}" for k, v in record.items() if v is not None)
    log.info(line)
    if not console.is_terminal:
        console.print(line, markup=False, soft_wrap=True)
        return
    shown = columns(list(record), min(console.width, 80))
    if first:
        console.print(" ".join(label.rjust(w) for label, w in shown.values()), style="bold", markup=False,
                      soft_wrap=True)
    console.print(" ".join(_cell(k, record[k]).rjust(w) for k, (_, w) in shown.items()), markup=False, soft_wrap=True)


# The epoch table on a terminal: each value's label and width (rows align unless a value outgrows it), and what goes
# first when the columns would not fit: precision and recall (f1 sums them up), then memory and data wait.
COLUMNS = {"epoch": ("epoch", 5), "step": ("step", 6), "train_loss": ("train", 6), "val_loss": ("val", 6),
           "val_acc": ("acc", 5),
           "val_precision": ("prec", 5), "val_recall": ("rec", 5), "val_f1": ("f1", 5), "val_top5": ("top5", 5),
           "val_mse": ("mse", 6), "val_mae": ("mae", 6), "val_r2": ("r2", 6), "lr": ("lr", 7),
           "epoch_s": ("secs", 4), "train_img_per_s": ("img/s", 7), "data_wait_s": ("wait", 4),
           "max_mem_gb": ("mem", 4)}
DROPPED_FIRST = (("val_precision", "val_recall"), ("max_mem_gb",), ("data_wait_s",))


def columns(keys: list[str], width: int) -> dict[str, tuple[str, int]]:
    """The columns of the epoch table for a record's `keys`, within `width` characters where dropping the columns
    that matter least on a terminal can make them fit; train.log and metrics.jsonl keep every value."""
    shown = {k: COLUMNS.get(k, (k, max(len(k), 6))) for k in keys}
    for dropped in DROPPED_FIRST:
        if sum(w + 1 for _, w in shown.values()) - 1 <= width:
            break
        shown = {k: column for k, column in shown.items() if k not in dropped}
    return shown


def _cell(key: str, value) -> str:
    """A value in the epoch table: fewer digits than the log's, so that it fits its column."""
    if value is None:
        return ""
    if not isinstance(value, float):
        return str(value)
    if key == "lr":
        return f"{value:.1e}"
    if key.endswith("per_s"):
        return speed(value)
    if key.endswith("_s"):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    if key.endswith("_gb"):
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    if value == 0 or 0.001 <= abs(value) < 100:
        return f"{value:.3f}"
    return f"{value:.0e}" if abs(value) < 0.001 else f"{value:.4g}"


def final(summary: dict) -> None:
    """The test metrics of the best checkpoint, with their 95% intervals, and where the run lives."""
    ci = summary.get("test_ci") or {}
    metrics_table(f"test split, best checkpoint (epoch {summary.get('best_epoch')}), {ci.get('n', '?')} examples",
                  summary.get("test", {}), ci)
    say(f"run directory: {summary['run_dir']}")


def metrics_table(title: str, metrics: dict, ci: dict | None = None) -> None:
    """One row of metrics; under it, where `ci` has them, their intervals (hsci/record/predictions.py)."""
    log.info("%s: %s", title, metrics)
    ci = {k: f"{_fmt(k, ci[k]['low'])}-{_fmt(k, ci[k]['high'])}" for k in metrics if k in (ci or {})}
    if console.is_terminal:
        table = Table(title=title)
        table.add_column("")
        for key in metrics:
            table.add_column(key, justify="right")
        table.add_row("", *(_fmt(k, v) for k, v in metrics.items()))
        if ci:
            table.add_row("95% CI", *(ci.get(k, "") for k in metrics))
        console.print(table)
    else:
        cells = (f"{k} {_fmt(k, v)}" + (f" (95% CI {ci[k]})" if k in ci else "") for k, v in metrics.items())
        console.print(f"{title}  " + "  ".join(cells), markup=False, soft_wrap=True)


def sweep_table(rows: list[dict], where: str, order: str = "best first", what: str = "sweep") -> None:
    """All jobs of a sweep (or a tune's trials), in `order` (printed only: a sweep has no log of its own)."""
    keys = list(dict.fromkeys(k for row in rows for k in row if k not in ("run_dir", "mode")))
    if console.is_terminal:
        table = Table(title=f"{what}: {len(rows)} {'trials' if what == 'tune' else 'jobs'}, {order}")
        for key in keys:
            table.add_column(key, justify="left" if key in ("overrides", "status", "error") else "right")
        for row in rows:
            table.add_row(*(_fmt(k, row.get(k, "")) for k in keys))
        console.print(table)
    else:
        for row in rows:
            cells = (f"{k} {_fmt(k, row[k])}" for k in keys if row.get(k) not in (None, ""))
            console.print("  ".join(cells), markup=False, soft_wrap=True)
    console.print(f"{what} summary: {where}", markup=False, soft_wrap=True)


def runs_table(rows: list[dict], title: str) -> None:
    """Rows of text, one per run (`hsci runs`): a table on a terminal, `key value` lines otherwise; empty cells and
    columns left out."""
    rows_table(rows, title, numbers=())


def rows_table(rows: list[dict], title: str, numbers: tuple[str, ...]) -> None:
    """A table of `rows` under `title`; the `numbers` columns aligned right."""
    keys = [k for k in dict.fromkeys(k for row in rows for k in row)
            if any(row.get(k) not in (None, "") for row in rows)]
    if console.is_terminal:
        table = Table(title=title)
        for key in keys:
            table.add_column(key, justify="right" if key in numbers else "left")
        for row in rows:
            table.add_row(*(_fmt(k, row[k]) if row.get(k) is not None else "" for k in keys))
        console.print(table)
        return
    console.print(title, markup=False, soft_wrap=True)
    for row in rows:
        console.print("  ".join(f"{k} {_fmt(k, row[k])}" for k in keys if row.get(k) not in (None, "")), markup=False,
                      soft_wrap=True)


def speed(per_s: float) -> str:
    """A rate such as images per second: whole numbers from 100 on, else three significant digits (a slow model's
    0.42 img/s is not 0)."""
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.3g}"


def _fmt(key: str, value) -> str:
    if not isinstance(value, float):
        return str(value)
    if key == "lr":
        return f"{value:.2e}"
    if key.endswith("per_s"):
        return speed(value)
    if key.endswith("_s"):
        return f"{value:.1f}"
    return f"{value:.4f}"


def table(title: str, header: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> None:
    """A table of text cells under `title`, the `right` columns aligned right: rich on a terminal, aligned plain
    lines otherwise; train.log gets the plain lines either way."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def plain(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [title, plain(header), *(plain(row) for row in rows)]
    log.info("\n".join(lines))
    if not console.is_terminal:
        for line in lines:
            console.print(line, markup=False, soft_wrap=True, highlight=False)
        return
    console.print(title, style="bold", markup=False, soft_wrap=True)  # whole, however narrow the table
    shown = Table()
    for i, name in enumerate(header):
        shown.add_column(name, justify="right" if i in right else "left")
    for row in rows:
        shown.add_row(*(Text(str(c)) for c in row))  # as written: a name is not markup
    console.print(shown)
