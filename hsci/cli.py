"""The `hsci` command. `train` hands its arguments to a Hydra app, the other verbs to a module of their own;
`hsci --help` answers without importing torch or Hydra, so it is instant."""

import io
import os
import re
import signal
import sys
from pathlib import Path

from hsci import Refused, UserError, best_effort, config_dir, flat, interrupt, new_folder, one_line, quote

VERBS = {
    "train": "train, validate every epoch, test the best checkpoint: hsci train [key=value ...]; "
             "sweeps: hsci train -m key=a,b; resume: hsci train resume=<run dir>|latest; a run's config again: "
             "hsci train from=<run dir>|latest [key=value ...]",
    "eval": "evaluate a run's best checkpoint: hsci eval run=<run dir>|latest [split=val]; on a labelled folder "
            "(<class>/*.png): hsci eval run=<run dir> data.root=<folder>; or hsci eval checkpoint=<file.pt> "
            "model=... data=...",
    "predict": "a run's best checkpoint on new inputs, to predictions.csv: hsci predict run=<run dir>|latest "
               "inputs=<image folder | files | glob | rows.csv> [top_k=3] [out=<file.csv>]",
    "bench": "how fast will this config train here: hsci bench [key=value ...] [steps=30 warmup=5]",
    "trust": "let eval and resume build what a run directory from elsewhere names: hsci trust run=<run dir>",
    "runs": "list runs, newest first: hsci runs [outputs ...] [status=completed] [name=<glob>] [last=N] [--json]",
    "tune": "search settings with Optuna, pruning bad trials: hsci tune [key=value ...] 'optimizer.lr="
            "tag(log,interval(1e-4,1e-1))' ... [trials=20] [pruner=median|none] [resume=<tune dir>|latest]",
    "plot": "draw a run's plots again from its records: hsci plot run=<run dir>|latest",
    "compare": "compare runs grouped by config, seeds as replicates: hsci compare <runs, sweeps or globs ...> "
               "[metric=test.acc] [baseline=N] [out=<dir>]",
    "completion": 'shell completion of verbs, groups and keys: eval "$(hsci completion bash)" in ~/.bashrc (zsh: '
                  'eval "$(hsci completion zsh)" in ~/.zshrc)',
}


def usage() -> str:
    lines = ["usage: hsci <command> [key=value ...]", "", "commands:"]
    lines += [f"  {verb:<11}{text}" for verb, text in VERBS.items()]
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
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (nohup, &)
        signal.signal(signal.SIGINT, interrupt.at_once)
    best_effort()
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    try:
        verb = args[0]
        if verb == "completion":  # reads conf/ only, at each Tab: no torch, no Hydra
            from hsci import completion

            return one_line_errors(lambda args: completion.run(args, VERBS), args[1:])
        if verb == "runs":  # reads records only: no torch, no Hydra
            from hsci.analysis import runs

            return one_line_errors(runs.run_runs, args[1:])
        if verb == "compare":
            from hsci.analysis import compare

            return one_line_errors(compare.run_compare, args[1:])
        if verb == "plot":
            from hsci.analysis import plots

            return one_line_errors(plots.run_plot, args[1:])
        rest = [_logspace(_home(arg)) for arg in args[1:]]
        if verb == "train":
            return train(rest)
        if verb == "tune":
            from hsci.jobs import tune  # each trial is an `hsci train` of its own, in this process

            return one_line_errors(lambda args: tune.run_tune(args, train), rest)
        if verb == "eval":
            from hsci.loop import evaluate  # imports torch

            return one_line_errors(evaluate.run_eval, rest)
        if verb == "predict":
            from hsci.loop import predict

            return one_line_errors(predict.run_predict, rest)
        if verb == "bench":
            from hsci.loop import bench

            return one_line_errors(bench.run_bench, rest)
        if verb == "trust":
            from hsci.record import trust

            return one_line_errors(trust.run_trust, rest)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (or a second one inside): stop, in one line
        interrupt.taken_up()
        return fail("stopped by Ctrl-C", 128 + signal.SIGINT)
    except Refused as e:  # an argument refused before anything ran
        return fail(e.message, e.code)
    except Exception:
        if interrupt.stopped_at_once():  # a Ctrl-C that Python turned into another error (in an import, say)
            return fail("stopped by Ctrl-C", 128 + signal.SIGINT)
        raise
    return fail(f"unknown command '{verb}'; commands: {', '.join(VERBS)} (see hsci --help)", 2)


# Read by hsci itself, not by Hydra.
OWN_KEYS = ("resume", "run", "checkpoint", "split", "steps", "warmup", "init_from", "from", "inputs", "top_k", "out")


