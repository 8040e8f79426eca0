"""Shell completion: how long a Tab waits for `hsci completion`, each answer in a fresh process, as a shell asks.

    python benchmarks/completion.py [--rounds 10]

Runs the `hsci` console script next to this Python (or `python -m hsci` where there is none) with this tree's
source first on the path, in a folder of its own, `rounds` times each, alternating: the verbs, a group's options,
the keys of a composed config (vit's, picked on the line), the same through bash's entry (a line and
COMP_WORDBREAKS), a `--config-dir` of the user's; and for scale, `python -c pass`, `hsci --help`, and Hydra's own
composition of the same config in a fresh process (what the completion does instead: conf/ read as YAML).
Prints the median (and best) wall and CPU seconds of each whole process; the issue's target is under 0.5 s.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("hsci")
HSCI = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "hsci"]
HYDRA = """
from hydra import compose, initialize_config_dir
from hsci import config_dir
from hsci.parts import schema

schema.register()
with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
    compose("config", overrides=["model=vit"])
"""


def cases(cwd: Path) -> dict[str, list[str]]:
    mine = cwd / "my_conf" / "data"
    mine.mkdir(parents=True)
    (mine / "my_data.yaml").write_text("defaults:\n  - /data/base/images@_here_\n  - _self_\n_target_: hsci.data.fake\n")
    zsh = [*HSCI, "completion", "--zsh", "--"]
    return {"python -c pass": [sys.executable, "-c", "pass"],
            "hsci --help": [*HSCI, "--help"],
            "hsci <Tab>": [*zsh, ""],
            "hsci train data=<Tab>": [*zsh, "train", "data="],
            "hsci train model=vit model.<Tab>": [*zsh, "train", "model=vit", "model."],
            "bash: hsci train trainer.ep<Tab>": [*HSCI, "completion", "--bash", " \t\n\"'><=;|&(:",
                                                 "hsci train trainer.ep"],
            "--config-dir my_conf data=my<Tab>": [*zsh, "train", "--config-dir", "my_conf", "data=my"],
            "Hydra's compose, model=vit": [sys.executable, "-c", HYDRA]}


def whole(command: list[str], cwd: Path) -> tuple[float, float]:
    """(wall s, CPU s) of a whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, capture_output=True, check=True,
                   env={**os.environ, "PYTHONPATH": str(HERE)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        commands = cases(cwd)
        for _ in range(args.rounds):
            for name, command in commands.items():
                times.setdefault(name, []).append(whole(command, cwd))
    print(f"{args.rounds} rounds, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, {' '.join(HSCI[-1:])}; "
          "whole process, seconds: median (best)")
    print(f"{'':<36}{'wall':>14}{'CPU':>15}")
    for name, values in times.items():
        cells = [f"{statistics.median(v[i] for v in values):7.3f} ({min(v[i] for v in values):.3f})" for i in (0, 1)]
        print(f"{name:<36}" + "".join(f"{cell:>15}" for cell in cells))


if __name__ == "__main__":
    main()
