"""`hsci tune [overrides] SPACE... [trials=20] [pruner=median|none] [resume=<tune dir>|latest]`: a search of a
space of settings that stops hopeless trials early, driven by Optuna.

The space is written as Hydra's Optuna sweeper reads it, through Hydra's own override parser:
`'optimizer.lr=tag(log,interval(1e-4,1e-1))'`, `'model.dropout=interval(0,0.5)'`, `'optimizer=choice(sgd,adamw)'`,
`'model.hidden=range(64,512,64)'` (`tag(int,interval(a,b))` for whole numbers). Each trial is an ordinary run
of `hsci train` in the tune's folder, in this process; after each epoch the loop reports the monitored
validation value, and the pruner may stop the trial there (recorded as `pruned`). The direction follows
`trainer.monitor`: accuracy is maximised, a loss minimised.

A tune lives in one folder, outputs/tune/<date>/<time>_<name>/: `study.db` (the Optuna study, SQLite), `tune.json`
(its space and settings), a run directory per trial (`trial_<number>`), and `tune_summary.json`. `trials=N` is
the number of finished trials the study should hold: `hsci tune resume=<tune dir> trials=N` runs only the missing
ones. Several `hsci tune resume=<dir>` processes may share a study (Optuna gives each its own trials).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable

from hsci import UserError, interrupt, new_folder, quote, report

OPTIONS = ("trials", "pruner", "resume")
USAGE = ("usage: hsci tune [key=value ...] 'key=interval(a,b)' 'key=choice(a,b)' ... [trials=20] [pruner=median|none] "
         "[resume=<tune dir>|latest]")
STUDY = "hsci"
STARTUP_TRIALS, WARMUP_EPOCHS = 3, 1  # the median pruner waits for 3 finished trials, and never prunes epoch 1


def run_tune(args: list[str], train: Callable[[list[str]], int]) -> int:
    """Run the tune that `args` ask for; each trial through `train` (`hsci train`'s own entry, from the door)."""
    options = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in OPTIONS}
    rest = [a for a in args if a.split("=", 1)[0] not in OPTIONS]
    trials = _count(options.get("trials", "20"))
    pruner = options.get("pruner", "median")
    if pruner not in ("median", "none"):
        raise UserError(f"pruner={pruner}: give median (stop trials worse than the median so far) or none")
    if "resume" in options:
        tune_dir = _find_tune(options["resume"])
        if rest:
            raise UserError(f"resume={options['resume']}: a tune keeps the space and settings it started with "
                            f"({', '.join(rest)} given): start a new tune to change them")
        plan = json.loads((tune_dir / "tune.json").read_text())
    else:
        plan = _plan(rest, pruner)
        tune_dir = new_folder(Path("outputs", "tune", time.strftime("%Y-%m-%d"),
                                   f"{time.strftime('%H-%M-%S')}_{plan['name']}"))
        (tune_dir / "tune.json").write_text(json.dumps(plan, indent=1) + "\n")
    return search(tune_dir, plan, trials, pruner, train)


def _count(text: str) -> int:
    if not text.isdigit():
        raise UserError(f"trials={text}: give the number of finished trials the study should hold, e.g. trials=20")
    return int(text)