def _home(arg: str) -> str:
    """`key=~/path` (or a sweep's `key=~/a,~/b`) with `~` expanded, as a shell does in an assignment: Hydra's
    grammar has no `~` in a value."""
    key, eq, value = arg.partition("=")
    items = value.split(",")
    if not eq or key in OWN_KEYS or not any(item.startswith("~") for item in items):
        return arg
    if key.startswith("-"):  # --config-dir=~/conf: a path for Hydra itself, not an override
        return f"{key}={os.path.expanduser(value)}"
    return key + "=" + ",".join(quote(os.path.expanduser(item)) if item.startswith("~") else item for item in items)


LOGSPACE = re.compile(r"^([^=]+)=logspace\(([^,()]+),([^,()]+),([^,()]+)\)$")


def _logspace(arg: str) -> str:
    """`key=logspace(a,b,n)`: n values from a to b, evenly spaced in log scale (a sweep over learning rates, weight
    decays), written out as `key=v1,v2,...` with 3 significant digits, before Hydra reads it; Hydra's own
    `range(...)` and `choice(...)` stay Hydra's."""
    m = LOGSPACE.match(arg.replace(" ", ""))
    if not m:
        return arg
    key, low, high, count = m.groups()
    try:
        low, high, n = float(low), float(high), int(count)
    except ValueError:
        n = 0
    if n < 2 or not (low > 0 and high > 0):
        raise Refused(f"{arg}: logspace(a,b,n) takes two positive numbers and a count of 2 or more, e.g. "
                      f"{key}=logspace(1e-4,1e-1,4)", 2)
    return key + "=" + ",".join(f"{low * (high / low) ** (i / (n - 1)):.3g}" for i in range(n))


def fail(msg: str, code: int = 1) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def one_line_errors(verb, args: list[str]) -> int:
    """Run a verb that makes no run directory; whatever goes wrong is one line and exit status 1."""
    from hsci import user_error

    try:
        return verb(args)
    except Exception as e:
        if interrupt.stopped_at_once():  # a Ctrl-C that Python turned into another error where it landed
            return fail("stopped by Ctrl-C", 128 + signal.SIGINT)
        cause = user_error(e)
        return fail(str(cause) if cause else f"{type(e).__name__}: {flat(e)}")


def train(args: list[str]) -> int:
    """`hsci train`: a Hydra app; `resume=` reopens a run directory instead of making a new one, `from=` makes a new
    one from a run's saved config. Started as a rank of a larger job (torchrun), rank 0 runs the app and the other
    ranks follow it (hsci/jobs/ranks.py)."""
    from hsci.record import rerun

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        refused = _refused_as_rank(args)
        if refused:
            return fail(refused, 2)
        if int(os.environ["RANK"]) != 0:
            return one_line_errors(_follow, args)
    try:
        args = [_init_from(a) for a in args]
        args, source = rerun.arguments(args)  # from=<run>: its saved config, as Hydra's primary config
    except UserError as e:
        return fail(str(e))
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("resume=")), None)
    changes: list[str] = []  # on resume: overrides applied to the run's own saved config
    if resume is not None:
        if "-m" in args or "--multirun" in args:
            return fail("resume= continues one run; it cannot be part of a sweep (-m)", 2)
        from hsci.record.owner import find_run

        try:
            run = find_run(resume, "resume", skip_owned=True)
        except UserError as e:
            return fail(str(e))
        changes = [a for a in args if "=" in a and not a.startswith(("resume=", "hydra.", "-"))]
        args = [a for a in args if a not in changes and not a.startswith("resume=")]
        args += [f"resume={quote(str(run))}", f"hydra.run.dir={quote(str(run))}", "hydra.output_subdir=null"]
    held = _HeldStderr(sys.stderr)
    task = _Task(changes, held, source and str(source))
    sys.argv = ["hsci train", *args]  # Hydra reads its arguments from sys.argv
    sys.stderr = held
    try:
        # From the start: a signal while starting up is recorded, not lost. As torchrun's rank 0, a Ctrl-C comes
        # from the terminal and again from torchrun: quitting at once is left to torchrun.
        with interrupt.caught(again_at_once=not ("RANK" in os.environ and "WORLD_SIZE" in os.environ)):
            _hydra_app(task)()
    except Refused as e:  # refused before the run began (hsci/record/owner.py): its own one line
        held.holding = False
        return fail(e.message, e.code)
    except SystemExit as e:
        from hydra.core.hydra_config import HydraConfig

        # Hydra refused the config: one line instead of its report. (Once composed, the config is Hydra's: a
        # sweep whose jobs all ran in other processes ends here with stderr still held, and its own exit code.)
        if held.holding and e.code and not HydraConfig.initialized():
            report = held.text()
            held.holding = False
            return fail(_hydra_refusal(report, args), 2)
        raise
    except Exception as e:  # Hydra raised its error instead of reporting it (under a debugger, or coverage)
        if not held.holding:
            raise
        held.holding = False
        report = f"{e}\n{e.__cause__ or ''}"  # what its report would show: the error, and what caused it
        return fail(_hydra_refusal(report, args), 2)
    finally:
        sys.stderr = held.real
        held.release()
        if os.environ.get("RANK") == "0" and "WORLD_SIZE" in os.environ:  # torchrun's rank 0, whatever ended it:
            from hsci.jobs import ranks  # the other ranks wait for its word (`follow`)

            ranks.announce(None)  # nothing, unless it announced its run
    return 0


