"""Start-up: what hsci costs before its first step, against `python -c "import torch"`, on this machine.

    python benchmarks/startup.py [--rounds 5] [--before DIR]

In fresh processes, alternating, `rounds` of each; for each the process's CPU time (user + sys, from its start:
steady on a shared machine) and wall time:
- `import torch`: the floor of any PyTorch program (issue 14 sets its target against it);
- `import torch` and an optimizer made, which imports torch's compiler (torch._dynamo: torch.optim wraps
  add_param_group in torch._disable_dynamo, whose first call imports it): the floor of any program that trains;
- `hsci train` (the default run: digits + cnn) up to its first step, where a probe stops it: its wall time is
  `startup_s` as summary.json records it (from hsci's first import);
- refusals before any work, `hsci train optimizer.lrr=0.1` (a typo) and `hsci train trainer.epochs=0` (a bad
  value), and `hsci --help`: the whole process.
With `--before DIR` (a checkout of an earlier hsci, e.g. made by `git worktree add DIR <commit>`), the hsci commands
run from DIR's source too, alternating with this tree's. Prints the medians (and the best) and what the default run
adds to each floor.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
FLOOR = "import time; start = time.time(); import torch; {}print(time.process_time(), time.time() - start)"
FLOORS = {"import torch": FLOOR.format(""),
          "import torch, make an optimizer": FLOOR.format("torch.optim.Adam([torch.zeros(1, requires_grad=True)]); ")}
FIRST_STEP = """
import os, sys, time
import hsci

try:
    import hsci.loop.train as loop
except ImportError:  # an hsci from before its modules moved into packages
    import hsci.train as loop


def first_step(*args, **kwargs):  # where the loop would take its first step
    print(time.process_time(), time.time() - hsci.STARTED, flush=True)
    os._exit(0)


loop.train_epoch = first_step
from hsci.cli import main

main(["train"])
"""


def reported(code: str, cwd: str, source: Path | None = None) -> tuple[float, float]:
    """(CPU s, wall s) that a fresh process running `code` prints last."""
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None
    out = subprocess.run([sys.executable, "-c", code], cwd=tempfile.mkdtemp(dir=cwd), capture_output=True,
                         text=True, check=True, env=env).stdout
    cpu, wall = map(float, out.splitlines()[-1].split())
    return cpu, wall


def whole(command: list[str], cwd: str, source: Path) -> tuple[float, float]:
    """(CPU s, wall s) of a whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = os.times().elapsed
    subprocess.run(command, cwd=cwd, capture_output=True, check=False, env={**os.environ, "PYTHONPATH": str(source)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, os.times().elapsed - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", type=Path, help="the source tree of an earlier hsci to compare with")
    args = parser.parse_args()
    sources = {"": HERE} | ({"before: ": args.before.resolve()} if args.before else {})
    times: dict[str, list[tuple[float, float]]] = {}
    hsci = [sys.executable, "-m", "hsci"]
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(args.rounds):
            for name, code in FLOORS.items():
                times.setdefault(name, []).append(reported(code, cwd))
            for label, source in sources.items():
                times.setdefault(f"{label}hsci train, to its first step", []).append(reported(FIRST_STEP, cwd, source))
                for command in (["train", "optimizer.lrr=0.1"], ["train", "trainer.epochs=0"], ["--help"]):
                    times.setdefault(f"{label}hsci {' '.join(command)}", []).append(whole([*hsci, *command], cwd,
                                                                                          source))
    median = {name: tuple(statistics.median(v[i] for v in values) for i in (0, 1)) for name, values in times.items()}
    print(f"{args.rounds} rounds, {os.cpu_count()} CPUs, python {sys.version.split()[0]}; seconds, median (best)")
    print(f"{'':<42}{'CPU':>14}{'wall':>16}")
    for name, values in times.items():
        best = [min(v[i] for v in values) for i in (0, 1)]
        print(f"{name:<42}" + "".join(f"{median[name][i]:8.2f} ({best[i]:.2f})" for i in (0, 1)))
    for label in sources:
        run = median[f"{label}hsci train, to its first step"]
        for floor in FLOORS:
            print(f"{label}first step - {floor:<{29 - len(label)}}"
                  + "".join(f"{run[i] - median[floor][i]:8.2f}       " for i in (0, 1)))


if __name__ == "__main__":
    main()
