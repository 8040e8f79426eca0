"""TensorBoard event files in the run directory (`logger=tensorboard`), so `tensorboard --logdir outputs` shows
every run and sweep, each under its folder's name:

- `step/train_loss`, `step/lr`, `step/grad_norm`, `step/img_per_s`: each reading (steps.jsonl's line);
- `epoch/<key>` and `epoch`: each epoch's record (metrics.jsonl's line: `epoch/val_acc`, `epoch/train_loss`, ...);
- `test/<metric>` and the hyperparameters (the flattened config) in the HParams tab, once the run completes;

all against the optimizer steps since the run began. A resumed run writes on in the same folder, and what it
redoes is dropped from the board.
"""

from __future__ import annotations

from pathlib import Path

from hsci import UserError

READING = ("train_loss", "lr", "grad_norm", "img_per_s")


class TensorBoard:
    """One run's event files, written by a background thread as TensorBoard's own writer does."""

    def __init__(self, run_dir: Path, settings: dict, step: int, hparams: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError('logger=tensorboard needs TensorBoard: pip install "hsci[tensorboard]"') from e
        # purge_step: the events of steps after `step`, written before a stop, are dropped as the run redoes them.
        self.writer = SummaryWriter(str(run_dir), flush_secs=settings["flush_secs"],
                                    purge_step=step + 1 if step else None)
        # TensorBoard takes numbers, strings and booleans; null is left out, a list written as text.
        self.hparams = {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
                        for k, v in hparams.items()}

    def reading(self, record: dict) -> None:
        for key in READING:
            if record[key] is not None:
                self.writer.add_scalar(f"step/{key}", record[key], record["step"])

    def epoch(self, record: dict, step: int) -> None:
        for key, value in record.items():
            self.writer.add_scalar("epoch" if key == "epoch" else f"epoch/{key}", value, step)
        self.writer.flush()

    def tested(self, results: dict, step: int) -> None:
        """The hyperparameters with the test metrics, in this run's own folder (not the extra time-stamped
        sub-run that SummaryWriter.add_hparams makes)."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"test/{k}": v for k, v in results["test"].items()}
        for summary in hparams(self.hparams, metrics):  # the experiment, the session's start and its end
            self.writer.file_writer.add_summary(summary, step)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
