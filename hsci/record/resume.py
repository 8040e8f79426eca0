"""Where a run stands and how it is put back there: what `last.pt` records (`Position` and the state of everything
that changes, and the run's `inputs`), `checkpoint` and `restore`, and `reopen`, which takes a run directory up
again for `resume=`."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from hsci import UserError
from hsci.parts.build import Optim, Parts, pick_device
from hsci.parts.datasets import Data
from hsci.parts.schema import check_values
from hsci.parts.world import World
from hsci.record import rundir
from hsci.record.comparable import class_names

# What a resumed run may change: where the data lives and how the loop runs, never the experiment.
RESUMABLE = ("trainer.", "data.root", "data.download", "data.num_workers")


@dataclass
class Position:
    """Where a run stands, as last.pt records it: `epoch` epochs complete, then `step` optimizer steps of the next
    one, whose losses add up to `loss_sum` over `seen` samples (all zero between epochs); the best validation's
    record so far, and the validations since it (`stale`); `due`: a validation is owed at this step (a stop came
    before it ran), and the resumed run runs it first."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    best_record: dict = field(default_factory=dict)
    stale: int = 0
    due: bool = False


# What a last.pt holds to carry on exactly: the state of everything that changes, and the Position (`due` is absent
# from a last.pt saved before it existed: none was owed).
POSITION = ("model", "optimizer", "scheduler", "scaler", "rng", *(f.name for f in fields(Position) if f.name != "due"))
# The trainer keys a resume may not change: they chose the best checkpoint so far, or they change the experiment
# (what an optimizer step sees); with their values for runs saved before they existed.
FIXED = {"monitor": "auto", "accumulate_grad_batches": 1, "overfit_batches": 0}


def reopen(run_dir: Path, changes: list[str]) -> tuple[DictConfig, dict | None, dict]:
    """For `resume=`: the run's saved config with `changes` applied, its last checkpoint (None if it saved
    none yet) and its summary so far."""
    cfg = rundir.load_config(run_dir, changes, RESUMABLE, "resume")
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml").trainer
    for key, before in FIXED.items():
        was, now = saved.get(key, before), cfg.trainer[key]
        if now != was and key == "monitor":  # the best checkpoint and the early-stop count were kept by it
            raise UserError(f"resume: trainer.monitor={now} would change how {run_dir} picks its best checkpoint (by "
                            f"{was} so far): resume without it, or start a new run")
        if now != was:
            raise UserError(f"resume: trainer.{key}={now} would change the experiment ({run_dir} trains with {was}): "
                            "resume without it, or start a new run")
    last = run_dir / "checkpoints" / "last.pt"
    state = rundir.load_checkpoint(last, POSITION) if last.exists() else None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {"name": cfg.name, "seed": cfg.seed}
    summary["run_dir"] = str(run_dir)  # where the run is now, if it was moved or copied
    check_values(cfg)  # nothing in the run directory changes for a resume that cannot go on
    pick_device(cfg.trainer.device)
    if summary.get("status") == "completed" and state:
        patience = cfg.trainer.early_stop_patience
        if state["epoch"] >= cfg.trainer.epochs:
            raise UserError(f"resume: {run_dir} already completed its {state['epoch']} epochs; raise trainer.epochs "
                            "to train it further")
        if patience and state["stale"] >= patience and state["epoch"] >= (cfg.trainer.min_epochs or 0):
            raise UserError(f"resume: {run_dir} stopped early after epoch {state['epoch']} ({state['stale']} "
                            "validations without a better validation metric); raise trainer.early_stop_patience (or "
                            "set it to null) to train it further")
    # Where it resumes, numbered as the console says it: the epoch under way, the optimizer steps made in it.
    summary["resumed"] = summary.get("resumed", []) + [{"at": rundir.now(), "epoch": state["epoch"] + 1 if state else 1,
                                                        "step": state["step"] if state else 0, "changes": changes}]
    return cfg, state, summary


def restore(state: dict, model: nn.Module, optim: Optim, source: Path) -> Position:
    """Put model, optimizer, scheduler, grad scaler and every random generator back as `state` has them, the
    learning rate where the schedule (as now configured) has it at the step reached; returns the position."""
    rundir.load_weights(model, state["model"], source)
    optim.opt.load_state_dict(state["optimizer"])
    counters = {k: state["scheduler"][k] for k in ("last_epoch", "_step_count")}
    optim.sched.load_state_dict(optim.sched.state_dict() | counters)  # the schedule's length follows trainer.epochs
    with warnings.catch_warnings():  # torch's note that get_lr() is meant for inside step()
        warnings.simplefilter("ignore")
        rates = optim.sched.get_lr()  # this step's rate on the schedule as it is now, not as it was saved
    for group, lr in zip(optim.opt.param_groups, rates):
        group["lr"] = lr
    if state["scaler"] and optim.scaler.is_enabled():
        optim.scaler.load_state_dict(state["scaler"])
    rundir.set_rng_state(state["rng"])
    return Position(**{f.name: state[f.name] for f in fields(Position) if f.name in state})


def checkpoint(parts: Parts, optim: Optim, position: Position, config: dict, world: World) -> dict:
    """Everything to carry on exactly from `position` (the model's own weights, as one process has them: every
    rank holds the same), the number of processes that trained it, the run's config, and its `inputs`."""
    return {"model": parts.model.state_dict(), "optimizer": optim.opt.state_dict(),
            "scheduler": optim.sched.state_dict(), "scaler": optim.scaler.state_dict(), "rng": rundir.rng_state(),
            **asdict(position), "world_size": world.size, "config": config, "inputs": inputs(parts.data)}


def inputs(data: Data) -> dict:
    """What the model was trained on, as plain values, so that `hsci predict` and `hsci eval` on a folder prepare
    new inputs as the run prepared its own without its dataset at hand: the task, the input shape (C, H, W) or
    (features,), the outputs, the class names, and the `Scaling` (pixel mean/std, feature and target statistics)."""
    def floats(values):
        return None if values is None else [float(v) for v in values]

    s = data.scaling
    return {"task": data.task, "input_shape": [int(n) for n in data.input_shape], "num_outputs": int(data.num_outputs),
            "classes": class_names(data),
            "scaling": {"mean": floats(s.mean), "std": floats(s.std), "target_mean": float(s.target_mean),
                        "target_std": float(s.target_std), "feature_mean": floats(s.feature_mean),
                        "feature_std": floats(s.feature_std)}}
