"""The weights a new run starts from, other than its builder's: a local file (`model.weights=<file>`: a torchvision
or timm state dict, a .safetensors file, or an hsci checkpoint) or one of the user's own runs (`init_from=<run
dir>`: its best checkpoint). Read as tensors only. Layers of the model's head whose shapes differ (a new task's
classifier) start afresh and are listed; any other layer that does not fit is refused, by name."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from hsci import UserError, report
from hsci.parts.finetune import head, in_head
from hsci.record import rundir

WRAPPERS = ("module.", "_orig_mod.")  # what DDP and torch.compile put before a layer's name in a saved state dict


def source(cfg: DictConfig) -> Path | None:
    """The file a new run's weights come from, if any."""
    if cfg.get("init_from"):
        return Path(cfg.init_from) / "checkpoints" / "best.pt"
    weights = cfg.model.get("weights")
    return Path(weights).expanduser().resolve() if weights else None


def read(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's state dict: a .safetensors file, a bare state dict, or the model in a checkpoint (hsci's
    `model`, timm's `state_dict_ema`/`state_dict`)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a readable .safetensors file ({e})") from e
    state = rundir.load_checkpoint(path)
    for key in ("model", "state_dict_ema", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    for prefix in WRAPPERS:
        if state and all(name.startswith(prefix) for name in state):
            state = {name.removeprefix(prefix): tensor for name, tensor in state.items()}
    if not state or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UserError(f"{path} holds no model weights (a dict of tensors by layer name): give a state dict, a "
                        ".safetensors file or an hsci checkpoint")
    return state


def start_from(model: nn.Module, cfg: DictConfig) -> dict | None:
    """Load the weights a new run starts from into `model`; what summary.json records of it (None: the builder's
    weights)."""
    path = source(cfg)
    if path is None:
        return None
    weights, own, head_name = read(path), model.state_dict(), head(model)
    unfit = [name for name, t in weights.items() if name in own and own[name].shape != t.shape]
    new_head = [name for name in own if in_head(name, head_name)
                and (name in unfit or name not in weights)]
    refused = [f"{name} {tuple(weights[name].shape)} in the file, {tuple(own[name].shape)} in the model"
               for name in unfit if not in_head(name, head_name)]
    missing = [name for name in own if name not in weights and not in_head(name, head_name)]
    extra = [name for name in weights if name not in own]
    if refused or missing or extra:
        what = "; ".join(filter(None, [_listed("shapes differ", refused), _listed("the file lacks", missing),
                                       _listed("the model lacks", extra)]))
        hint = (" (the file may hold weights for the pretrained architecture: add model.pretrained=true)"
                if refused and cfg.model.get("pretrained") is False else "")
        raise UserError(f"{path} does not fit this model: {what}{hint}; build the model the weights were made for "
                        "(model=..., model.arch/name=...)")
    model.load_state_dict({name: t for name, t in weights.items() if name in own and name not in new_head},
                          strict=False)
    if new_head:
        report.say(f"weights from {path}; a new head starts afresh: {', '.join(new_head)}")
    else:
        report.say(f"weights from {path}")
    return {"file": str(path), "new_head": new_head}


def _listed(what: str, names: list[str]) -> str:
    if not names:
        return ""
    return f"{what}: {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
