"""What replicate runs say: a group's mean with its 95% interval (`describe`), a group against a baseline group
(`versus`, `paired`), and two runs on the same test examples (`mcnemar`). SciPy does the statistics.

A group is the runs of one comparable config (hsci/record/comparable.py): the seeds of one setting. Below
MIN_RUNS runs a group gets no interval; from BOOTSTRAP_RUNS on, the mean's interval is SciPy's BCa bootstrap,
below that Student's t.
"""

from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95
MIN_RUNS = 3  # fewer runs support no interval
BOOTSTRAP_RUNS = 20  # from here on, a BCa bootstrap of the mean instead of Student's t
RESAMPLES = 9999
ADD_SEEDS = "add seeds: hsci train -m seed=0,1,2,3,4 ..."


def describe(values: list[float], seed: int = 0) -> dict:
    """n, mean, std, a 95% interval of the mean (with its method, or why there is none), min and max."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = len(x)
    out = {"n": n, "mean": float(x.mean()) if n else None, "std": float(x.std(ddof=1)) if n > 1 else None,
           "min": float(x.min()) if n else None, "max": float(x.max()) if n else None,
           "ci_low": None, "ci_high": None, "ci_method": None, "note": None}
    if n < MIN_RUNS:
        out["note"] = f"{n} run{'s' * (n != 1)}: too few for an interval; {ADD_SEEDS}"
    elif out["std"] == 0:
        out["note"] = f"all {n} runs gave the same value: no spread to estimate an interval from"
    elif n < BOOTSTRAP_RUNS:
        low, high = stats.t.interval(LEVEL, n - 1, loc=x.mean(), scale=stats.sem(x))
        out |= {"ci_low": float(low), "ci_high": float(high), "ci_method": "student t"}
    else:
        ci = stats.bootstrap((x,), np.mean, confidence_level=LEVEL, n_resamples=RESAMPLES, method="BCa",
                             random_state=np.random.default_rng(seed)).confidence_interval
        out |= {"ci_low": float(ci.low), "ci_high": float(ci.high), "ci_method": f"bootstrap BCa ({RESAMPLES})"}
    return out


def versus(group: list[float], baseline: list[float], higher_better: bool) -> dict:
    """The group against the baseline: the difference of means with Welch's 95% interval and p-value
    (`scipy.stats.ttest_ind(equal_var=False)`), Hedges' g, and the share of (group run, baseline run) pairs the
    group wins (ties count half: the Mann-Whitney U statistic over the number of pairs)."""
    from scipy import stats

    a, b = np.asarray(group, dtype=float), np.asarray(baseline, dtype=float)
    out = {"diff": float(a.mean() - b.mean()), "ci_low": None, "ci_high": None, "p": None, "hedges_g": None,
           "win_share": None}
    if len(a) and len(b):
        u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic if len(a) * len(b) else 0
        share = float(u) / (len(a) * len(b))
        out["win_share"] = share if higher_better else 1 - share
    if len(a) < 2 or len(b) < 2:
        return out
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    if pooled > 0:  # Cohen's d with the small-sample correction
        out["hedges_g"] = float(out["diff"] / pooled * (1 - 3 / (4 * (len(a) + len(b)) - 9)))
    if a.var() == 0 and b.var() == 0:
        return out
    welch = stats.ttest_ind(a, b, equal_var=False)
    ci = welch.confidence_interval(LEVEL)
    return out | {"ci_low": float(ci.low), "ci_high": float(ci.high), "p": float(welch.pvalue)}


def paired(group: dict, baseline: dict) -> dict | None:
    """Where both groups ran the same seeds (at least MIN_RUNS of them): the mean paired difference over those
    seeds, its 95% interval and p-value (`scipy.stats.ttest_rel`). `group` and `baseline` map seed -> value."""
    from scipy import stats

    seeds = sorted(set(group) & set(baseline), key=str)
    if len(seeds) < MIN_RUNS:
        return None
    a, b = np.array([group[s] for s in seeds], dtype=float), np.array([baseline[s] for s in seeds], dtype=float)
    out = {"seeds": len(seeds), "diff": float((a - b).mean()), "ci_low": None, "ci_high": None, "p": None}
    if np.var(a - b) == 0:
        return out
    test = stats.ttest_rel(a, b)
    ci = test.confidence_interval(LEVEL)
    return out | {"ci_low": float(ci.low), "ci_high": float(ci.high), "p": float(test.pvalue)}


def mcnemar(baseline: dict, group: dict) -> dict | None:
    """Two runs' per-example test predictions (hsci/record/predictions.py) on the same test examples: McNemar's
    exact test, a binomial test on the examples that one run gets right and the other wrong."""
    from scipy import stats

    a, b = baseline, group
    if len(a["target"]) != len(b["target"]) or not np.array_equal(a["target"], b["target"]):
        return None
    right_a, right_b = a["predicted"] == a["target"], b["predicted"] == b["target"]
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    p = stats.binomtest(only_b, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"examples": len(a["target"]), "only_baseline_right": only_a, "only_group_right": only_b, "p": float(p)}


def per_class(runs: list[dict]) -> dict[str, float | None]:
    """Each class's test accuracy, the mean over a group's runs (each as its summary.json's `test_per_class`)."""
    names = list(dict.fromkeys(name for run in runs for name in run))
    values = {name: [run[name] for run in runs if run.get(name) is not None] for name in names}
    return {name: float(np.mean(v)) if v else None for name, v in values.items()}
