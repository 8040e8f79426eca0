"""A whole hsci training epoch against a bare hand-written loop over pre-made batches.

The hsci side is what `hsci train` does for an epoch, through the same calls hsci/train.py makes: the
config's training loader pointed at the epoch, uint8 batches to normalised input on the device, the step
with its schedule, readings every `trainer.log_every` steps (steps.jsonl, the console, train.log) and
the epoch's record. The bare side is the loop a user would write by hand over batches already made and
normalised. Same architecture, batch, precision, optimizer; one process, alternating epoch by epoch, so
drift of the machine falls on both alike; timed on the process's CPU time (`time.process_time`) and on
the wall clock.

    python benchmarks/epoch_vs_bare.py                       # cnn at 28 px, batch 128, fp32, 2 threads
    python benchmarks/epoch_vs_bare.py --rounds 20 model=mlp

Overrides are `hsci train`'s. Prints a short table last; see benchmarks/RESULTS.md for recorded figures.
"""

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from hsci import report
from hsci.loop.bench import synthetic
from hsci.loop.step import Epoch, Readings, train_epoch
from hsci.loop.train import STEPS
from hsci.parts.build import build, compose, make_model, optimizing
from hsci.parts.loaders import Timed, start_epoch

DEFAULTS = ["model=cnn", "data=mnist", "data.batch_size=128", "trainer.device=cpu", "trainer.precision=fp32"]


def compare(cfg, n_batches: int, rounds: int) -> dict:
    """CPU and wall seconds per epoch of each side, alternating, over `rounds` epochs after one of warm-up."""
    p = build(cfg, data=synthetic(cfg, None, n_batches * cfg.data.batch_size))
    optim = optimizing(cfg, p, epochs=rounds + 1, steps_per_epoch=len(p.loaders.train))
    run_dir = Path(tempfile.mkdtemp())
    logging.basicConfig(filename=run_dir / "train.log", level=logging.INFO)  # as hsci train logs, to a file

    # The bare loop: its own model of the same architecture, the same optimizer, batches made and normalised once.
    bare = make_model(cfg, p.data.input_shape, p.data.num_outputs).to(p.device)
    bare_opt = instantiate(cfg.optimizer, params=bare.parameters())
    loss_fn = instantiate(cfg.loss)
    batches = [(p.to_input(x.to(p.device)), y.to(p.device)) for x, y in p.loaders.train]

    def hsci_epoch(number: int) -> None:
        epoch = Epoch.start(number, len(p.loaders.train), p.device)
        start_epoch(p.loaders.train, epoch.number)
        timed = Timed(p.loaders.train)
        with report.epoch_progress(epoch.number, rounds + 1, 0, epoch.stop) as progress:
            readings = Readings(cfg.trainer.log_every, epoch, run_dir / STEPS, progress)
            train_epoch(p, optim=optim, batches=timed, epoch=epoch, readings=readings)
        epoch.loss_sum.item()  # the epoch's record reads it

    def bare_epoch(number: int) -> None:
        bare.train()
        for x, y in batches:
            loss = loss_fn(bare(x), y)
            loss.backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
        loss.item()

    report.console.quiet = True  # the readings' lines are made and logged to train.log, but not printed
    seconds = {"hsci": {"cpu": [], "wall": []}, "bare": {"cpu": [], "wall": []}}
    for number in range(1, rounds + 2):
        for name, epoch in (("hsci", hsci_epoch), ("bare", bare_epoch)):
            cpu, wall = time.process_time(), time.perf_counter()
            epoch(number)
            if number > 1:  # the first epoch of each warms up
                seconds[name]["cpu"].append(time.process_time() - cpu)
                seconds[name]["wall"].append(time.perf_counter() - wall)
    report.console.quiet = False
    result = {"device": str(p.device), "precision": p.speed.precision, "threads": torch.get_num_threads(),
              "batch": cfg.data.batch_size, "input": "x".join(map(str, p.data.input_shape)),
              "batches/epoch": len(batches), "rounds": rounds,
              "readings/epoch": sum(1 for step in range(1, len(batches) + 1)
                                    if step % cfg.trainer.log_every == 0 or step == len(batches))}
    images = len(batches) * cfg.data.batch_size
    for clock in ("cpu", "wall"):
        ratios = [b / h for h, b in zip(seconds["hsci"][clock], seconds["bare"][clock])]  # throughput hsci / bare
        result[f"hsci img/s ({clock})"] = round(images / statistics.median(seconds["hsci"][clock]))
        result[f"bare img/s ({clock})"] = round(images / statistics.median(seconds["bare"][clock]))
        result[f"hsci/bare ({clock}) median"] = round(statistics.median(ratios), 3)
        result[f"hsci/bare ({clock}) min..max"] = f"{min(ratios):.3f}..{max(ratios):.3f}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="hsci train overrides, after " + " ".join(DEFAULTS))
    parser.add_argument("--batches", type=int, default=40, help="training batches per epoch")
    parser.add_argument("--rounds", type=int, default=10, help="alternating epochs per side (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = compare(compose(DEFAULTS + args.overrides), args.batches, args.rounds)
    print(" ".join(DEFAULTS + args.overrides))
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
