"""`hsci compare <run dirs | sweep dirs | folders | globs ...> [metric=test.acc] [baseline=N] [out=<dir>]`.

The completed runs are grouped by their comparable config (hsci/record/comparable.py: the config without the
seed and the settings that change how a run is carried out), so the seeds of one setting form one group. Per
group: n, mean, std, a 95% interval of the mean, min and max; against the baseline group (the first, or
baseline=N): the difference of means with Welch's interval and p-value, Hedges' g, the share of run pairs won,
the paired difference over the seeds both ran, and for two single runs McNemar's test on their test predictions
(hsci/analysis/stats.py). Runs whose test splits differ are not compared.

The results go to compare.json, compare.md and compare.png in outputs/compare/<date>/<time>/ (or out=<dir>).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from hsci import UserError, new_folder, report
from hsci.analysis import stats
from hsci.analysis.found import Run, arguments, assignments, find, higher_is_better, monitored
from hsci.record import predictions
from hsci.record.comparable import NOT_EXPERIMENT

USAGE = ("usage: hsci compare <run dirs, sweep folders, folders of runs or globs ...> [metric=test.acc] "
         "[baseline=N] [out=<dir>]")
OPTIONS = ("metric", "baseline", "out")


def run_compare(args: list[str]) -> int:
    options, places, unknown = arguments(args, OPTIONS)
    if unknown or not places:
        raise UserError(f"hsci compare: {unknown[0] + ' is not an option; ' if unknown else ''}{USAGE}")
    runs, unreadable = find(places)
    result = compare(runs, options.get("metric"), options.get("baseline"))
    result["left_out"]["unreadable"] = unreadable
    day, now = time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S")
    out = Path(options["out"]) if "out" in options else new_folder(Path("outputs", "compare", day, now))
    show(result)
    write(result, out)
    report.say(f"written: {out / 'compare.md'}, compare.json, compare.png")
    return 0


def compare(runs: list[Run], metric: str | None = None, baseline: str | None = None) -> dict:
    """The comparison as compare.json holds it: the groups (each with its runs, statistics and what sets it apart)
    in the order their first runs were given, the baseline's number, and the runs left out and why."""
    metric = metric or monitored(runs)
    stage, _, name = metric.partition(".")
    if stage not in ("test", "val") or not name:
        raise UserError(f"metric={metric}: give test.<metric> or val.<metric>, e.g. metric=test.acc")
    done = [run for run in runs if run.status == "completed"]
    left_out = {"not_completed": len(runs) - len(done), "without_metric": 0, "unreadable": 0}
    if not done:
        raise UserError(f"hsci compare: none of the {len(runs)} runs found completed; nothing to compare")
    valued = [run for run in done if run.value(metric) is not None]
    left_out["without_metric"] = len(done) - len(valued)
    if not valued:
        names = sorted({k for run in done for k in (run.summary.get("test") or {})})
        raise UserError(f"metric={metric} is recorded by none of the runs; their test metrics: {', '.join(names)}")
    _same_test_split(valued)
    groups = _groups(valued)
    number = int(baseline) if baseline and baseline.isdigit() else None
    if baseline and number is None:
        found = [i for i, g in enumerate(groups, 1) if any(Path(baseline).resolve() == r.dir.resolve() for r in g)]
        number = found[0] if found else None
    if baseline and not (number and 1 <= number <= len(groups)):
        raise UserError(f"baseline={baseline}: give a group's number (1 to {len(groups)}) or one of its run "
                        "directories")
    number = number or 1
    higher = higher_is_better(metric)
    differs = _differs(groups)
    labels = _labels(groups, differs)
    out = {"metric": metric, "higher_is_better": higher, "baseline": number, "groups": [], "left_out": left_out,
           "test_split": next((r.comparable["test_split"] for g in groups for r in g if r.comparable.get("test_split")),
                              None), "unfingerprinted": sum(not r.comparable.get("test_split") for r in valued)}
    base = groups[number - 1]
    base_values = [r.value(metric) for r in base]
    for i, (group, label) in enumerate(zip(groups, labels), 1):
        values = [r.value(metric) for r in group]
        entry = {"group": i, "label": label, "differs": differs[i - 1], "config": _config(group[0]),
                 "runs": [{"run_dir": str(r.dir), "seed": r.seed, "value": v} for r, v in zip(group, values)],
                 **stats.describe(values)}
        if i != number:
            entry["versus_baseline"] = stats.versus(values, base_values, higher)
            entry["paired"] = stats.paired({r.seed: v for r, v in zip(group, values)},
                                           {r.seed: v for r, v in zip(base, base_values)})
            if len(group) == 1 and len(base) == 1 and stage == "test":
                entry["mcnemar"] = _mcnemar(base[0], group[0])
        entry["per_class"] = _per_class(group) if stage == "test" else None
        out["groups"].append(entry)
    return out