def _init_from(arg: str) -> str:
    """`init_from=<run dir>|latest` (or a sweep's `init_from=a,b`) as the run directories they name, found before
    Hydra composes the config, so that the saved config names the run itself and `latest` is the same for every
    job of a sweep."""
    from hsci.record.owner import find_run

    key, _, value = arg.partition("=")
    if key.lstrip("+") != "init_from" or value in ("", "null"):
        return arg
    runs = []
    for name in value.split(","):
        run = find_run(name, "init_from", needs="checkpoints/best.pt")
        if not (run / "checkpoints" / "best.pt").is_file():
            raise UserError(f"init_from={name}: {run} has no checkpoints/best.pt (no epoch finished): pass a run that "
                            "completed an epoch")
        runs.append(quote(str(run)))
    return f"{key}={','.join(runs)}"


HINT = " (hsci --help lists the options; hsci train --cfg job the keys)"  # after a config Hydra refused


def _hydra_refusal(report: str, args: list[str]) -> str:
    """Hydra's refusal of the command line as one line; for a key the config lacks, hsci's own, with the nearest
    key it has."""
    from hsci.parts.keys import misnamed

    return misnamed(report, args) or one_line(report) + HINT


def _refused_as_rank(args: list[str]) -> str | None:
    """What a rank of a larger job cannot do, said the same way on every rank."""
    if "-m" in args or "--multirun" in args:
        return "a sweep (-m) cannot run under torchrun: run the sweep with hsci train -m, and each job on several " \
               "devices with trainer.devices=N (or a launcher: hydra/launcher=submitit_slurm)"
    size, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    named = any(a.startswith(("hydra.run.dir=", "resume=")) for a in args)
    if size > local and not named:
        return f"{size // local} nodes cannot agree on a time-stamped run directory: name one on a filesystem " \
               "every node shares, hydra.run.dir=/shared/runs/<name>"
    return None


def _follow(args: list[str]) -> int:
    from hsci.jobs import ranks  # imports torch

    ranks.follow()
    return 0


class _Task:
    """Hydra's task function: one training job. Launchers that run jobs in other processes (joblib, submitit)
    pickle it; it goes without the held stderr, which stays with the process that holds it."""

    def __init__(self, changes: list[str], held: "_HeldStderr | None", source: str | None = None):
        self.changes, self.held, self.source = changes, held, source  # source: the run given as from=

    def __call__(self, cfg) -> float | None:
        if self.held:
            self.held.release()  # the config composed: from here on errors are the run's own
        # A job a launcher runs in another process writes to the same console, at best effort too.
        best_effort()
        from hsci.jobs import job  # imports torch: kept out of `hsci --help`

        return job.main(cfg, self.changes, self.source)  # the monitored value, for sweepers that optimise

    def __getstate__(self) -> dict:
        return {"changes": self.changes, "held": None, "source": self.source}


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


def _new_dir(path: str) -> str:
    """Create the run directory `path`, or path_2, path_3, ... when a run started at the same moment took it."""
    try:
        return str(new_folder(Path(path)))
    except OSError as e:
        raise ValueError(f"cannot create the run directory {e.filename} ({e.strerror}): start hsci in a "
                         "writable folder or set hydra.run.dir=<writable folder>") from None


def _hydra_app(task):
    import hydra
    from omegaconf import OmegaConf

    from hsci.parts import schema
    from hsci.record.owner import job_dir

    schema.register()
    OmegaConf.register_new_resolver("hsci_new_dir", _new_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("hsci_job_dir", job_dir, replace=True)  # a sweep job's folder: record/owner.py
    OmegaConf.register_new_resolver("hsci_groups", _groups, replace=True)  # hsci train --help
    return hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(task)


def _groups() -> str:
    """The config groups one chooses an option of, as Hydra's help lists them (`group: option, ...`), from every
    config folder on the search path (hsci's and --config-dir's); the bases that options extend (data/base) are
    not among them."""
    from hydra.core.hydra_config import HydraConfig

    options: dict[str, set[str]] = {}
    sources = HydraConfig.get().runtime.config_sources if HydraConfig.initialized() else ()
    for root in [Path(s.path) for s in sources if s.schema == "file"] or [config_dir()]:
        for file in sorted(root.rglob("*.yaml")):
            group = file.parent.relative_to(root).parts
            if group and group[0] != "hydra" and "base" not in group:
                options.setdefault("/".join(group), set()).add(file.stem)
    return "\n".join(f"{group}: {', '.join(sorted(names))}" for group, names in sorted(options.items()))
