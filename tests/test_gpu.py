"""The CUDA paths: the on-device loader on a GPU against the CPU stream, a step that reads the device at readings
only, bf16 / fp16 / channels_last / compiled training that learns, device memory readings, deterministic
kernels. Skipped without CUDA; benchmarks/gpu.sh runs them on a lent GPU machine."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import hsci, run_dirs, summary_of
from hsci.loop.step import Epoch, Readings, train_epoch
from hsci.parts.build import build, compose, optimizing
from hsci.parts.datasets import CropFlip, Loading, Tensors
from hsci.parts.loaders import eval_loader, input_fn, start_epoch, train_loader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
EPOCHS = 5  # of digits with the cnn; fp32 on the CPU reaches 0.91 to 0.94 test accuracy in 5 epochs (seeds 0-3)
LEARNED = 0.8  # test accuracy that shows a run learned: chance is 0.1


def cifar_shaped(n: int, augment: CropFlip | None = None) -> Tensors:
    """n random uint8 images (3, 32, 32); label = index, so a served image names its original."""
    g = torch.Generator().manual_seed(0)
    return Tensors(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n), augment)


def placement(served: torch.Tensor, originals: torch.Tensor, pad: int) -> torch.Tensor:
    """(B,) the one placement (row offset i, column offset j, flip), numbered (i * span + j) * 2 + flip, at which
    `CropFlip`'s definition (crop the zero-padded image, then mirror) turns each of `originals` into the served
    image; -1 where none or more than one does."""
    h, w = originals.shape[-2:]
    padded = F.pad(originals, (pad, pad, pad, pad))
    crops = [padded[..., i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    hits = torch.stack([(c.flip(-1) if flip else c).eq(served).flatten(1).all(1)
                        for c in crops for flip in (False, True)], 1)  # (B, placements)
    return torch.where(hits.sum(1) == 1, hits.int().argmax(1), -1)


def test_cuda_loader_serves_the_cpu_stream_every_sample_once_cropped_and_flipped():
    # The order, crops and flips are drawn on the CPU: the stream on CUDA is the CPU device's, batch for batch.
    n, pad = 4096, 4
    data = cifar_shaped(n, CropFlip(pad, True))
    loader, on_cpu = (train_loader(data, Loading(512), device, 0, kind="gpu") for device in (CUDA, CPU))
    for epoch in (1, 2):
        start_epoch(loader, epoch), start_epoch(on_cpu, epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == 8
        assert all(x.device.type == "cuda" and x.dtype == torch.uint8 and x.shape == (512, 3, 32, 32)
                   for x, _ in batches)
        assert all(torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy) for (x, y), (cx, cy) in zip(batches, on_cpu))
    start_epoch(loader, 2, first_batch=3)  # an epoch resumed mid-way carries on with the same batches
    assert all(torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(batches[3:], loader, strict=True))
    y = torch.cat([y for _, y in batches]).cpu()
    assert sorted(y.tolist()) == list(range(n))
    torch_path = train_loader(data, Loading(512), CPU, 0, kind="torch")
    start_epoch(torch_path, 2)
    assert torch.equal(y, torch.cat([labels for _, labels in torch_path]))  # the DataLoader path's order
    # Each served image is its own original, cropped and flipped pixel for pixel as CropFlip defines it;
    # 9 row offsets, 9 column offsets, flipped or not, each equally likely: over 4096 draws the sd of a share
    # is 0.005 (offsets) and 0.008 (flips)
    where = placement(torch.cat([x for x, _ in batches]).cpu(), data.x[y], pad)
    assert (where >= 0).all()
    for part, k in ((where // 18, 9), (where // 2 % 9, 9), (where % 2, 2)):
        assert (torch.bincount(part, minlength=k) / n - 1 / k).abs().max() < 0.035
    test = eval_loader(data, Loading(512), CUDA, 0, kind="gpu")
    assert torch.equal(torch.cat([x for x, _ in test]).cpu(), data.x)  # evaluation: in order, not augmented


def syncs(run) -> int:
    """The synchronising calls torch's sync debug mode reports for a second `run()` (the first one's kernel
    choice and allocations are not the step's)."""
    run()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_the_step_reads_the_device_at_readings_only():
    # torch reports each synchronising call in its sync debug mode: hsci's steps make the bare loop's, plus
    # one read per reading (every trainer.log_every steps and at the epoch's last).
    cfg = compose(["trainer.device=cuda", "trainer.precision=bf16", "data.batch_size=64"])
    parts = build(cfg)
    batches = [batch for _, batch in zip(range(10), parts.loaders.train)]
    optim = optimizing(cfg, parts, epochs=3, steps_per_epoch=10)

    def hsci_epoch() -> None:
        epoch = Epoch.start(1, 10, CUDA)
        train_epoch(parts, optim=optim, batches=batches, epoch=epoch, readings=Readings(5, epoch))

    def bare_epoch() -> None:
        for x, y in batches:
            with parts.amp():
                loss = parts.loss_fn(parts.model(parts.to_input(x)), y)
            loss.backward()
            optim.opt.step()
            optim.opt.zero_grad(set_to_none=True)

    assert parts.speed.loader == "gpu" and batches[0][0].device.type == "cuda"
    assert syncs(hsci_epoch) == syncs(bare_epoch) + 2


