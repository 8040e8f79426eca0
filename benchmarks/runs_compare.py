"""`hsci runs` and `hsci compare` over many run directories: they read summaries (and test predictions), never
checkpoints, so a thousand runs take seconds at most.

    python benchmarks/runs_compare.py [--runs 1000] [--groups 10] [--rounds 3]

Trains one short run (digits, one epoch), copies its record (summary.json, test_predictions.npz, config) into
`runs` run directories under outputs/ of a temporary folder, `groups` configs (optimizer.lr) of runs / groups
seeds each, with their test accuracies drawn around a group's mean; then times, in fresh processes, `hsci runs`
and `hsci compare outputs` (the whole process: wall and CPU seconds), `import scipy.stats` alone (which
`hsci compare` needs), and the comparison's own work in a process that has imported what it uses (finding and
reading the runs, the statistics, compare.md, .json and .png); and prints the best and the median.
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
WORK = """
import os, time
from pathlib import Path
import matplotlib.figure, scipy.stats
from hsci.analysis import compare, found
start, cpu = time.time(), time.process_time()
runs, _ = found.find(["outputs"])
compare.write(compare.compare(runs), Path("cmp"))
print(time.time() - start, time.process_time() - cpu)
"""


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = os.times().elapsed
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return os.times().elapsed - start, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def make_runs(cwd: Path, runs: int, groups: int) -> None:
    hsci = [sys.executable, "-m", "hsci"]
    subprocess.run([*hsci, "train", "experiment=smoke", "trainer.epochs=1"], cwd=cwd, check=True, capture_output=True)
    [made] = (cwd / "outputs").glob("*/*")
    summary = json.loads((made / "summary.json").read_text())
    rng = random.Random(0)
    for i in range(runs):
        group, seed = i % groups, i // groups
        run = cwd / "outputs" / "2026-01-01" / f"{i:05d}_digits_cnn"
        shutil.copytree(made, run, ignore=shutil.ignore_patterns("checkpoints"))
        lr = 10 ** (-4 + 3 * group / groups)
        s = json.loads(json.dumps(summary))
        s |= {"seed": seed, "overrides": [f"optimizer.lr={lr:.2e}", f"seed={seed}"], "run_dir": str(run),
              "started": f"2026-01-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}+0000"}
        s["comparable"]["config"]["optimizer.lr"] = lr
        s["test"]["acc"] = min(1.0, max(0.0, rng.gauss(0.8 + 0.01 * group, 0.02)))
        (run / "summary.json").write_text(json.dumps(s))
    shutil.rmtree(made)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        make_runs(cwd, args.runs, args.groups)
        hsci = [sys.executable, "-m", "hsci"]
        commands = {"hsci runs": [*hsci, "runs"], "hsci runs --json": [*hsci, "runs", "--json"],
                    "hsci compare outputs": [*hsci, "compare", "outputs", "out=cmp"]}
        commands["import scipy.stats"] = [sys.executable, "-c", "import scipy.stats"]
        times = {name: [] for name in [*commands, "compare's work, imported"]}
        for _ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(timed(command, cwd))
            out = subprocess.run([sys.executable, "-c", WORK], cwd=cwd, capture_output=True, text=True, check=True)
            times["compare's work, imported"].append(tuple(map(float, out.stdout.split())))
    print(f"{args.runs} runs in {args.groups} groups, {args.rounds} rounds, {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}; whole process, seconds: best (median)")
    print(f"{'':<24}{'wall':>16}{'CPU':>16}")
    for name, values in times.items():
        cells = [f"{min(v[i] for v in values):8.2f} ({statistics.median(v[i] for v in values):.2f})" for i in (0, 1)]
        print(f"{name:<24}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
