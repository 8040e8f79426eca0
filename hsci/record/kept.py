"""The checkpoints a run keeps at the end of each epoch: `best.pt` (the best epoch by `trainer.monitor`), `last.pt`
(where it stands, for a resume), the K best epochs' in `top/` (`trainer.save_top_k`, as Lightning's ModelCheckpoint
keeps them) and one every N epochs (`trainer.save_every_n_epochs`, `epoch_NNN.pt`), each written whole
(hsci/record/rundir.py's `save_checkpoint`).

Which epochs `top/` holds is not state of its own: it is the K best of the epochs it holds a file of, ranked by their
records in metrics.jsonl. A new epoch's file is written before last.pt and the one it displaces removed after it,
so that however a run is killed, a resume from last.pt finds the files it had (`tidy` removes what came after).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from hsci.record import rundir

TOP = "top"
NAME = re.compile(r"epoch_(\d+)_.+\.pt")  # top/epoch_003_val_acc_0.9123.pt


@dataclass(frozen=True)
class Kept:
    """What a run keeps in its `folder` (checkpoints/), ranked by the validation value `key`, better `mode`
    (max or min), ties going to the lower validation loss, then to the earlier epoch (as the best epoch is
    picked); `metrics` is the run's metrics.jsonl."""

    folder: Path
    metrics: Path
    key: str
    mode: str
    top_k: int = 1
    every: int | None = None

    def save(self, state: dict, epoch: int, improved: bool, end: bool = True) -> None:
        """Save epoch `epoch`'s `state` (its record already in metrics.jsonl) where it is kept: at its `end`, or
        after a validation within it (trainer.val_check_interval: best.pt and last.pt only; `top/` ranks epochs by
        the validation at their end)."""
        if improved:
            rundir.save_checkpoint(self.folder / "best.pt", state)
        if end and self.every and epoch % self.every == 0:
            rundir.save_checkpoint(self.folder / f"epoch_{epoch:03d}.pt", state)
        names = self.top(epoch) if self.top_k > 1 and end else {}
        if epoch in names:
            rundir.save_checkpoint(self.folder / TOP / names[epoch], state)
        rundir.save_checkpoint(self.folder / "last.pt", state)
        if self.top_k > 1 and end:
            self._remove_all_but(names)

    def tidy(self, epoch: int) -> None:
        """Before a resume from the end of epoch `epoch`: `top/` as it was then (and as K is now)."""
        if self.top_k > 1 or (self.folder / TOP).is_dir():
            self._remove_all_but(self.top(epoch, include_own=False) if self.top_k > 1 else {})

    def top(self, epoch: int, include_own: bool = True) -> dict[int, str]:
        """The file names of the K best epochs among those `top/` holds before `epoch` and `epoch` itself (or, not
        `include_own`, those it holds up to `epoch`), by epoch."""
        records = {}
        for line in self.metrics.read_text().splitlines() if self.metrics.is_file() else []:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            records[record.get("epoch")] = record
        held = {int(m.group(1)) for m in map(NAME.fullmatch, self._files()) if m}
        epochs = {e for e in held if (e < epoch if include_own else e <= epoch)} | ({epoch} if include_own else set())
        ranked = sorted((e for e in epochs if self.key in records.get(e, {})), key=lambda e: self._rank(records[e]))
        return {e: self._name(records[e]) for e in ranked[:self.top_k]}

    def _rank(self, record: dict) -> tuple:
        value = record[self.key]
        return (-value if self.mode == "max" else value, record["val_loss"], record["epoch"])

    def _name(self, record: dict) -> str:
        return f"epoch_{record['epoch']:03d}_{self.key}_{record[self.key]:.4f}.pt"

    def _files(self) -> list[str]:
        top = self.folder / TOP
        return [path.name for path in top.iterdir() if path.is_file()] if top.is_dir() else []

    def _remove_all_but(self, names: dict[int, str]) -> None:
        """Remove the checkpoints of `top/` (files named as this module names them) not in `names`."""
        for name in self._files():
            if NAME.fullmatch(name) and name not in names.values():
                (self.folder / TOP / name).unlink(missing_ok=True)