def _plan(args: list[str], pruner: str) -> dict:
    """The tune's space and settings as tune.json keeps them, checked: the search space, the fixed overrides (a
    config that composes), the monitored value and its direction."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from hsci.parts.build import compose

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as e:
        raise UserError(f"{e}; {USAGE}") from e
    space = [o.input_line for o in parsed if o.is_sweep_override()]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    if not space:
        raise UserError(f"hsci tune: no search space given; {USAGE}")
    probe = []  # each swept key with a value of its space: a typo in a key is refused here, not at the first trial
    for o in parsed:
        if o.is_sweep_override():
            first = _distribution(o.key_or_group, o.value())
            value = first.choices[0] if hasattr(first, "choices") else first.low
            probe.append(f"{o.key_or_group}={_value(value)}")
    compose(fixed + probe)
    cfg = compose(fixed)
    if cfg.trainer.devices != 1:
        raise UserError(f"trainer.devices={cfg.trainer.devices}: hsci tune runs each trial in one process; run "
                        "several `hsci tune resume=<tune dir>` processes to use more devices")
    regression = cfg.loss._target_ == "torch.nn.MSELoss"
    monitor = ("val_loss" if regression else "val_acc") if cfg.trainer.monitor == "auto" else cfg.trainer.monitor
    from hsci.record.comparable import lower_is_better

    return {"space": space, "fixed": fixed, "monitor": monitor,
            "direction": "minimize" if lower_is_better(monitor) else "maximize", "seed": int(cfg.seed),
            "name": str(cfg.name), "pruner": pruner}


def _distribution(key: str, sweep):
    """The Optuna distribution of a swept override, as Hydra's Optuna sweeper maps them."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(sweep, ChoiceSweep) and not sweep.shuffle:
        return CategoricalDistribution(sweep.list)
    if isinstance(sweep, IntervalSweep):
        log = "log" in sweep.tags
        if "int" in sweep.tags:
            return IntDistribution(int(sweep.start), int(sweep.end), log=log)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    if isinstance(sweep, RangeSweep) and not sweep.shuffle:
        values = list(_range(sweep))
        if not values:
            raise UserError(f"{key}=range({sweep.start},{sweep.stop},{sweep.step}) holds no value")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=sweep.step)
        return FloatDistribution(values[0], values[-1], step=sweep.step)
    raise UserError(f"{key}: hsci tune searches interval(...), choice(...) and range(...), not {sweep}")


def _range(sweep):
    value = sweep.start
    while value < sweep.stop:
        yield value
        value += sweep.step


def _find_tune(name: str) -> Path:
    if name == "latest":
        found = sorted(Path("outputs", "tune").glob("*/*/tune.json"))
        if not found:
            raise UserError("resume=latest: no tune under outputs/tune here; give the tune's folder")
        return found[-1].parent
    folder = Path(name).expanduser()
    if not (folder / "tune.json").is_file() or not (folder / "study.db").is_file():
        raise UserError(f"resume={name}: {folder} is not a tune's folder (no tune.json and study.db)")
    return folder


def study_of(tune_dir: Path, plan: dict, seed_offset: int = 0):
    """The tune's Optuna study in its study.db, made when absent; the sampler seeded from the config's seed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tune_dir.resolve() / 'study.db'}",
                                         engine_kwargs={"connect_args": {"timeout": 60}})
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=WARMUP_EPOCHS + 1)
              if plan["pruner"] == "median" else optuna.pruners.NopPruner())
    return optuna.create_study(storage=storage, study_name=STUDY, direction=plan["direction"], load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=plan["seed"] + seed_offset), pruner=pruner)


def finished(study) -> list:
    """The trials that count towards `trials=`: completed, pruned or failed, not those a stop signal ended."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False) if t.state in done and not t.user_attrs.get("interrupted")]


def search(tune_dir: Path, plan: dict, trials: int, pruner: str, train: Callable[[list[str]], int]) -> int:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.trial import TrialState

    from hsci.loop import train as loop

    plan = plan | {"pruner": pruner}
    study = study_of(tune_dir, plan)
    study = study_of(tune_dir, plan, seed_offset=len(study.trials))  # a resumed tune draws on, not again
    space = {o.key_or_group: _distribution(o.key_or_group, o.value())
             for o in OverridesParser.create().parse_overrides(plan["space"])}
    report.say(f"tune: {tune_dir}, {len(finished(study))} of {trials} trials finished, {plan['monitor']} "
               f"({plan['direction']}), pruner {pruner}")
    code = 0
    while len(finished(study)) < trials and not interrupt.requested():
        trial = study.ask(space)
        run_dir = tune_dir / f"trial_{trial.number}"
        params = [f"{key}={_value(value)}" for key, value in trial.params.items()]
        report.say(f"trial {trial.number}: {' '.join(params)}")
        loop.judge = _judge(trial)
        try:
            code = train([*plan["fixed"], *params, f"hydra.run.dir={quote(str(run_dir.resolve()))}"])
        except SystemExit as e:  # a run that did not complete exits non-zero
            code = e.code if isinstance(e.code, int) else 1
        finally:
            loop.judge = None
            _fresh_hydra()
        summary = _summary(run_dir)
        status = summary.get("status", "failed")
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("status", status)
        if status == "completed":
            study.tell(trial, summary["best_val"][plan["monitor"]])
        elif status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            if status == "interrupted":
                trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
        if status == "interrupted" or code >= 128:
            report.say(f"tune stopped; continue it with: hsci tune resume={tune_dir} trials={trials}")
            break
    out = summarise(tune_dir, study, plan)
    if code >= 128:
        return code
    if trials and out["finished"] and "best" not in out:  # every trial failed or was pruned: nothing found
        report.error(f"no trial of {tune_dir} completed: see their train.log files")
        return 1
    return 0