def _same_test_split(runs: list[Run]) -> None:
    """Refuse runs of other datasets, or whose test splits' fingerprints differ; a run saved before hsci took
    fingerprints is taken to share the others' split (notes() says how many)."""
    datasets, splits = {}, {}
    for run in runs:
        datasets.setdefault(run.comparable.get("data"), run)
        if run.comparable.get("test_split"):
            splits.setdefault(run.comparable["test_split"], run)
    for found in (datasets, splits):
        if len(found) > 1:
            (a, run_a), (b, run_b) = list(found.items())[:2]
            raise UserError(f"{run_a.dir} and {run_b.dir} were tested on different test splits ({a} against {b}): "
                            "their metrics are not comparable; compare runs of one dataset and split")


def _config(run: Run) -> dict:
    return run.comparable.get("config") or {}


def _groups(runs: list[Run]) -> list[list[Run]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[json.dumps(_config(run), sort_keys=True)].append(run)
    return list(groups.values())


def _differs(groups: list[list[Run]]) -> list[dict]:
    """What sets each group apart: the config keys whose values differ between the groups, with this group's."""
    configs = [_config(g[0]) for g in groups]
    keys = sorted({k for c in configs for k in c})
    differ = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
    return [{k: c.get(k) for k in differ} for c in configs]


def _labels(groups: list[list[Run]], differs: list[dict]) -> list[str]:
    """Each group's name: the overrides its runs share and the other groups' do not (`optimizer=sgd`), as typed;
    where those do not tell the groups apart, the config values that do."""
    shared = []
    for group in groups:
        each = [set(assignments(run.summary.get("overrides", [])).items()) for run in group]
        shared.append({(k, v) for k, v in set.intersection(*each) if k not in NOT_EXPERIMENT})
    labels = [" ".join(f"{k}={v}" for k, v in sorted(mine - set.intersection(*shared))) for mine in shared]
    if len(set(labels)) == len(labels) and all(labels) or len(groups) == 1:
        return [label or "all runs" for label in labels]
    return [" ".join(f"{k}={v}" for k, v in d.items() if v is not None) or "all runs" for d in differs]


def _mcnemar(base: Run, run: Run) -> dict | None:
    try:
        return stats.mcnemar(predictions.load(base.dir), predictions.load(run.dir))
    except (OSError, ValueError, KeyError):
        return None


def _per_class(group: list[Run]) -> dict | None:
    found = [run.summary["test_per_class"] for run in group if run.summary.get("test_per_class")]
    return stats.per_class(found) if found else None


def _num(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _p(value) -> str:
    return "" if value is None else f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def group_rows(result: dict) -> list[dict]:
    """A row per group: its statistics, and against the baseline."""
    rows = []
    for g in result["groups"]:
        ci = f"{_num(g['ci_low'])} to {_num(g['ci_high'])}" if g["ci_low"] is not None else "-"
        row = {"group": g["group"], "config": g["label"] + (" (baseline)" if g["group"] == result["baseline"] else ""),
               "n": g["n"], "mean": _num(g["mean"]), "std": _num(g["std"]), "95% CI": ci,
               "min": _num(g["min"]), "max": _num(g["max"])}
        v = g.get("versus_baseline")
        if v:
            row |= {"diff": f"{v['diff']:+.4f}",
                    "welch 95% CI": f"{v['ci_low']:+.4f} to {v['ci_high']:+.4f}" if v["ci_low"] is not None else "-",
                    "p": _p(v["p"]), "hedges_g": _num(v["hedges_g"], 2), "wins": _num(v["win_share"], 2)}
        p = g.get("paired")
        if p:
            row["paired diff"] = (f"{p['diff']:+.4f} (95% CI {_num(p['ci_low'])} to {_num(p['ci_high'])}, "
                                  f"p {_p(p['p'])}, {p['seeds']} seeds)")
        m = g.get("mcnemar")
        if m:
            row["mcnemar"] = f"{m['only_baseline_right']} vs {m['only_group_right']} discordant, p {_p(m['p'])}"
        rows.append(row)
    return rows


def what_differs(result: dict) -> list[str]:
    return [f"group {g['group']}: " + (" ".join(f"{k}={v}" for k, v in g["differs"].items() if v is not None) or "-")
            for g in result["groups"] if len(result["groups"]) > 1]


def notes(result: dict) -> list[str]:
    """What the data cannot support, plainly."""
    lines = [f"group {g['group']}: {g['note']}" for g in result["groups"] if g["note"]]
    left = result["left_out"]
    if left["not_completed"]:
        lines.append(f"{left['not_completed']} run(s) not completed: left out")
    if left["without_metric"]:
        lines.append(f"{left['without_metric']} run(s) without {result['metric']}: left out")
    if left["unreadable"]:
        lines.append(f"{left['unreadable']} folder(s) without a readable summary.json: left out")
    if result["unfingerprinted"]:
        lines.append(f"{result['unfingerprinted']} run(s) saved before hsci recorded test splits: their split is taken "
                     "to be the others'")
    return lines


def show(result: dict) -> None:
    better = "higher" if result["higher_is_better"] else "lower"
    report.rows_table(group_rows(result), f"{result['metric']} ({better} is better), by config; differences against "
                      f"group {result['baseline']}", numbers=("n", "mean", "std", "min", "max", "diff", "p"))
    if len(result["groups"]) > 1:
        report.say("what differs between the groups (their configs):")
        for line in what_differs(result):
            report.say(f"  {line}")
    for line in notes(result):
        report.say(f"note: {line}")


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "compare.md").write_text(markdown(result))
    plot(result, out / "compare.png")


def markdown(result: dict) -> str:
    rows = group_rows(result)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    better = "higher" if result["higher_is_better"] else "lower"
    lines = [f"# {result['metric']} ({better} is better)", "",
             f"Grouped by config; differences against group {result['baseline']}. Test split: "
             f"{result['test_split']}.", "", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    if len(result["groups"]) > 1:
        lines += ["", "What differs between the groups (their configs):", ""] + [f"- {x}" for x in what_differs(result)]
    lines += [""] + [f"- {line}" for line in notes(result)]
    classes = [g for g in result["groups"] if g.get("per_class")]
    if classes:
        names = list(classes[0]["per_class"])
        lines += ["", "## Accuracy per class (test split, mean over each group's runs)", "",
                  "| group | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
        lines += [f"| {g['group']} | " + " | ".join(_num(g["per_class"].get(n), 3) for n in names) + " |"
                  for g in classes]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Each group's runs as points, its mean and its interval, so the spread shows at a glance."""
    from matplotlib.figure import Figure  # drawn without pyplot: no display, no GUI backend (headless, CI, SSH)

    groups = result["groups"]
    fig = Figure(figsize=(max(4.0, 1.2 * len(groups) + 2), 4), layout="constrained")
    ax = fig.subplots()
    for i, g in enumerate(groups):
        values = [r["value"] for r in g["runs"]]
        offsets = [(j - (len(values) - 1) / 2) * min(0.3 / max(len(values), 1), 0.05) for j in range(len(values))]
        ax.scatter([i + o for o in offsets], values, s=18, alpha=0.6, color="tab:blue", zorder=2)
        if g["ci_low"] is not None:
            ax.errorbar(i + 0.25, g["mean"], yerr=[[g["mean"] - g["ci_low"]], [g["ci_high"] - g["mean"]]], fmt="o",
                        color="black", capsize=4, zorder=3)
        else:
            ax.plot(i + 0.25, g["mean"], "o", color="black", zorder=3)
    short = all(len(g["label"]) <= 24 for g in groups)
    ax.set_xticks(range(len(groups)), [(g["label"] if short else str(g["group"]))
                                       + (" *" if g["group"] == result["baseline"] else "") for g in groups])
    ax.set_xlabel("group (* the baseline)" + ("" if short else "; compare.md names each"))
    ax.set_ylabel(result["metric"])
    ax.set_title("each run, and each group's mean with its 95% interval", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
