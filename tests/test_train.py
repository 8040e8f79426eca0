"""The training step learns (loss falls when the real model, loss and optimizer overfit one fixed batch), and its
readings record what the step computed."""

import copy
import json

import pytest
import torch

from hsci.loop.step import Epoch, Readings, train_epoch
from hsci.parts.build import build, compose, optimizing


@pytest.mark.parametrize("data, model", [("digits", "cnn"), pytest.param("digits", "resnet18", marks=pytest.mark.slow),
                                         ("breast_cancer", "mlp"), ("diabetes", "mlp")])
def test_loss_falls_when_overfitting_one_batch(data, model):
    cfg = compose([f"data={data}", f"model={model}", "scheduler=none", "trainer.device=cpu", "data.batch_size=32"])
    p = build(cfg)
    batch = next(iter(p.loaders.train))
    optim = optimizing(cfg, p, epochs=3, steps_per_epoch=20)
    losses = []
    for number in range(1, 4):
        epoch = Epoch.start(number, 20, p.device)
        train_epoch(p, optim=optim, batches=[batch] * 20, epoch=epoch, readings=Readings(5, epoch))
        assert (epoch.seen, epoch.step) == (20 * len(batch[1]), 20)
        losses.append(epoch.loss_sum.item() / 20)
    assert losses[2] < 0.25 * losses[0], losses


@pytest.mark.parametrize("precision, clip", [("fp32", None), ("fp32", 0.01), ("fp16", None)])
def test_a_reading_records_the_unscaled_gradient_norm_before_clipping(tmp_path, precision, clip):
    cfg = compose(["trainer.device=cpu", f"trainer.precision={precision}", f"trainer.grad_clip={clip or 'null'}"])
    p = build(cfg)
    x, y = next(iter(p.loaders.train))
    reference = copy.deepcopy(p.model)
    torch.manual_seed(1)  # the same dropout masks on both sides
    torch.nn.functional.cross_entropy(reference(p.to_input(x)), y).backward()
    expected = torch.nn.utils.get_total_norm([q.grad for q in reference.parameters()]).item()
    optim = optimizing(cfg, p, epochs=1, steps_per_epoch=1)
    epoch = Epoch.start(1, 1, p.device)
    torch.manual_seed(1)
    train_epoch(p, optim=optim, batches=[(x, y)], epoch=epoch, readings=Readings(50, epoch, tmp_path / "steps.jsonl"))
    [reading] = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert reading["step"] == 1
    assert reading["grad_norm"] == pytest.approx(expected, rel=0.02 if precision == "fp16" else 1e-5)
    if clip:  # clip_grad_norm_'s own value: the norm before clipping
        assert reading["grad_norm"] > clip
