"""N CPU processes (gloo ranks) against one, end to end: `hsci train trainer.device=cpu trainer.devices=N` against
`trainer.devices=1` on the same config, run after run, which of the two goes first swapping every round.

Each run's training speed comes from its own metrics.jsonl (`epoch_s`, `train_img_per_s`; the median over its
epochs after the first, which warms up), its wall time and CPU time (the run's processes together) from here.
Prints a line per run and a table of medians last. On a machine of few cores the ranks share them (each rank
takes cores / N threads), so this records what DDP costs and gains here; it sets no target.

    python benchmarks/ranks_vs_one.py                         # digits, cnn, dropout off, 5 epochs, 3 rounds
    python benchmarks/ranks_vs_one.py data=fake data.train_size=8192 'data.image_shape=[1,28,28]' \\
        'data.mean=[0.5]' 'data.std=[0.25]' data.batch_size=128 trainer.epochs=3

Overrides are `hsci train`'s, after the defaults below.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULTS = ["model.dropout=0", "model.conv_dropout=0", "trainer.epochs=5"]


def run(python: str, devices: int, overrides: list[str], run_dir: Path) -> dict:
    """One `hsci train` run: its wall and CPU seconds, and the median epoch_s and train_img_per_s of its epochs
    after the first."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run's processes, waited for, counted when it ends
    start = time.perf_counter()
    done = subprocess.run([python, "-m", "hsci", "train", "trainer.device=cpu", f"trainer.devices={devices}",
                           *overrides, f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"hsci train trainer.devices={devices} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "epochs": len(records),
            "epoch_s": statistics.median(r["epoch_s"] for r in timed),
            "img_per_s": statistics.median(r["train_img_per_s"] for r in timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="hsci train overrides, after " + " ".join(DEFAULTS))
    parser.add_argument("--devices", type=int, default=2, help="CPU processes of the DDP side")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating (median reported)")
    parser.add_argument("--python", default=sys.executable, help="the python that runs hsci")
    args = parser.parse_args()
    overrides = DEFAULTS + args.overrides
    sides = (1, args.devices)
    runs = {side: [] for side in sides}
    work = Path(tempfile.mkdtemp(prefix="ranks_vs_one."))
    print(" ".join(overrides))
    for number in range(1, args.rounds + 1):
        for side in sides if number % 2 else sides[::-1]:  # who goes first swaps every round
            r = run(args.python, side, overrides, work / f"devices{side}_round{number}")
            runs[side].append(r)
            print(f"round {number}  devices={side}  {r['epochs']} epochs  epoch_s {r['epoch_s']:.3f}  "
                  f"train_img_per_s {r['img_per_s']:,.0f}  wall {r['wall_s']:.1f} s  cpu {r['cpu_s']:.1f} s  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)  # a run's own processes show as about 2

    def cell(side: int, key: str, digits: int) -> str:
        values = [r[key] for r in runs[side]]
        return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}..{max(values):,.{digits}f})"

    print(f"\nruns in {work}")
    print(f"median (min..max) over {args.rounds} runs each; epoch figures: median over a run's epochs after the "
          "first")
    print("| processes | epoch_s | train_img_per_s | wall s | CPU s (all processes) |")
    print("| --- | --- | --- | --- | --- |")
    for side in sides:
        print(f"| {side} | {cell(side, 'epoch_s', 3)} | {cell(side, 'img_per_s', 0)} | {cell(side, 'wall_s', 1)} | "
              f"{cell(side, 'cpu_s', 1)} |")
    one, many = sides
    for key, name in (("img_per_s", "train_img_per_s"), ("wall_s", "wall time")):
        ratios = [b[key] / a[key] for a, b in zip(runs[one], runs[many])]  # round by round
        print(f"{many} processes / 1, {name}: median {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}..{max(ratios):.3f})")


if __name__ == "__main__":
    main()
