"""timm's models and fine-tuning: a new run from a weights file or from a run of the user's own, the backbone frozen
and thawed, its learning rate apart; pretrained weights from the caches the libraries keep, refused before the run
directory when they are out of reach, and never needed again to evaluate the run."""

import sys

import pytest
import torch
from conftest import hsci, run_dirs, summary_of
from torch import nn

from hsci.parts.finetune import freeze_backbone, head

SMOKE = ("experiment=smoke", "trainer.limit_batches=1", "trainer.epochs=1", "data.batch_size=8")


def cnn_weights(outputs: int = 10) -> dict:
    """A state dict of hsci's cnn for digits (8x8, one channel) with `outputs` classes."""
    from hsci.models import cnn

    return cnn((1, 8, 8), outputs, hidden=128, dropout=0.5, conv_dropout=0.25).state_dict()


def test_a_weights_file_starts_the_run_and_a_new_head_starts_afresh(tmp_path):
    torch.save(cnn_weights(outputs=5), tmp_path / "five.pt")  # another task's head: 5 classes, digits has 10
    result = hsci("train", *SMOKE, "model.weights=five.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "a new head starts afresh: 10.weight, 10.bias" in result.stdout
    run = run_dirs(tmp_path)[-1]
    assert summary_of(run)["weights_from"] == {"file": str(tmp_path / "five.pt"), "new_head": ["10.weight", "10.bias"]}

    from safetensors.torch import save_file

    wide = cnn_weights()
    wide["0.weight"] = torch.zeros(32, 3, 3, 3)  # a first layer for colour images: not the head, so refused
    save_file(wide, tmp_path / "colour.safetensors")
    refused = hsci("train", *SMOKE, "model.weights=colour.safetensors", cwd=tmp_path)
    assert refused.returncode == 1
    assert "does not fit this model: shapes differ: 0.weight (32, 3, 3, 3) in the file, (32, 1, 3, 3) in the model" \
           in refused.stderr


def test_weights_that_cannot_be_had_are_refused_before_the_run_directory(tmp_path):
    for args, said in [(("model.weights=absent.pt",), "model.weights=absent.pt is not a file"),
                       (("model=resnet18", "model.pretrained=resnet18.pth"), "model.pretrained=resnet18.pth is "
                                                                             "invalid: it must be true or false"),
                       (("model.unfreeze_at_epoch=2",), "add model.freeze=backbone"),
                       (("model=timm", "model.name=resnet81"), "model.name=resnet81 is not a timm model: did you "
                                                              "mean resnet18"),
                       (("init_from=latest",), "init_from=latest: no run under")]:
        result = hsci("train", *SMOKE, *args, cwd=tmp_path)
        assert result.returncode != 0 and said in result.stderr, (args, result.stderr)
    assert not (tmp_path / "outputs").exists() or not run_dirs(tmp_path)


def test_init_from_a_run_with_the_backbone_frozen_then_thawed_at_its_own_rate(tmp_path, finished):
    frozen = hsci("train", *SMOKE, f"init_from={finished}", "model.freeze=backbone", cwd=tmp_path)
    assert frozen.returncode == 0, frozen.stderr
    assert "backbone frozen: training only the head, 10" in frozen.stdout
    run = run_dirs(tmp_path)[-1]
    assert summary_of(run)["weights_from"]["file"] == str(finished / "checkpoints" / "best.pt")
    before = torch.load(finished / "checkpoints" / "best.pt", weights_only=True)["model"]
    after = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name in before:  # the backbone as it came, the head trained
        assert torch.equal(before[name], after[name]) == (not name.startswith("10.")), name

    thawed = hsci("train", *SMOKE, "trainer.epochs=2", "init_from=latest", "model.freeze=backbone",
                  "model.unfreeze_at_epoch=2", "model.backbone_lr_scale=0.1", cwd=tmp_path)
    assert thawed.returncode == 0, thawed.stderr
    assert "epoch 2: the backbone trains from here on" in thawed.stdout
    last = torch.load(run_dirs(tmp_path)[-1] / "checkpoints" / "last.pt", weights_only=True)
    head_group, backbone_group = last["optimizer"]["param_groups"]
    assert backbone_group["lr"] == pytest.approx(0.1 * head_group["lr"])
    assert len(head_group["params"]) == 2  # the head's weight and bias
    moved = torch.load(run_dirs(tmp_path)[-1] / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(moved["0.weight"], after["0.weight"])  # the backbone trained in epoch 2


def test_a_frozen_backbone_keeps_its_batch_norm_statistics():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    assert head(model) == "3"
    freeze_backbone(model, True)
    model.train()
    model(torch.randn(8, 1, 8, 8))
    assert torch.equal(model[1].running_mean, torch.zeros(4)) and not model[0].weight.requires_grad
    assert model[3].weight.requires_grad
    assert freeze_backbone(model, False) and model[0].weight.requires_grad
    model.train()
    model(torch.randn(8, 1, 8, 8))
    assert not torch.equal(model[1].running_mean, torch.zeros(4))


def test_a_timm_model_trains_on_the_datasets_channels_and_classes(tmp_path):
    result = hsci("train", *SMOKE, "model=timm", "model.name=test_efficientnet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    weights = torch.load(run_dirs(tmp_path)[-1] / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert weights["conv_stem.weight"].shape[1] == 1 and weights["classifier.weight"].shape[0] == 10
    small = hsci("train", *SMOKE, "model=timm", "model.name=test_vit", cwd=tmp_path)  # patches of 16 px: 8x8 won't do
    assert small.returncode != 0 and "model=timm model.name=test_vit cannot take 8x8 images" in small.stderr


def test_timm_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm gives: ImportError
    result = hsci("train", *SMOKE, "model=timm", cwd=tmp_path)
    assert result.returncode == 2 and 'pip install "hsci[timm]"' in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "outputs").exists()


def hf_cache(folder, repo: str, weights: dict) -> None:
    """A Hugging Face hub cache holding `repo`'s model.safetensors, laid out as huggingface_hub keeps it."""
    from safetensors.torch import save_file

    commit = "0" * 40
    snapshot = folder / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (folder / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(commit)
    save_file(weights, snapshot / "model.safetensors")


def test_pretrained_timm_weights_come_from_the_cache_and_are_not_needed_to_evaluate(tmp_path, monkeypatch):
    import timm
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    hf_cache(cache, "timm/test_efficientnet.r160_in1k", timm.create_model("test_efficientnet").state_dict())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE=<folder> sets at import
    args = (*SMOKE, "model=timm", "model.name=test_efficientnet", "model.pretrained=true", "data.batch_size=4")
    result = hsci("train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resized to 160 px" in result.stdout

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))  # another machine, offline
    evaluated = hsci("eval", "run=latest", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    missing = hsci("train", *args, cwd=tmp_path)
    assert missing.returncode == 2
    assert f"the weights of timm/test_efficientnet.r160_in1k are not in the Hugging Face cache ({tmp_path / 'empty'})" \
           in missing.stderr
    assert len(run_dirs(tmp_path)) == 1  # refused before a run directory was made
