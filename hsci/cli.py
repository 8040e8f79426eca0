"""The `hsci` command. `train` hands its arguments to a Hydra app, `eval` to hsci/evaluate.py; `hsci --help`
answers without importing torch or Hydra, so it is instant."""

import io
import itertools
import sys
from pathlib import Path

from hsci import interrupt

VERBS = {
    "train": "train, validate every epoch, test the best checkpoint: hsci train [key=value ...]; "
             "sweeps: hsci train -m key=a,b; resume: hsci train resume=<run dir>|latest",
    "eval": "evaluate a run's best checkpoint: hsci eval run=<run dir>|latest [split=val]; "
            "or hsci eval checkpoint=<file.pt> model=... data=...",
    "bench": "how fast will this config train here: hsci bench [key=value ...] [steps=30 warmup=5]",
}


def config_dir() -> Path:
    """The shipped configs: inside the installed package, or the repository's top-level conf/."""
    here = Path(__file__).resolve().parent
    return next(d for d in (here / "conf", here.parent / "conf") if d.is_dir())


def usage() -> str:
    lines = ["usage: hsci <command> [key=value ...]", "", "commands:"]
    lines += [f"  {verb:<8}{text}" for verb, text in VERBS.items()]
    lines += ["", "config groups (choose one option each: hsci train data=cifar10 model=resnet18):"]
    for group in sorted(d for d in config_dir().iterdir() if d.is_dir()):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name:<11}{', '.join(options)}")
    lines += ["", "any value can be overridden: hsci train optimizer.lr=0.01 trainer.epochs=5",
              "hsci train --help shows Hydra's help; hsci train --cfg job prints the composed config",
              "your own configs: hsci train --config-dir my_conf data=my_data"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = args[0], args[1:]
    if verb == "train":
        return train(rest)
    if verb == "eval":
        from hsci import evaluate  # imports torch

        return one_line_errors(evaluate.run_eval, rest)
    if verb == "bench":
        from hsci import bench

        return one_line_errors(bench.run_bench, rest)
    return fail(f"unknown command '{verb}'; commands: {', '.join(VERBS)} (see hsci --help)", 2)


def fail(msg: str, code: int = 1) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def one_line_errors(verb, args: list[str]) -> int:
    """Run a verb that makes no run directory; whatever goes wrong is one line and exit status 1."""
    from hsci import user_error

    try:
        return verb(args)
    except Exception as e:
        cause = user_error(e)
        return fail(str(cause) if cause else f"{type(e).__name__}: {e}")


def train(args: list[str]) -> int:
    """`hsci train`: a Hydra app; `resume=` reopens a run directory instead of making a new one."""
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("resume=")), None)
    changes: list[str] = []  # on resume: overrides applied to the run's own saved config
    if resume is not None:
        if "-m" in args or "--multirun" in args:
            return fail("resume= continues one run; it cannot be part of a sweep (-m)", 2)
        run = _run_dir(resume)
        if isinstance(run, str):
            return fail(run)
        changes = [a for a in args if "=" in a and not a.startswith(("resume=", "hydra.", "-"))]
        args = [a for a in args if a not in changes and not a.startswith("resume=")]
        args += [f"resume={_quote(str(run))}", f"hydra.run.dir={_quote(str(run))}", "hydra.output_subdir=null"]
    fixed = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")), None)
    if resume is None and fixed and (Path(fixed.strip("'\"")) / "summary.json").exists():
        return fail(f"hydra.run.dir={fixed} already holds a run: continue it with resume={fixed}, or choose a new "
                    "directory", 2)
    held = _HeldStderr(sys.stderr)

    def task(cfg) -> None:
        held.release()  # the config composed: from here on errors are the run's own
        from hsci import train as training  # imports torch: kept out of `hsci --help`

        training.main(cfg, changes)

    sys.argv = ["hsci train", *args]  # Hydra reads its arguments from sys.argv
    sys.stderr = held
    try:
        with interrupt.caught():  # from the start: a signal while starting up is recorded, not lost
            _hydra_app(task)()
    except SystemExit as e:
        if held.holding and e.code:  # Hydra refused the config: one line instead of its report
            report = held.text()
            held.holding = False
            return fail(one_line(report) + " (hsci --help lists the options; hsci train --cfg job the keys)", 2)
        raise
    except Exception as e:  # Hydra could not even format its report (an error while resolving hydra.run.dir)
        if not held.holding:
            raise
        held.holding = False
        return fail(one_line(str(e)), 2)
    finally:
        sys.stderr = held.real
        held.release()
    return 0


def latest_run(needs: str) -> Path | None:
    """The most recently started (or resumed) run under ./outputs that holds `needs`, a path inside it."""
    runs = [p.parent.parent for p in Path("outputs").glob("**/.hydra/config.yaml")
            if (p.parent.parent / needs).exists()]
    return max(runs, key=lambda run: (run / ".hydra" / "config.yaml").stat().st_mtime).resolve() if runs else None


def _run_dir(resume: str) -> Path | str:
    """The run directory `resume=` names, or a one-line reason why there is none."""
    if resume == "latest":
        return latest_run(".hydra") or f"resume=latest: no run under {Path('outputs').resolve()}; pass resume=<run dir>"
    run = Path(resume).expanduser().resolve()
    if not (run / ".hydra" / "config.yaml").is_file():
        return (f"resume={resume}: {run} is not a run directory (no .hydra/config.yaml); pass a folder under "
                "outputs/ or resume=latest")
    return run


def _quote(value: str) -> str:
    """A value quoted for Hydra's override grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class _HeldStderr(io.TextIOBase):
    """Holds what is written to stderr until released, so a config error can be shown as one line."""

    def __init__(self, real):
        self.real, self.held, self.holding = real, [], True

    def write(self, s: str) -> int:
        if self.holding:
            self.held.append(s)
        else:
            self.real.write(s)
        return len(s)

    def flush(self) -> None:
        self.real.flush()

    def text(self) -> str:
        return "".join(self.held)

    def release(self) -> None:
        if self.holding:
            self.holding = False
            self.real.write(self.text())


def one_line(report: str) -> str:
    """Hydra's multi-line report of a config error as one line: the problem, then its details."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # an error outside composition: its last line
        lines = [line for line in lines if not line.startswith("Set the environment")][-1:]
    noise = ("full_key:", "object_type=", "reference_type=", "Set the environment variable HYDRA_FULL_ERROR",
             "To append to your config use", "provider=", "Config search path:")
    out, options = [], []
    for line in lines:
        if line.startswith(noise):
            continue
        if out and out[-1].startswith("Available options in"):
            options.append(line)
            continue
        out.append(line)
    if options:
        out[-1] += " " + ", ".join(options)
    return "; ".join(line.rstrip(".:") if i < len(out) - 1 else line for i, line in enumerate(out))


def _new_dir(path: str) -> str:
    """Create the run directory `path`, or path_2, path_3, ... when a run started at the same moment took it."""
    base = Path(path)
    for n in itertools.count(1):
        candidate = base if n == 1 else base.with_name(f"{base.name}_{n}")
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            continue
        except OSError as e:
            raise ValueError(f"cannot create the run directory {candidate} ({e.strerror}): start hsci in a "
                             "writable folder or set hydra.run.dir=<writable folder>") from None


def _hydra_app(task):
    import hydra
    from omegaconf import OmegaConf

    from hsci import schema

    schema.register()
    OmegaConf.register_new_resolver("hsci_new_dir", _new_dir, use_cache=True, replace=True)
    return hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(task)