def _value(value) -> str:
    return quote(value) if isinstance(value, str) and not value.replace("_", "").isalnum() else str(value)


def _judge(trial) -> Callable[[int, float], bool]:
    """What the loop asks after each epoch: report the monitored value to the trial; prune it here?"""

    def judge(epoch: int, value: float) -> bool:
        trial.report(value, epoch)
        return trial.should_prune()

    return judge


def _fresh_hydra() -> None:
    """Hydra's global state as before a run, for the next trial's."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


def _summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {"status": "failed", "error": "refused before it started (no summary.json)"}


def summarise(tune_dir: Path, study, plan: dict) -> dict:
    """The trials best first (as a sweep's jobs), the best overrides as a `hsci train` line, Optuna's parameter
    importances and its plots of the search; printed and written to tune_summary.json."""
    from optuna.trial import TrialState

    from hsci.jobs.sweep import job_row, rank

    trials = study.get_trials(deepcopy=False)
    rows = []
    for t in trials:
        run_dir = Path(t.user_attrs.get("run_dir", tune_dir / f"trial_{t.number}"))
        row = job_row(run_dir) if run_dir.is_dir() else {"job": run_dir.name, "overrides": "", "status": "failed"}
        row |= {"job": run_dir.name, "overrides": " ".join(f"{k}={_value(v)}" for k, v in t.params.items()),
                "trial": t.state.name.lower()}
        rows.append(row)
    rows.sort(key=rank)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    out = {"study": str(tune_dir / "study.db"), "monitor": plan["monitor"], "direction": plan["direction"],
           "trials": rows, "finished": len(finished(study)),
           "pruned": sum(t.state == TrialState.PRUNED for t in trials)}
    if complete:
        best = study.best_trial
        line = " ".join(["hsci train", *plan["fixed"], *(f"{k}={_value(v)}" for k, v in best.params.items())])
        out |= {"best": {"trial": best.number, "value": best.value, "params": best.params, "command": line}}
        out["importances"] = _importances(study)
        out["plots"] = _plots(study, tune_dir)
    (tune_dir / "tune_summary.json").write_text(json.dumps(out, indent=1) + "\n")
    report.sweep_table(rows, str(tune_dir / "tune_summary.json"), what="tune")
    report.console.print(f"{out['pruned']} pruned, {len(complete)} completed of {len(trials)} trials", markup=False)
    if "best" in out:
        report.console.print(f"best: trial {out['best']['trial']}, {plan['monitor']} {out['best']['value']:.4f}; "
                             f"train it: {out['best']['command']}", markup=False, soft_wrap=True)
        if out["importances"]:
            report.console.print("parameter importances (Optuna): " + ", ".join(
                f"{k} {v:.2f}" for k, v in out["importances"].items()), markup=False, soft_wrap=True)
    return out


def _importances(study) -> dict[str, float]:
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna warns where the trials are too few to tell importances apart
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # too few completed trials, or one parameter that never varied
        return {}


def _plots(study, tune_dir: Path) -> list[str]:
    """Optuna's own plots of the search, drawn headless: the monitored value against trial number
    (`history.png`) and against each parameter (`slice.png`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    drawn = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        for name, draw in (("history.png", ovm.plot_optimization_history), ("slice.png", ovm.plot_slice)):
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as e:
                report.log.warning("tune plot %s not drawn: %s", name, e)
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.savefig(tune_dir / name, dpi=100, bbox_inches="tight")
            plt.close(figure)
            drawn.append(str(tune_dir / name))
    return drawn
