"""From runs to conclusions: what each run records to be compared (its comparable config, its test predictions,
intervals of its test metrics), `hsci runs`, and `hsci compare`, whose numbers are checked against SciPy called
directly on the same summaries."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from conftest import hsci, once, run_dirs, summary_of, write_cifar
from hsci.analysis import stats as hsci_stats
from hsci.record import predictions

SMOKE = ("experiment=smoke", "trainer.limit_batches=null", "trainer.epochs=1", "data.batch_size=64")


@pytest.fixture(scope="session")
def seeds(tmp_path_factory) -> Path:
    """A sweep of two optimizers over three seeds each (digits, one epoch), made once for the tests that read it."""

    def make(cwd: Path) -> dict:
        result = hsci("train", "-m", *SMOKE, "optimizer=adam,sgd", "seed=0,1,2", cwd=cwd)
        assert result.returncode == 0, result.stderr
        [sweep] = (cwd / "outputs" / "multirun").glob("*/*")
        return {"sweep": str(sweep), "stdout": result.stdout}

    return Path(once(tmp_path_factory, "seeds", make)["sweep"])


def jobs(sweep: Path) -> list[Path]:
    return sorted((d for d in sweep.iterdir() if (d / "summary.json").is_file()),
                  key=lambda d: int(d.name.split("_")[0]))


def test_a_run_records_what_makes_it_comparable_and_its_test_predictions(seeds):
    s = [summary_of(d) for d in jobs(seeds)]
    assert [x["seed"] for x in s] == [0, 1, 2, 0, 1, 2]  # optimizer=adam first, then sgd
    comparable = [x["comparable"] for x in s]
    assert len({c["test_split"] for c in comparable}) == 1 and comparable[0]["test_size"] == 360
    assert comparable[0]["config"] == comparable[2]["config"] != comparable[3]["config"]
    assert "seed" not in comparable[0]["config"] and "trainer.device" not in comparable[0]["config"]
    assert comparable[0]["config"]["optimizer._target_"] == "torch.optim.Adam"
    assert s[0]["classes"] == [str(i) for i in range(10)]
    p = predictions.load(jobs(seeds)[0])
    assert len(p["target"]) == 360 and p["prob"].shape == (360, 10) and p["prob"].dtype == np.float16
    assert (p["prob"][np.arange(360), p["predicted"]] == p["prob"].max(1)).all()  # the argmax (ties in float16)
    hits = int((p["predicted"] == p["target"]).sum())
    assert hits / 360 == pytest.approx(s[0]["test"]["acc"], abs=1e-6)
    wilson = stats.binomtest(hits, 360).proportion_ci(0.95, method="wilson")
    assert (s[0]["test_ci"]["acc"]["low"], s[0]["test_ci"]["acc"]["high"]) == pytest.approx((wilson.low, wilson.high))
    for name in ("precision", "recall", "f1"):
        ci = s[0]["test_ci"][name]
        assert ci["low"] <= s[0]["test"][name] <= ci["high"] and ci["method"].startswith("bootstrap")


def test_the_metric_statistics_are_torchmetrics_own(tmp_path):
    from torchmetrics.functional.classification import (binary_f1_score, binary_precision, binary_recall,
                                                        multiclass_f1_score, multiclass_precision, multiclass_recall)

    rng = np.random.default_rng(0)
    target, predicted = rng.integers(0, 6, 200), rng.integers(0, 6, 200)
    predicted[predicted == 5] = 4  # class 5 is never predicted; class 3 never present
    target[target == 3] = 2
    predicted[predicted == 3] = 0
    p = {"target": target, "predicted": predicted, "prob": np.zeros((200, 7))}
    for name, fn in (("precision", multiclass_precision), ("recall", multiclass_recall), ("f1", multiclass_f1_score)):
        [ours] = predictions.classification([name], "multiclass", p)(target, predicted)
        theirs = fn(torch.from_numpy(predicted), torch.from_numpy(target), num_classes=7, average="macro").item()
        assert ours == pytest.approx(theirs, abs=1e-6), name
    target, predicted = rng.integers(0, 2, 100), rng.integers(0, 2, 100)
    for name, fn in (("precision", binary_precision), ("recall", binary_recall), ("f1", binary_f1_score)):
        [ours] = predictions.classification([name], "binary", {})(target, predicted)
        theirs = fn(torch.from_numpy(predicted), torch.from_numpy(target)).item()
        assert ours == pytest.approx(theirs, abs=1e-6), name


def test_compare_numbers_are_scipys_on_the_same_summaries(seeds, tmp_path):
    result = hsci("compare", str(seeds), f"out={tmp_path / 'cmp'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    values = [[summary_of(d)["test"]["acc"] for d in jobs(seeds)][i:i + 3] for i in (0, 3)]
    assert out["metric"] == "test.acc" and out["baseline"] == 1
    adam, sgd = out["groups"]
    assert [r["value"] for r in adam["runs"]] == values[0] and [r["value"] for r in sgd["runs"]] == values[1]
    assert (adam["label"], sgd["label"]) == ("optimizer=adam", "optimizer=sgd")
    assert sgd["differs"]["optimizer._target_"] == "torch.optim.SGD" and sgd["differs"]["optimizer.lr"] == 0.05
    a, b = np.array(values[1]), np.array(values[0])
    low, high = stats.t.interval(0.95, 2, loc=a.mean(), scale=stats.sem(a))
    assert (sgd["mean"], sgd["std"], sgd["ci_low"], sgd["ci_high"]) == pytest.approx((a.mean(), a.std(ddof=1), low,
                                                                                       high))
    welch = stats.ttest_ind(a, b, equal_var=False)
    v = sgd["versus_baseline"]
    assert (v["diff"], v["p"]) == pytest.approx((a.mean() - b.mean(), welch.pvalue))
    assert (v["ci_low"], v["ci_high"]) == pytest.approx(tuple(welch.confidence_interval(0.95)))
    pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    assert v["hedges_g"] == pytest.approx((a.mean() - b.mean()) / pooled * (1 - 3 / (4 * 6 - 9)))
    assert v["win_share"] == pytest.approx(sum((x > y) + 0.5 * (x == y) for x in a for y in b) / 9)
    paired = stats.ttest_rel(a, b)  # the same seeds 0, 1, 2 in both
    assert sgd["paired"]["seeds"] == 3 and sgd["paired"]["p"] == pytest.approx(paired.pvalue)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| 2 | optimizer=sgd |" in md and "Accuracy per class" in md
    assert "- group 2: optimizer._target_=torch.optim.SGD" in md
    with Image.open(tmp_path / "cmp" / "compare.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
    assert "paired diff" in result.stdout and "written:" in result.stdout


def test_compare_says_what_the_data_cannot_support(seeds, tmp_path):
    two = [jobs(seeds)[i] for i in (0, 1, 3)]  # adam seeds 0, 1; sgd seed 0
    stopped = tmp_path / "stopped"
    shutil.copytree(jobs(seeds)[2], stopped)
    summary = summary_of(stopped) | {"status": "interrupted"}
    (stopped / "summary.json").write_text(json.dumps(summary))
    result = hsci("compare", *map(str, two), str(stopped), "metric=test.f1", f"out={tmp_path / 'cmp'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "group 1: 2 runs: too few for an interval; add seeds: hsci train -m seed=0,1,2,3,4" in result.stdout
    assert "group 2: 1 run: too few" in result.stdout and "1 run(s) not completed: left out" in result.stdout
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert out["metric"] == "test.f1" and out["groups"][0]["ci_low"] is None
    assert out["groups"][1]["versus_baseline"]["p"] is None  # a single run has no variance to test against


def test_two_single_runs_get_mcnemars_test_on_their_test_predictions(seeds, tmp_path):
    a, b = jobs(seeds)[0], jobs(seeds)[3]
    result = hsci("compare", str(a), str(b), f"out={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    m = json.loads((tmp_path / "compare.json").read_text())["groups"][1]["mcnemar"]
    pa, pb = predictions.load(a), predictions.load(b)
    right_a, right_b = pa["predicted"] == pa["target"], pb["predicted"] == pb["target"]
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    assert (m["only_baseline_right"], m["only_group_right"]) == (only_a, only_b)
    assert m["p"] == pytest.approx(stats.binomtest(only_b, only_a + only_b).pvalue)
    assert "discordant" in result.stdout


def test_compare_refuses_runs_tested_on_different_splits(seeds, tmp_path):
    result = hsci("train", *SMOKE, "data.split_seed=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [other] = run_dirs(tmp_path)
    result = hsci("compare", str(jobs(seeds)[0]), str(other), cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "were tested on different test splits" in result.stderr and "not comparable" in result.stderr
    assert not (tmp_path / "outputs" / "compare").exists()


def test_compare_refuses_bad_options_in_one_line(seeds, tmp_path):
    for args, message in [(["metric=acc"], "give test.<metric> or val.<metric>"),
                          (["metric=test.nope"], "is recorded by none of the runs"),
                          (["baseline=7"], "give a group's number (1 to 2)"),
                          (["colour=red"], "colour is not an option"), ([], "usage: hsci compare")]:
        result = hsci("compare", *([str(seeds)] if args else []), *args, cwd=tmp_path)
        assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1, args
    result = hsci("compare", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert "no such run directory or folder" in result.stderr


def test_hsci_runs_lists_newest_first_with_filters_and_json(seeds, tmp_path):
    outputs = tmp_path / "outputs"
    shutil.copytree(seeds.parent.parent.parent, outputs)
    job = jobs(outputs / "multirun" / seeds.parent.name / seeds.name)[4]
    (job / "summary.json").write_text(json.dumps(summary_of(job) | {"status": "failed", "started": "2099-01-01T00:00"}))
    listed = json.loads(hsci("runs", "--json", cwd=tmp_path).stdout)
    assert len(listed) == 6 and listed[0]["status"] == "failed"  # the newest
    assert all(r["sweep"] for r in listed) and {r["overrides"] for r in listed} >= {"optimizer=sgd seed=1"}
    done = json.loads(hsci("runs", "status=completed", "--json", cwd=tmp_path).stdout)
    assert len(done) == 5 and all(r["status"] == "completed" and r["test"].startswith("acc ") for r in done)
    assert json.loads(hsci("runs", "name=cifar*", "--json", cwd=tmp_path).stdout) == []
    assert len(json.loads(hsci("runs", "last=2", "--json", "outputs/multirun", cwd=tmp_path).stdout)) == 2
    table = hsci("runs", cwd=tmp_path)
    assert table.returncode == 0 and "6 of 6 runs" in table.stdout and "epochs 1/1" in table.stdout
    bad = hsci("runs", "state=done", cwd=tmp_path)
    assert bad.returncode == 1 and "state is not an option" in bad.stderr


def test_hsci_runs_without_outputs_says_where_to_run_it(tmp_path):
    result = hsci("runs", cwd=tmp_path)
    assert result.returncode == 1 and "no outputs/ folder here" in result.stderr


def test_class_names_come_from_the_dataset(tmp_path, cfg_of):
    from hydra.utils import instantiate

    from hsci.record.comparable import class_names, fingerprint

    write_cifar(tmp_path)
    data = instantiate(cfg_of("data=cifar10", f"data.root={tmp_path}", "data.download=false").data)
    assert class_names(data)[:2] == ["airplane", "automobile"]
    again = instantiate(cfg_of("data=cifar10", f"data.root={tmp_path}", "data.download=false").data)
    assert fingerprint(data.test) == fingerprint(again.test) != fingerprint(data.val)


def test_stats_say_why_there_is_no_interval():
    assert hsci_stats.describe([0.5, 0.5, 0.5])["note"].startswith("all 3 runs gave the same value")
    many = hsci_stats.describe(list(np.linspace(0.8, 0.9, 25)))
    assert many["ci_method"].startswith("bootstrap BCa") and many["ci_low"] < 0.85 < many["ci_high"]


def test_a_seed_sweep_ends_with_each_configuration_over_its_seeds(seeds):
    summary = json.loads((seeds / "sweep_summary.json").read_text())
    configs = summary["configs"]
    assert [c["n"] for c in configs] == [3, 3] and {c["config"] for c in configs} == {"optimizer=adam",
                                                                                        "optimizer=sgd"}
    by_label = {c["config"]: c for c in configs}
    for label, first in (("optimizer=adam", 0), ("optimizer=sgd", 3)):
        values = [summary_of(d)["best_val"]["val_acc"] for d in jobs(seeds)[first:first + 3]]
        assert by_label[label]["mean"] == pytest.approx(np.mean(values))
    assert configs[0]["mean"] >= configs[1]["mean"]  # best first
    assert sorted(d.name for d in jobs(seeds)) == [f"{i}_optimizer={o},seed={s}" for i, (o, s) in enumerate(
        (o, s) for o in ("adam", "sgd") for s in range(3))]
    assert not (seeds / "sweep.png").exists()  # nothing numeric swept


def test_a_log_spaced_sweep_is_ordered_by_its_value_and_plotted(tmp_path):
    result = hsci("train", "-m", "experiment=smoke", "trainer.epochs=1", "optimizer.lr=logspace(1e-3,1e-1,3)",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [sweep] = (tmp_path / "outputs" / "multirun").glob("*/*")
    rows = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert [r["job"] for r in rows] == ["0_optimizer.lr=0.001", "1_optimizer.lr=0.01", "2_optimizer.lr=0.1"]
    [marked] = [r for r in rows if r.get("best") == "*"]
    assert marked["best_val_acc"] == max(r["best_val_acc"] for r in rows)
    with Image.open(sweep / "sweep.png") as png:
        assert png.format == "PNG"
    bad = hsci("train", "-m", "optimizer.lr=logspace(0,1,3)", cwd=tmp_path)
    assert bad.returncode == 2 and "logspace(a,b,n) takes two positive numbers" in bad.stderr


def test_every_run_draws_its_plots_from_its_own_records(seeds, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(jobs(seeds)[0], run)
    drawn = {name: (run / name).read_bytes() for name in ("curves.png", "confusion.png")}
    for name in drawn:
        with Image.open(run / name) as png:
            assert png.format == "PNG"
        (run / name).unlink()
    result = hsci("plot", f"run={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {name: (run / name).read_bytes() for name in drawn} == drawn  # the same records, the same plots
    records = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(records + [records[-1].replace('"epoch": 1', '"epoch": 2')]) + "\n")
    assert hsci("plot", f"run={run}", cwd=tmp_path).returncode == 0
    assert (run / "curves.png").read_bytes() != drawn["curves.png"]
    assert hsci("plot", cwd=tmp_path).stderr.startswith("error: usage: hsci plot run=")


def test_a_regression_run_plots_predicted_against_true(tmp_path):
    result = hsci("train", "experiment=smoke", "data=diabetes", "model=mlp", "trainer.limit_batches=null",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    s, p = summary_of(run), predictions.load(run)
    assert s["classes"] is None and "prob" not in p and len(p["target"]) == s["comparable"]["test_size"]
    mse = float(np.mean((p["predicted"] - p["target"]) ** 2))
    assert mse == pytest.approx(s["test"]["mse"], rel=1e-4)
    assert s["test_ci"]["mse"]["low"] <= s["test"]["mse"] <= s["test_ci"]["mse"]["high"]
    with Image.open(run / "predicted.png") as png:
        assert png.format == "PNG"
    assert (run / "curves.png").is_file() and not (run / "confusion.png").exists()


def test_a_test_split_too_small_to_tell_a_point_is_said_to_be_so_when_the_run_starts(tmp_path):
    result = hsci("train", "experiment=smoke", "data=fake", "data.train_size=64", "data.test_size=40",
                  "trainer.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    note = "note: the test split holds 40 examples: one of them moves accuracy by 2.5 points"
    assert note in lines and lines.index(note) < next(i for i, x in enumerate(lines) if x.startswith("epoch 1"))
    assert "test split, best checkpoint (epoch 1), 40 examples" in result.stdout and "acc" in result.stdout
    assert "(95% CI " in result.stdout
