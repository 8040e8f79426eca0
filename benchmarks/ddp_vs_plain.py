"""The DDP path with one process against today's path: what `torchrun --nproc_per_node=1 -m hsci train` adds to
an epoch over `hsci train` (issue 9's target: DDP / plain >= 0.97 on the CPU).

This process joins a job of one rank as torchrun would start it (RANK=0, WORLD_SIZE=1, a free MASTER_PORT on
127.0.0.1; gloo on the CPU, NCCL on CUDA) and builds the parts twice from the same composed config and the same
data: the plain side steps its model as `hsci train` does with one process (the single-process `World`), the DDP
side steps `world.wrap(model)`, as hsci/train.py does under torchrun, so the one difference is
DistributedDataParallel (its bucketed gradient all-reduce and buffer broadcast; `World.mean` and `World.stop`
are no-ops for one rank). Each epoch is what hsci/train.py does for one: the loader pointed at the epoch,
`train_epoch` with `Readings` (steps.jsonl, the console line, train.log; the console is muted), the epoch's
loss read over the ranks and the buffers made the same. Whole epochs alternate between the two sides, which
of them goes first swapping every round, so drift of the machine falls on both alike; timed on the process's
CPU time (`time.process_time`) and on the wall clock.

    python benchmarks/ddp_vs_plain.py                            # CPU: cnn at 28 px, batch 128, fp32, gloo
    python benchmarks/ddp_vs_plain.py --rounds 15 --batches 20
    python benchmarks/ddp_vs_plain.py --device cuda              # resnet18 at 32 px, batch 512, bf16, NCCL

Overrides are `hsci train`'s, after the defaults of --device and --model. Prints `key  value` lines last, which
benchmarks/gpu_table.py reads; see benchmarks/RESULTS.md for recorded figures.
"""

import argparse
import logging
import os
import socket
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from hsci import report
from hsci.loop.bench import synthetic
from hsci.loop.step import Epoch, Readings, train_epoch
from hsci.loop.train import STEPS
from hsci.parts import world as distributed
from hsci.parts.build import build, compose, optimizing
from hsci.parts.loaders import Timed, start_epoch
from hsci.parts.world import SINGLE

MODELS = {"cnn": ["model=cnn", "data=mnist", "data.batch_size=128"],  # the default experiment's network at 28 px
          "resnet18": ["model=resnet18", "data=cifar10", "data.batch_size=512"]}
DEVICES = {"cpu": ["trainer.device=cpu", "trainer.precision=fp32"],
           # the anchors' setting (../shared/gpu-anchors.md), as benchmarks/gpu.sh runs the other GPU figures
           "cuda": ["trainer.device=cuda", "trainer.precision=bf16", "trainer.channels_last=true", "optimizer=sgd",
                    "loss.label_smoothing=0.1"]}
