"""The model's layer table, as Lightning's ModelSummary shows it: each layer down to `trainer.summary_depth` with
its type and parameter count, and whether it trains (a frozen backbone does not), then the totals; a table on a
terminal, plain lines otherwise and in train.log. Nothing is run through the model: parameters are counted."""

from __future__ import annotations

from torch import nn

from hsci import report


def show_layers(model: nn.Module, depth: int | None) -> None:
    """The layer table of `model` to `depth` (1: its children, -1: every layer; 0 or None: no table)."""
    if not depth:
        return
    rows = [[str(i), name, type(module).__name__, amount(params), trains]
            for i, (name, module, params, trains) in enumerate(layers(model, depth))]
    total = sum(q.numel() for q in model.parameters())
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    size_mb = sum(q.numel() * q.element_size() for q in model.parameters()) / 1e6
    report.table(f"model {type(model).__name__}: {amount(total)} parameters ({amount(trainable)} trainable, "
                 f"{amount(total - trainable)} frozen), {size_mb:.2f} MB", ["", "name", "type", "params", "trains"],
                 rows, right=(0, 3))


def layers(model: nn.Module, depth: int) -> list[tuple[str, nn.Module, int, str]]:
    """(name, module, parameters, trains: yes, no, part, or - without parameters) of each layer down to `depth`
    (-1: all), in the model's order, a layer before the layers inside it."""
    found = []
    for name, module in model.named_modules():
        if not name or depth != -1 and name.count(".") + 1 > depth:
            continue
        params = list(module.parameters())
        training = sum(q.numel() for q in params if q.requires_grad)
        count = sum(q.numel() for q in params)
        trains = "-" if not count else "yes" if training == count else "no" if not training else "part"
        found.append((name, module, count, trains))
    return found


def amount(n: int) -> str:
    """A parameter count as Lightning's table gives it: 850, 53.0 K, 11.2 M, 1.3 B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)
