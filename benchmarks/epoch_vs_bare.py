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
    python benchmarks/epoch_vs_bare.py logger=tensorboard    # a third side: hsci with the logger

With a logger chosen, a third side runs hsci's epoch with it (its readings and the epoch's record go to the
logger too, on rank 0 as in a run; its event files in a temporary folder), alternating with the other two, and
the table adds its ratios to the bare loop and to hsci without the logger.

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
from omegaconf import OmegaConf

from hsci import report
from hsci.integrations import loggers
from hsci.loop.bench import synthetic
from hsci.loop.step import Epoch, Readings, train_epoch
from hsci.loop.train import STEPS
from hsci.parts.build import build, compose, make_model, optimizing
from hsci.parts.loaders import Timed, start_epoch

DEFAULTS = ["model=cnn", "data=mnist", "data.batch_size=128", "trainer.device=cpu", "trainer.precision=fp32"]


def compare(cfg, n_batches: int, rounds: int) -> dict:
    """CPU and wall seconds per epoch of each side, alternating, over `rounds` epochs after one of warm-up."""
    p = build(cfg, data=synthetic(cfg, None, n_batches * cfg.data.batch_size))
    optim = optimizing(cfg, p, epochs=2 * (rounds + 1), steps_per_epoch=len(p.loaders.train))  # both hsci sides
    run_dir = Path(tempfile.mkdtemp())
    logging.basicConfig(filename=run_dir / "train.log", level=logging.INFO)  # as hsci train logs, to a file
    log = loggers.opened(OmegaConf.to_container(cfg, resolve=True), run_dir, 0) if cfg.logger else None
    logged = ",".join(log.on) if log else ""  # the loggers' names

    # The bare loop: its own model of the same architecture, the same optimizer, batches made and normalised once.
    bare = make_model(cfg, p.data.input_shape, p.data.num_outputs).to(p.device)
    bare_opt = instantiate(cfg.optimizer, params=bare.parameters())
    loss_fn = instantiate(cfg.loss)
    batches = [(p.to_input(x.to(p.device)), y.to(p.device)) for x, y in p.loaders.train]

    def hsci_epoch(number: int, log=None) -> None:
        epoch = Epoch.start(number, len(p.loaders.train), p.device)
        start_epoch(p.loaders.train, epoch.number)
        timed = Timed(p.loaders.train)
        with report.epoch_progress(epoch.number, rounds + 1, 0, epoch.stop) as progress:
            readings = Readings(cfg.trainer.log_every, epoch, run_dir / STEPS, progress, log=log)
            train_epoch(p, optim=optim, batches=timed, epoch=epoch, readings=readings)
        loss = epoch.loss_sum.item()  # the epoch's record reads it
        if log:  # the epoch's record (here without validation) goes to the logger too
            record = {"epoch": number, "train_loss": loss / epoch.step, "lr": optim.opt.param_groups[0]["lr"]}
            log.epoch(record, optim.sched.last_epoch)

    def bare_epoch(number: int) -> None:
        bare.train()
        for x, y in batches:
            loss = loss_fn(bare(x), y)
            loss.backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
        loss.item()

    sides = {"hsci": hsci_epoch, "bare": bare_epoch}
    if logged:
        sides["logger"] = lambda number: hsci_epoch(number, log)
    report.console.quiet = True  # the readings' lines are made and logged to train.log, but not printed
    seconds = {name: {"cpu": [], "wall": []} for name in sides}
    for number in range(1, rounds + 2):
        for name, epoch in sides.items():
            cpu, wall = time.process_time(), time.perf_counter()  # the logger's writer thread counts in CPU time
            epoch(number)
            if number > 1:  # the first epoch of each warms up
                seconds[name]["cpu"].append(time.process_time() - cpu)
                seconds[name]["wall"].append(time.perf_counter() - wall)
    report.console.quiet = False
    if logged:  # what a reading costs the logger alone, on the CPU clock (its writer thread included)
        reading = {"step": 0, "epoch": 1, "train_loss": 0.5, "lr": 1e-3, "img_per_s": 1e3, "grad_norm": 1.0}
        cpu = time.process_time()
        for step in range(1000):
            log.reading(reading | {"step": optim.sched.last_epoch + step + 1})
        log.close()  # writes what is queued
        reading_us = (time.process_time() - cpu) * 1e3
    result = {"device": str(p.device), "precision": p.speed.precision, "threads": torch.get_num_threads(),
              "batch": cfg.data.batch_size, "input": "x".join(map(str, p.data.input_shape)),
              "batches/epoch": len(batches), "rounds": rounds,
              "readings/epoch": sum(1 for step in range(1, len(batches) + 1)
                                    if step % cfg.trainer.log_every == 0 or step == len(batches))}
    images = len(batches) * cfg.data.batch_size
    if logged:
        result["logger"] = logged
        result["logger CPU us/reading"] = round(reading_us)
        result["hsci CPU ms/step"] = round(1e3 * statistics.median(seconds["hsci"]["cpu"]) / len(batches), 1)
    pairs = [("hsci", "bare")] + ([("logger", "bare"), ("logger", "hsci")] if logged else [])
    for clock in ("cpu", "wall"):
        for name in sides:
            result[f"{name} img/s ({clock})"] = round(images / statistics.median(seconds[name][clock]))
        for side, against in pairs:  # throughput side / against, round by round
            ratios = [a / s for s, a in zip(seconds[side][clock], seconds[against][clock])]
            result[f"{side}/{against} ({clock}) median"] = round(statistics.median(ratios), 3)
            result[f"{side}/{against} ({clock}) min..max"] = f"{min(ratios):.3f}..{max(ratios):.3f}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="hsci train overrides, after " + " ".join(DEFAULTS))
    parser.add_argument("--batches", type=int, default=40, help="training batches per epoch")
    parser.add_argument("--rounds", type=int, default=10, help="alternating epochs per side (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose(DEFAULTS + args.overrides)
    if cfg.logger and cfg.logger.mlflow:
        parser.error("logger=mlflow is not measured here (it logs once an epoch, after validation): use "
                     "logger=tensorboard")
    result = compare(cfg, args.batches, args.rounds)
    print(" ".join(DEFAULTS + args.overrides))
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
