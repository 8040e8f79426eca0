"""The two loader paths: the `gpu` one (the set held on the device, order and augmentation drawn there) run
on the CPU device, against the `torch` one; auto's choice; hsci bench; the speed settings on the CPU."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra.utils import instantiate

from conftest import hsci, run_dirs, summary_of
from hsci import UserError
from hsci.parts.datafiles import ImageFiles
from hsci.parts.datasets import CropFlip, Loading, Tensors
from hsci.parts.loaders import DeviceLoader, crop_flip, drops, pick_loader, start_epoch, train_loader
from hsci.parts.world import World

CPU = torch.device("cpu")


def numbered(n: int, augment: CropFlip | None = None) -> Tensors:
    """n images whose pixels all hold the image's index (mod 256), label = index."""
    x = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    return Tensors(x, torch.arange(n), augment)


def test_device_loader_serves_every_sample_once_per_epoch_with_model_ready_dtypes():
    loader = DeviceLoader(numbered(192), 32, CPU, train=True, seed=0)
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == 6
        assert all(x.shape == (32, 3, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.int64 for x, y in batches)
        labels = torch.cat([y for _, y in batches])
        assert sorted(labels.tolist()) == list(range(192))
        assert torch.equal(torch.cat([x[:, 0, 0, 0] for x, _ in batches]).long(), labels)  # images match labels
    loader.set_epoch(1)
    first = torch.cat([y for _, y in loader])
    loader.set_epoch(2)
    assert not torch.equal(first, torch.cat([y for _, y in loader]))  # a new order every epoch
    test = DeviceLoader(numbered(70), 32, CPU, train=False, seed=0)
    assert [len(y) for _, y in test] == [32, 32, 6] and torch.equal(torch.cat([y for _, y in test]), torch.arange(70))


def test_device_loader_resumes_mid_epoch_exactly():
    loader = DeviceLoader(numbered(100, CropFlip(2, True)), 10, CPU, train=True, seed=3)
    start_epoch(loader, 4)
    whole = list(loader)
    start_epoch(loader, 4, first_batch=6)
    rest = list(loader)
    assert len(rest) == 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[6:], rest))


def test_batched_crop_flip_equals_the_per_sample_augmentation():
    x = torch.randint(0, 256, (16, 3, 12, 10), dtype=torch.uint8)
    offsets, flips = torch.randint(0, 9, (16, 2)), torch.rand(16) < 0.5
    out = crop_flip(x, 4, offsets, flips)
    for b in range(16):
        one = torch.nn.functional.pad(x[b], (4, 4, 4, 4))[:, offsets[b, 0]:offsets[b, 0] + 12,
                                                            offsets[b, 1]:offsets[b, 1] + 10]
        assert torch.equal(out[b], one.flip(-1) if flips[b] else one)


def test_both_paths_draw_crops_and_flips_from_the_same_distribution():
    # Where each path puts the top-left pixel of the original image tells its crop offset and flip.
    n, pad = 4000, 2
    x = torch.zeros(n, 1, 6, 6, dtype=torch.uint8)
    x[:, :, 0, 0] = 255
    data = Tensors(x, torch.zeros(n, dtype=torch.long), CropFlip(pad, True))

    def placements(batches) -> torch.Tensor:
        imgs = torch.cat([b for b, _ in batches])[:, 0]  # (N, H, W)
        seen = torch.zeros(2 * pad + 1, 2 * pad + 1, 2)  # row, column of the marked pixel, flipped or not
        for img in imgs:
            where = (img == 255).nonzero()
            if len(where):  # the marked corner may be cropped away
                r, c = where[0].tolist()
                seen[r, min(c, 5 - c), int(c > 2)] += 1
        return seen / len(imgs)

    torch_path = train_loader(data, Loading(100), CPU, 0)
    device_path = train_loader(data, Loading(100), CPU, 0, kind="gpu")
    a, b = placements(torch_path), placements(device_path)
    # 3 x 3 visible placements x 2 flips, each with probability 1/25 * 1/2; 4000 draws: sd about 0.0044
    assert (a - b).abs().max() < 0.02
    assert (a[:3, :3] - 1 / 50).abs().max() < 0.015


def test_auto_picks_the_torch_loader_off_cuda_and_gpu_needs_a_set_in_memory(cfg_of):
    data = instantiate(cfg_of().data)
    assert pick_loader("auto", data, CPU) == "torch"
    assert pick_loader("gpu", data, CPU) == "gpu"
    files = type("Files", (), {"train": data.train, "val": data.val, "test": ImageFiles([], 8, 3)})()
    with pytest.raises(UserError, match="data.loader=gpu needs a dataset held in memory"):
        pick_loader("gpu", files, CPU)


