"""The training step learns: loss falls when the real model, loss and optimizer overfit one fixed batch."""

from contextlib import nullcontext

import pytest
import torch
from hydra.utils import instantiate

from hsci.loaders import input_fn
from hsci.train import train_epoch


@pytest.mark.parametrize("data, model", [("digits", "cnn"), pytest.param("digits", "resnet18", marks=pytest.mark.slow),
                                         ("breast_cancer", "mlp"), ("diabetes", "mlp")])
def test_loss_falls_when_overfitting_one_batch(cfg_of, data, model):
    torch.manual_seed(0)
    cfg = cfg_of(f"data={data}", f"model={model}", "scheduler=none")
    bundle = instantiate(cfg.data)
    x, y = next(iter(torch.utils.data.DataLoader(bundle.train, batch_size=32)))
    net = instantiate(cfg.model, input_shape=bundle.input_shape, num_outputs=bundle.num_outputs)
    opt = instantiate(cfg.optimizer, params=net.parameters())
    sched = instantiate(cfg.scheduler, opt=opt, epochs=1, steps_per_epoch=60)
    loss_fn = instantiate(cfg.loss)
    to_input = input_fn(bundle.mean, bundle.std, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for _ in range(3):
        loss_sum, seen, done = train_epoch(net, [(x, y)] * 20, opt, sched, scaler, loss_fn, to_input, nullcontext,
                                           None, range(20), torch.zeros(()), 0, 5, lambda step, loss: None, 1)
        assert (seen, done) == (20 * len(y), 20)
        losses.append(loss_sum.item() / 20)
    assert losses[2] < 0.25 * losses[0], losses
