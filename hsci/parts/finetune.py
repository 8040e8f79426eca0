"""Fine-tuning: which of a model's layers are its head (the classifier a new task replaces) and which its backbone;
a backbone frozen for the first epochs (`model.freeze=backbone`, `model.unfreeze_at_epoch`), as timm freezes one:
weights fixed and batch norm statistics too; and the backbone's learning rate as a fraction of the head's
(`model.backbone_lr_scale`), as Lightning's BackboneFinetuning sets it."""

from __future__ import annotations

from torch import nn


def head(model: nn.Module) -> str:
    """The name of the model's head: timm's classifier (`get_classifier`), else the last layer that holds weights
    of its own (a ResNet's fc, a ViT's heads.head, the last Linear of hsci's cnn and mlp)."""
    modules = dict(model.named_modules())
    classifier = getattr(model, "get_classifier", None)
    if callable(classifier):
        named = next((name for name, m in modules.items() if m is classifier() and name), None)
        if named:
            return named
    return [name for name, m in modules.items() if name and any(True for _ in m.parameters(recurse=False))][-1]


def in_head(name: str, head_name: str) -> bool:
    """Whether parameter or buffer `name` belongs to the head `head_name`."""
    return name == head_name or name.startswith(head_name + ".")


def param_groups(model: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict] | object:
    """The optimizer's parameters: the head's at `lr` first (the lr every reading shows), then the backbone's at
    `lr * backbone_lr_scale`; all in one group when the scale is 1."""
    if backbone_lr_scale == 1:
        return model.parameters()
    name = head(model)
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if in_head(n, name)]},
            {"params": [p for n, p in named if not in_head(n, name)], "lr": lr * backbone_lr_scale}]


def frozen_at(epoch: int, freeze: str | None, unfreeze_at_epoch: int | None) -> bool:
    """Whether the backbone is frozen during `epoch` (1 is the first)."""
    return freeze == "backbone" and (unfreeze_at_epoch is None or epoch < unfreeze_at_epoch)


def freeze_backbone(model: nn.Module, frozen: bool) -> bool:
    """Freeze the backbone (or thaw it): no gradients for its weights, and its batch norm layers kept in eval mode
    whenever the model trains, so their statistics stay as they are. Returns whether anything changed (a model
    that runs under DDP is wrapped anew then: DDP reduces the gradients of the weights that had them when it
    wrapped the model)."""
    name = head(model)
    changed = False
    for n, p in model.named_parameters():
        if not in_head(n, name) and p.requires_grad == frozen:
            p.requires_grad_(not frozen)
            changed = True
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not in_head(n, name):
            hold = getattr(m, "hsci_frozen", None)
            if frozen and hold is None:
                m.hsci_frozen = m.register_forward_pre_hook(_in_eval_mode)
            elif not frozen and hold is not None:
                hold.remove()
                del m.hsci_frozen
    return changed


def _in_eval_mode(module: nn.Module, args) -> None:
    """A frozen batch norm layer normalises with its running statistics and leaves them as they are."""
    module.training = False
