"""`hsci runs`: the runs under outputs/ (or the folders given), newest first, one line each: when, name, status,
epochs, the best validation value, the test value, how long, the overrides that differ between the runs shown,
the run's tags and the sweep a job belongs to. Filters (`status=completed`, `name=cifar*`, `tag=baseline`,
`sweep=...`, `last=20`) narrow the list; `--json` prints the same as JSON for a program."""

from __future__ import annotations

import json
from fnmatch import fnmatch

from hsci import UserError
from hsci.analysis.found import Run, arguments, assignments, find

FILTERS = ("status", "name", "tag", "sweep", "last")
USAGE = ("usage: hsci runs [folders, run dirs or globs ...] [status=completed] [name=<glob>] [tag=<glob>] "
         "[sweep=<glob>] [last=N] [--json]")


def run_runs(args: list[str]) -> int:
    from hsci import report

    as_json = "--json" in args
    options, places, unknown = arguments([a for a in args if a != "--json"], FILTERS)
    if unknown:
        raise UserError(f"hsci runs: {unknown[0]} is not an option; {USAGE}")
    if "last" in options and not options["last"].isdigit():
        raise UserError(f"hsci runs: last={options['last']} is not a number of runs; {USAGE}")
    if not places:
        places = ["outputs"]
        from pathlib import Path

        if not Path("outputs").is_dir():
            raise UserError("hsci runs: no outputs/ folder here; run hsci runs where you train, or name the folders")
    runs, unreadable = find(places)
    shown = newest_first([run for run in runs if wanted(run, options)])
    if "last" in options:
        shown = shown[:int(options["last"])]
    rows = [row(run) for run in shown]
    differ = differing(shown)
    for r, run in zip(rows, shown):
        r["overrides"] = " ".join(f"{k}={v}" for k, v in overrides(run).items() if k in differ)
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    report.runs_table(rows, f"{len(shown)} of {len(runs)} runs" + (f"; {unreadable} without a readable summary.json"
                                                                     if unreadable else ""))
    return 0


def wanted(run: Run, options: dict[str, str]) -> bool:
    return (fnmatch(run.status, options.get("status", "*")) and fnmatch(run.summary.get("name", ""),
                                                                          options.get("name", "*"))
            and ("tag" not in options or any(fnmatch(str(t), options["tag"]) for t in tags(run)))
            and ("sweep" not in options or run.sweep is not None and fnmatch(str(run.sweep), options["sweep"])))


def tags(run: Run) -> list:
    """The run's tags (`tags=[...]`); none for a run saved before hsci had them."""
    found = run.summary.get("tags")
    return found if isinstance(found, list) else []


def newest_first(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda run: (run.summary.get("started") or "", str(run.dir)), reverse=True)


def overrides(run: Run) -> dict[str, str]:
    return assignments(run.summary.get("overrides", []))


def differing(runs: list[Run]) -> set[str]:
    """The override keys whose values are not the same in every run shown (missing counts as a value)."""
    each = [overrides(run) for run in runs]
    keys = {k for o in each for k in o}
    return {k for k in keys if len({o.get(k) for o in each}) > 1}


def row(run: Run) -> dict:
    s = run.summary
    monitor = s.get("monitor")
    best = (s.get("best_val") or {}).get(monitor) if monitor else None
    test_key = monitor.removeprefix("val_") if monitor else None
    epochs = run.comparable.get("config", {}).get("trainer.epochs")
    return {"started": (s.get("started") or "")[:16].replace("T", " "), "name": s.get("name"), "status": run.status,
            "epochs": f"{s.get('epochs_run', 0)}/{epochs}" if epochs else s.get("epochs_run"),
            "best_val": f"{monitor} {best:.4f}" if isinstance(best, (int, float)) else None,
            "test": f"{test_key} {s['test'][test_key]:.4f}" if test_key in (s.get("test") or {}) else None,
            "duration": _duration(s.get("duration_s")), "overrides": "", "tags": ",".join(map(str, tags(run))),
            "sweep": str(run.sweep) if run.sweep else None, "run_dir": str(run.dir)}


def _duration(seconds) -> str | None:
    if not isinstance(seconds, (int, float)):
        return None
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