SIDES = ("plain", "ddp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_one(device: str) -> distributed.World:
    """This process as the only rank of a job, as `torchrun --nproc_per_node=1` would start it."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    return distributed.join(device, timeout_s=120)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(cfg, world: distributed.World, n_batches: int, rounds: int) -> dict:
    """CPU and wall seconds per epoch of each side, alternating, over `rounds` epochs after one of warm-up."""
    data = synthetic(cfg, None, n_batches * cfg.data.batch_size)
    parts = {"plain": build(cfg, data=data, world=SINGLE), "ddp": build(cfg, data=data, world=world)}
    optim = {name: optimizing(cfg, p, epochs=rounds + 1, steps_per_epoch=len(p.loaders.train))
             for name, p in parts.items()}
    p = parts["ddp"]
    stepping = {"plain": parts["plain"], "ddp": replace(p, model=world.wrap(p.model, p.device))}  # as train() does
    run_dir = Path(tempfile.mkdtemp())
    logging.basicConfig(filename=run_dir / "train.log", level=logging.INFO)  # as hsci train logs, to a file

    def epoch(name: str, number: int) -> None:
        p, steps = stepping[name], len(stepping[name].loaders.train)
        epoch = Epoch.start(number, steps, p.device)
        start_epoch(p.loaders.train, epoch.number)
        batches = Timed(p.loaders.train)
        with report.epoch_progress(epoch.number, rounds + 1, 0, epoch.stop) as progress:
            readings = Readings(cfg.trainer.log_every, epoch, run_dir / f"{name}_{STEPS}", progress, p.world)
            train_epoch(p, optim=optim[name], batches=batches, epoch=epoch, readings=readings)
        p.world.mean(epoch.loss_sum).item()  # the epoch's record, over every rank's share
        p.world.same_buffers(parts[name].model)
        sync(p.device)

    report.console.quiet = True  # the readings' lines are made and logged to train.log, but not printed
    seconds = {name: {"cpu": [], "wall": []} for name in SIDES}
    for number in range(1, rounds + 2):
        for name in SIDES if number % 2 else SIDES[::-1]:  # who goes first swaps every round
            cpu, wall = time.process_time(), time.perf_counter()
            epoch(name, number)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if number > 1:  # the first epoch of each warms up (allocator, cuDNN's choice of kernels, DDP's buckets)
                seconds[name]["cpu"].append(cpu)
                seconds[name]["wall"].append(wall)
            print(f"round {number - 1 or 'warm-up'}  {name:<5}  cpu {cpu:.3f} s  wall {wall:.3f} s  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)  # others' processes show as load above ~2
    report.console.quiet = False

    images = len(p.loaders.train) * cfg.data.batch_size
    ddp = stepping["ddp"].model
    options = ",".join(f"{k}={getattr(ddp, k, '?')}" for k in ("gradient_as_bucket_view", "static_graph"))
    result = {"device": str(p.device), "backend": world.backend, "world_size": world.size, "ddp options": options,
              "precision": p.speed.precision, "channels_last": p.speed.channels_last, "threads": torch.get_num_threads(),
              "name": cfg.name, "batch": cfg.data.batch_size,
              "input": "x".join(map(str, p.data.input_shape)), "loader": p.speed.loader,
              "batches/epoch": len(p.loaders.train), "rounds": rounds,
              "readings/epoch": sum(1 for step in range(1, len(p.loaders.train) + 1)
                                    if step % cfg.trainer.log_every == 0 or step == len(p.loaders.train))}
    for clock in ("cpu", "wall"):
        for name in SIDES:
            s = seconds[name][clock]
            result[f"{name} s/epoch ({clock}) median"] = f"{statistics.median(s):.3f}"
            result[f"{name} s/epoch ({clock}) min..max"] = f"{min(s):.3f}..{max(s):.3f}"
            result[f"{name} img/s ({clock})"] = round(images / statistics.median(s))
        # DDP's speed relative to plain, round by round: plain seconds / DDP seconds (> 1: DDP faster)
        ratios = [plain / ddp for plain, ddp in zip(seconds["plain"][clock], seconds["ddp"][clock])]
        result[f"ddp/plain ({clock}) median"] = f"{statistics.median(ratios):.3f}"
        result[f"ddp/plain ({clock}) min..max"] = f"{min(ratios):.3f}..{max(ratios):.3f}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="hsci train overrides, after those of --device and --model")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="cpu (gloo) or cuda (NCCL)")
    parser.add_argument("--model", choices=MODELS, help="cnn at 28 px (default on the CPU) or resnet18 at 32 px "
                                                        "(default on CUDA)")
    parser.add_argument("--batches", type=int, default=40, help="training batches per epoch")
    parser.add_argument("--rounds", type=int, default=15, help="alternating epochs per side (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    model = args.model or ("cnn" if args.device == "cpu" else "resnet18")
    overrides = MODELS[model] + DEVICES[args.device] + args.overrides
    cfg = compose(overrides)  # before joining: a bad override is refused without a process group
    world = join_one(cfg.trainer.device)
    torch.set_num_threads(args.threads)  # after join, which gives each rank its share of the cores
    try:
        result = compare(cfg, world, args.batches, args.rounds)
    finally:
        distributed.leave()
    print(" ".join(overrides))
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