def test_batches_become_the_same_model_input_on_cuda_as_on_the_cpu():
    x = cifar_shaped(64).x
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    on_cuda = input_fn(mean, std, CUDA, channels_last=True)(x.to(CUDA))
    assert on_cuda.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(on_cuda.cpu(), input_fn(mean, std, CPU)(x))
    # pretrained weights' input: grayscale repeated to RGB and resized, on the device
    gray, pretrained = x[:, :1], {"size": 48, "channels": 3}
    on_cuda = input_fn(mean, std, CUDA, **pretrained)(gray.to(CUDA))
    torch.testing.assert_close(on_cuda.cpu(), input_fn(mean, std, CPU, **pretrained)(gray), atol=1e-4, rtol=1e-4)


def trained(tmp_path: Path, *overrides: str, timeout: float = 300) -> tuple[Path, dict]:
    """A finished `hsci train` run on CUDA (digits, cnn, `EPOCHS` epochs): its directory and summary."""
    result = hsci("train", "trainer.device=cuda", f"trainer.epochs={EPOCHS}", *overrides, cwd=tmp_path,
                  timeout=timeout)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    summary = summary_of(run)
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
    return run, summary


def test_bf16_channels_last_training_on_cuda_learns_and_evaluates_alike(tmp_path):
    run, summary = trained(tmp_path, "trainer.precision=bf16", "trainer.channels_last=true")
    assert (summary["precision"], summary["channels_last"], summary["loader"]) == ("bf16", True, "gpu")  # gpu: auto
    assert summary["test"]["acc"] > LEARNED
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == EPOCHS and all(r["train_img_per_s"] > 0 for r in records)
    # On CUDA the reading is the device's allocations (a few MB here), not the process's memory.
    assert all(0 < r["max_mem_gb"] < 0.5 for r in records)
    result = hsci("eval", f"run={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    again = json.loads((run / "eval_test.json").read_text())["metrics"]
    assert again["acc"] == pytest.approx(summary["test"]["acc"], abs=0.01)  # cuDNN may pick other kernels


def test_fp16_training_on_cuda_scales_the_loss_clips_and_learns(tmp_path):
    run, summary = trained(tmp_path, "trainer.precision=fp16", "trainer.grad_clip=1.0")
    assert summary["precision"] == "fp16" and summary["test"]["acc"] > LEARNED
    scaler = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert scaler.get("scale", 0) > 0  # a grad scaler that is off saves nothing


def test_compiled_training_on_cuda_reports_compile_time_apart_and_learns(tmp_path):
    # Left to auto, precision and memory format are CUDA's defaults.
    run, summary = trained(tmp_path, "trainer.compile=true", timeout=150)  # within gpu.sh's limit for the tests
    assert (summary["precision"], summary["channels_last"]) == ("bf16", True)
    assert summary["compile_s"] > 0 and summary["test"]["acc"] > LEARNED


def test_deterministic_runs_on_cuda_end_with_equal_weights(tmp_path):
    for name in ("a", "b"):
        result = hsci("train", "trainer.device=cuda", "trainer.deterministic=true", "trainer.epochs=2", f"name={name}",
                      cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    a, b = (torch.load(next((tmp_path / "outputs").glob(f"*/*_{name}")) / "checkpoints" / "last.pt",
                       weights_only=True)["model"] for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bench_on_cuda_takes_the_cuda_defaults_and_reads_device_memory(tmp_path):
    result = hsci("bench", "trainer.device=cuda", "steps=5", "warmup=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "training step (cuda, bf16, channels_last True" in result.stdout and "loader (gpu" in result.stdout
    assert 0 < float(re.search(r"peak_mem_gb\s+([\d.]+)", result.stdout)[1]) < 0.5


def test_the_ddp_step_on_one_gpu_reads_the_device_no_more_than_the_plain_step(monkeypatch):
    # One rank of NCCL, as torchrun --nproc_per_node=1 starts it: DDP's bucketed all-reduce and the stop flag
    # (exchanged on the CPU) add no synchronising call to hsci's step.
    import socket
    from dataclasses import replace

    from hsci.parts import world as distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    world = distributed.join("cuda", 60)
    try:
        cfg = compose(["trainer.device=cuda", "trainer.precision=bf16", "data.batch_size=64"])
        parts = build(cfg, world=world)
        stepping = replace(parts, model=world.wrap(parts.model, parts.device))
        batches = [batch for _, batch in zip(range(10), parts.loaders.train)]
        optim = optimizing(cfg, parts, epochs=3, steps_per_epoch=10)

        def epoch_of(p) -> None:
            epoch = Epoch.start(1, 10, parts.device)
            train_epoch(p, optim=optim, batches=batches, epoch=epoch, readings=Readings(5, epoch, world=world))

        assert world.backend == "nccl"
        assert syncs(lambda: epoch_of(stepping)) == syncs(lambda: epoch_of(parts))
    finally:
        distributed.leave()


def test_torchrun_on_one_gpu_trains_through_nccl(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             "-m", "hsci", "train", "trainer.device=cuda", f"trainer.epochs={EPOCHS}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = summary_of(run_dirs(tmp_path)[0])
    assert (summary["world_size"], summary["backend"]) == (1, "nccl") and summary["test"]["acc"] > LEARNED