def test_a_run_on_the_gpu_loader_records_its_speed_settings(tmp_path):
    result = hsci("train", "experiment=smoke", "data=fake", "data.loader=gpu", "data.random_crop_padding=4",
                  "data.horizontal_flip=true", "trainer.channels_last=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    summary = summary_of(run)
    assert summary["loader"] == "gpu" and summary["precision"] == "fp32" and summary["channels_last"] is True
    assert summary["compile_s"] == 0 and 0 < summary["startup_s"] < 120
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_img_per_s"] > 0 and record["data_wait_s"] >= 0 and record["max_mem_gb"] > 0


def test_defaults_on_the_cpu_are_fp32_and_the_torch_loader(finished):
    summary = summary_of(finished)  # experiment=smoke
    assert (summary["precision"], summary["channels_last"], summary["loader"]) == ("fp32", False, "torch")


def test_bench_measures_the_step_and_the_loader(tmp_path):
    result = hsci("bench", "steps=3", "warmup=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "training step (cpu, fp32" in result.stdout and "img_per_s" in result.stdout
    assert "loader (torch" in result.stdout and "bound by the" in result.stdout
    assert not (tmp_path / "outputs").exists()  # a benchmark makes no run directory


def test_bench_with_a_batch_larger_than_the_set(tmp_path):
    # digits' 1,221 training images make one loader batch of 5,000, gone through again for every timed batch.
    result = hsci("bench", "data.batch_size=5000", "steps=2", "warmup=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "batch 5000" in result.stdout and "loader (torch" in result.stdout and "bound by the" in result.stdout


def test_bench_without_the_data_uses_the_declared_shape(tmp_path):
    result = hsci("bench", "data=cifar10", "data.download=false", "model=cnn", "steps=2", "warmup=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "input (3, 32, 32)" in result.stdout and "loader not measured: data=cifar10: missing" in result.stdout


def test_drop_last_auto_leaves_out_the_last_batch_only_where_that_is_harmless():
    assert not drops(97, 64, "auto")  # 33 samples, a third of the split: kept
    assert drops(1221, 16, "auto")  # 5 of 1,221: left out
    assert drops(65, 64, "auto")  # a batch of one would break batch norm
    assert drops(40, 32, "auto", ranks=8) and not drops(40, 32, "auto", ranks=4)  # 8 samples: 1 or 2 per process
    assert not drops(60, 64, "auto") and not drops(128, 64, "auto")  # one batch; no incomplete batch
    assert drops(97, 64, True) and not drops(1221, 16, False)
    with pytest.raises(UserError, match=r"data.drop_last=true leaves no batch: the training split holds 60 samples"):
        drops(60, 64, True)
    with pytest.raises(UserError, match=r"data.drop_last=false keeps a last batch of 1 samples, fewer than one for "
                                        r"each of the 2 processes"):
        drops(65, 64, False, ranks=2)


@pytest.mark.parametrize("choice, batches", [("auto", [64, 33]), (True, [64]), (False, [64, 33])])
def test_both_loaders_drop_the_same_last_batch_and_each_process_takes_its_share(choice, batches):
    data = numbered(97)
    for kind in ("torch", "gpu"):
        seen = []
        for rank in (0, 1):
            loader = train_loader(data, Loading(64, drop_last=choice), CPU, 0, kind, World(rank, 2))
            start_epoch(loader, 2)
            shares = [y for _, y in loader]
            assert len(loader) == len(shares) == len(batches)
            seen.append(shares)
        assert [len(a) + len(b) for a, b in zip(*seen)] == batches  # the ranks' shares side by side: each batch
        labels = torch.cat([torch.cat(pair) for pair in zip(*seen)])
        assert len(set(labels.tolist())) == sum(batches)


# digits trains on 1,221 images: at a batch of 300, 21 are left over (under a tenth of the split).
WHOLE_EPOCH = ["experiment=smoke", "trainer.limit_batches=null", "trainer.epochs=1", "data.batch_size=300"]


@pytest.mark.slow
def test_drop_last_false_trains_on_the_last_batch_too(tmp_path):  # auto drops it: tests/test_controls.py
    result = hsci("train", *WHOLE_EPOCH, "data.drop_last=false", "data.loader=gpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "leaves out" not in result.stdout
    [run] = run_dirs(tmp_path)
    assert json.loads((run / "steps.jsonl").read_text().splitlines()[-1])["step"] == 5


@pytest.mark.slow
def test_resume_is_exact_on_the_gpu_loader_too(tmp_path):
    args = ["data=fake", "data.loader=gpu", "data.random_crop_padding=2", "data.horizontal_flip=true",
            "trainer.epochs=4", "trainer.limit_batches=6", "model=mlp", "data.train_size=4096"]
    assert hsci("train", *args, "name=whole", cwd=tmp_path).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "hsci", "train", *args, "name=cut", "trainer.log_every=1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = None
    while log is None or not log.exists() or "epoch 2/4 step" not in log.read_text():
        assert proc.poll() is None, proc.communicate()
        log = next(iter((tmp_path / "outputs").glob("*/*_cut/train.log")), None)
        time.sleep(0.01)
    cut = log.parent
    proc.send_signal(signal.SIGINT)
    proc.communicate()
    assert summary_of(cut)["status"] == "interrupted"
    assert hsci("train", f"resume={cut}", cwd=tmp_path).returncode == 0
    [whole] = (tmp_path / "outputs").glob("*/*_whole")
    a = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and summary_of(cut)["test"] == summary_of(whole)["test"]


@pytest.mark.slow
def test_a_compiled_run_reports_compile_time_apart_and_evaluates_uncompiled(tmp_path):
    result = hsci("train", "experiment=smoke", "trainer.compile=true", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    summary = summary_of(run)
    assert summary["compile_s"] > 0 and summary["status"] == "completed"
    assert hsci("eval", f"run={run}", cwd=tmp_path).returncode == 0  # the checkpoint's keys are the model's own
    assert json.loads((run / "eval_test.json").read_text())["metrics"] == summary["test"]
