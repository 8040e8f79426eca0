"""hsci's training step against a bare PyTorch loop, and hsci's two loader paths against each other.

Both steps run in this one process on the same model architecture, batch, precision and memory format,
alternating round by round so that drift of the machine (clocks, other load) falls on both alike. The
hsci side is hsci/step.py's own `train_epoch` with the parts `hsci.build.build` makes from the composed
config; the bare side is the loop a user would write by hand, fed batches already normalised.

    python benchmarks/step_vs_bare.py model=cnn data=mnist data.batch_size=128
    python benchmarks/step_vs_bare.py model=resnet18 data=cifar10 data.batch_size=64 --steps 5
    python benchmarks/step_vs_bare.py --loaders data=cifar10 data.batch_size=512

Overrides are `hsci train`'s. Prints a short table last; see benchmarks/RESULTS.md for recorded figures.
"""

import argparse
import statistics
import time

import torch
from hydra.utils import instantiate

from hsci.loop.bench import synthetic
from hsci.loop.step import Epoch, Readings, train_epoch
from hsci.parts.build import build, compose, make_model, optimizing
from hsci.parts.datasets import CropFlip, Loading, Tensors
from hsci.parts.loaders import start_epoch, train_loader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps(cfg, n_steps: int, rounds: int) -> dict:
    """Images per second of the hsci step and the bare step, alternating, median over `rounds`."""
    p = build(cfg, data=synthetic(cfg, None, 2 * cfg.data.batch_size))
    x_u8, y = (t[:cfg.data.batch_size].to(p.device) for t in (p.data.train.x, p.data.train.y))
    optim = optimizing(cfg, p, epochs=1, steps_per_epoch=n_steps * (rounds + 1))

    # The bare loop: its own model of the same architecture, an already-normalised float batch.
    bare = make_model(cfg, p.data.input_shape, p.data.num_outputs).to(p.device)
    if p.speed.channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    bare_opt = instantiate(cfg.optimizer, params=bare.parameters())
    loss_fn = instantiate(cfg.loss)
    x = p.to_input(x_u8)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p.speed.precision)

    def hsci_step(n: int) -> None:
        epoch = Epoch.start(1, n, p.device)
        train_epoch(p, optim=optim, batches=[(x_u8, y)] * n, epoch=epoch, readings=Readings(n, epoch))

    def bare_step(n: int) -> None:
        bare.train()
        for _ in range(n):
            with torch.autocast(p.device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(bare(x), y)
            loss.backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
        sync(p.device)

    rates = {"hsci": [], "bare": []}
    for name, step in (("hsci", hsci_step), ("bare", bare_step)):  # warm-up, not timed
        step(max(1, n_steps // 2))
    for _ in range(rounds):
        for name, step in (("hsci", hsci_step), ("bare", bare_step)):
            start = time.perf_counter()
            step(n_steps)
            rates[name].append(n_steps * len(y) / (time.perf_counter() - start))
    hsci_rate, bare_rate = statistics.median(rates["hsci"]), statistics.median(rates["bare"])
    return {"device": str(p.device), "precision": p.speed.precision, "channels_last": p.speed.channels_last,
            "batch": len(y), "input": "x".join(map(str, p.data.input_shape)), "hsci_img_per_s": round(hsci_rate),
            "bare_img_per_s": round(bare_rate), "hsci/bare": round(hsci_rate / bare_rate, 3)}


def loaders(cfg, n_images: int, batches: int, rounds: int, workers: int) -> dict:
    """Augmented images per second that each loader path delivers as normalised model input on the device."""
    p = build(cfg, data=synthetic(cfg, None, 2 * cfg.data.batch_size))
    shape = p.data.input_shape
    pad, flip = cfg.data.random_crop_padding, cfg.data.horizontal_flip
    data = Tensors(torch.randint(0, 256, (n_images, *shape), dtype=torch.uint8), torch.randint(0, 10, (n_images,)),
                   CropFlip(pad, flip) if pad or flip else None)
    paths = {f"torch ({workers} workers)": train_loader(data, Loading(cfg.data.batch_size, workers), p.device, 0,
                                                        kind="torch"),
             "gpu (set on the device)": train_loader(data, Loading(cfg.data.batch_size), p.device, 0, kind="gpu")}
    rates = {name: [] for name in paths}
    for epoch in range(rounds + 1):  # the first round warms up (worker start, allocator)
        for name, loader in paths.items():
            start_epoch(loader, epoch + 1)
            start, n = time.perf_counter(), 0
            for _, (xb, _) in zip(range(batches), loader):
                out = p.to_input(xb.to(p.device, non_blocking=True))
                n += len(xb)
            out.sum().item()
            if epoch:
                rates[name].append(n / (time.perf_counter() - start))
    result = {"device": str(p.device), "batch": cfg.data.batch_size, "crop_padding": pad, "flip": flip}
    result |= {f"{name} img/s": round(statistics.median(r)) for name, r in rates.items()}
    names = list(paths)
    result["gpu/torch"] = round(result[f"{names[1]} img/s"] / result[f"{names[0]} img/s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="hsci train overrides, e.g. model=resnet18 data=cifar10")
    parser.add_argument("--steps", type=int, default=20, help="training steps per side per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    parser.add_argument("--loaders", action="store_true", help="compare the loader paths instead of the steps")
    parser.add_argument("--images", type=int, default=50_000, help="--loaders: images in the set")
    parser.add_argument("--workers", type=int, default=8, help="--loaders: DataLoader worker processes")
    args = parser.parse_args()
    cfg = compose(args.overrides)
    if args.loaders:
        result = loaders(cfg, args.images, args.steps, args.rounds, args.workers)
    else:
        result = steps(cfg, args.steps, args.rounds)
    print(" ".join(args.overrides))
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
