"""`hsci predict` and `hsci eval` on a labelled folder: a run's best checkpoint on new inputs, prepared as the run
prepared its own test split (the probabilities it recorded for its test examples come out again, bit for bit), with
unreadable inputs listed and left out; and on a run saved before checkpoints recorded what predict reads."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import hsci, once, run_dirs, summary_of, write_imagefolder

SAVED = Path(__file__).parent / "fixtures" / "saved_runs"


@pytest.fixture(scope="session")
def pets(tmp_path_factory) -> Path:
    """A smoke run on an image folder of cats, dogs and foxes (16 x 16 px), made once."""

    def make(cwd: Path) -> dict:
        write_imagefolder(cwd / "pets", per_class=16)
        result = hsci("train", "experiment=smoke", "data=imagefolder", f"data.root={cwd / 'pets'}",
                      "data.image_size=16", "data.num_workers=0", cwd=cwd)
        assert result.returncode == 0, result.stderr
        return {"run": str(run_dirs(cwd)[0])}

    return Path(once(tmp_path_factory, "predict_pets", make)["run"])


@pytest.fixture(scope="session")
def cancer(tmp_path_factory) -> Path:
    """A smoke run of an MLP on scikit-learn's breast cancer table (binary), made once."""

    def make(cwd: Path) -> dict:
        result = hsci("train", "experiment=smoke", "data=breast_cancer", "model=mlp", cwd=cwd)
        assert result.returncode == 0, result.stderr
        return {"run": str(run_dirs(cwd)[0])}

    return Path(once(tmp_path_factory, "predict_cancer", make)["run"])


def predictions(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def recorded(run: Path) -> dict:
    with np.load(run / "test_predictions.npz", allow_pickle=False) as f:
        return dict(f)


def test_predict_gives_the_probabilities_the_run_recorded_for_its_own_test_images(pets, tmp_path):
    test = recorded(pets)
    classes = summary_of(pets)["classes"]
    result = hsci("predict", f"run={pets}", "inputs=" + ",".join(test["path"]), "top_k=3", f"out={tmp_path}",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = predictions(tmp_path / "predictions.csv")  # out=<folder>: predictions.csv in it
    assert [row["file"] for row in rows] == list(test["path"])  # files as given, in that order
    prob = np.zeros((len(rows), len(classes)), np.float32)
    for i, row in enumerate(rows):
        for k in (1, 2, 3):
            prob[i, classes.index(row[f"class_{k}"])] = float(row[f"prob_{k}"])
        assert float(row["prob_1"]) >= float(row["prob_2"]) >= float(row["prob_3"])
    assert np.array_equal(prob.astype(np.float16), test["prob"])  # the run's own decoding, resize and normalisation
    assert [row["class_1"] for row in rows] == [classes[c] for c in test["predicted"]]


def test_predict_on_a_folder_a_glob_and_files_leaves_out_what_is_not_an_image(pets, tmp_path):
    write_imagefolder(tmp_path / "new", splits=("",), classes=("cat", "fox"), per_class=3)
    (tmp_path / "new" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "new" / "fox" / "cut.png").write_bytes((tmp_path / "new" / "fox" / "1.png").read_bytes()[:120])
    (tmp_path / "new" / ".DS_Store").write_bytes(b"\0")  # hidden: not an input

    result = hsci("predict", "run=" + str(pets), "inputs=new", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [out] = (tmp_path / "outputs" / "predict").glob("*/*/predictions.csv")  # the default place
    rows = predictions(out)
    assert [row["file"] for row in rows] == [f"new/{c}/{i}.{'png' if i % 2 else 'jpg'}" for c in ("cat", "fox")
                                             for i in range(3)]
    assert list(rows[0]) == ["file", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]  # top_k=3
    assert "left out 2 of 8 files that are not readable images: new/cat/notes.txt (cannot identify image file), " \
           "new/fox/cut.png" in result.stdout
    assert "new/cat/0.jpg" in result.stdout and f"written: {out.relative_to(tmp_path)}" in result.stdout
    by_file = {row["file"]: row for row in rows}

    result = hsci("predict", f"run={pets}", "inputs=new/*/*.png", "top_k=1", "out=pngs.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pngs = predictions(tmp_path / "pngs.csv")
    assert [row["file"] for row in pngs] == ["new/cat/1.png", "new/fox/1.png"]  # cut.png left out
    assert list(pngs[0]) == ["file", "class_1", "prob_1"]
    for row in pngs:  # the same image, the same prediction (within float32's rounding: a batch of another size)
        same = by_file[row["file"]]
        assert row["class_1"] == same["class_1"] and abs(float(row["prob_1"]) - float(same["prob_1"])) < 1e-5
    assert "left out 1 of 3 files" in result.stdout

    result = hsci("predict", f"run={pets}", "inputs=new/fox/2.jpg,new/cat/1.png", "out=two.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [row["file"] for row in predictions(tmp_path / "two.csv")] == ["new/fox/2.jpg", "new/cat/1.png"]
    assert "left out" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["inputs=new/cat/notes.txt"], "nothing to predict on: none of the 1 file(s) is a readable image: "
                                   "new/cat/notes.txt (cannot identify image file)"),
    (["inputs=nowhere"], "inputs=nowhere: nowhere is no file or folder"),
    (["inputs=new/*.gif"], "new/*.gif matches no file or folder"),
    (["inputs=new", "top_k=0"], "top_k=0: give a whole number"),
    (["inputs=new", "data.image_size=8"], "predict may change only trainer.device"),
    ([], "usage: hsci predict run="),
])
def test_predict_refuses_in_one_line(pets, tmp_path, args, message):
    (tmp_path / "new" / "cat").mkdir(parents=True)
    (tmp_path / "new" / "cat" / "notes.txt").write_text("not an image")
    result = hsci("predict", f"run={pets}", *args, cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


def test_predict_builds_a_received_run_only_from_what_hsci_can_name(pets, tmp_path):
    run = tmp_path / "received"
    shutil.copytree(pets, run)
    (run / ".hydra" / "config.sig").unlink()
    config = run / ".hydra" / "config.yaml"
    evil = f"_target_: shutil.copyfile\n  src: {config}\n  dst: {tmp_path / 'written-by-the-config'}"
    config.write_text(config.read_text().replace("_target_: hsci.models.cnn", evil))
    result = hsci("predict", f"run={run}", f"inputs={pets}", cwd=tmp_path)
    assert result.returncode == 1 and "model._target_ names shutil.copyfile" in result.stderr
    assert not (tmp_path / "written-by-the-config").exists()


def test_eval_on_a_labelled_folder_matches_its_classes_by_name(pets, tmp_path):
    write_imagefolder(tmp_path / "field", splits=("",), classes=("fox", "cat"), per_class=5)  # no dog; fox first
    result = hsci("eval", f"run={pets}", f"data.root={tmp_path / 'field'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (pets / "eval_test.json").exists()
    done = json.loads((pets / "eval_on_field.json").read_text())
    assert (done["data"], done["images"], done["classes"]) == (str(tmp_path / "field"), 10, ["cat", "fox"])
    assert hsci("predict", f"run={pets}", "inputs=field", "out=p.csv", cwd=tmp_path).returncode == 0
    rows = predictions(tmp_path / "p.csv")
    right = [row["class_1"] == Path(row["file"]).parent.name for row in rows]
    assert done["metrics"]["acc"] == pytest.approx(np.mean(right), abs=1e-6)  # the labels are the run's classes

    (tmp_path / "field" / "wolf").mkdir()
    shutil.copy(tmp_path / "field" / "fox" / "1.png", tmp_path / "field" / "wolf")
    result = hsci("eval", f"run={pets}", f"data.root={tmp_path / 'field'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "the model does not know the classes wolf (it knows cat, dog, fox)" in result.stderr


def test_a_table_run_predicts_from_rows_of_features(cancer, tmp_path):
    from sklearn.datasets import load_breast_cancer

    from hsci.parts.splits import carve

    bunch = load_breast_cancer()
    _, test = carve(bunch.target, 0.2, 0)  # data=breast_cancer's test split: test_fraction, split_seed
    lines = [",".join(bunch.feature_names)] + [",".join(repr(float(v)) for v in bunch.data[i]) for i in test]
    lines.insert(3, "1,2,3")  # a row of the wrong width
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    result = hsci("predict", f"run={cancer}", "inputs=rows.csv", "out=out.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "left out 1 of 115 rows that do not hold the run's 30 features as numbers: rows.csv:4 (3 values)" \
        in result.stdout
    rows = predictions(tmp_path / "out.csv")
    assert list(rows[0]) == ["row", "class_1", "prob_1", "class_2", "prob_2", "p_benign"]  # binary: both classes
    assert rows[0]["row"] == "rows.csv:2" and len(rows) == len(test)
    test_run = recorded(cancer)  # the first examples of the test split (trainer.limit_batches)
    positive = np.array([float(row["p_benign"]) for row in rows], np.float32)[:len(test_run["prob"])]
    assert np.array_equal(positive.astype(np.float16), test_run["prob"])  # standardised as the run's table was


def test_a_run_saved_before_checkpoints_recorded_its_inputs_predicts_as_it_tested(tmp_path):
    from hsci.data import _digits
    from hsci.parts.datasets import Carving

    pixels, labels = _digits()
    _, test = Carving(0.15, 0, 0.2).test(labels)  # the saved run's data=digits test split
    for i in test:
        folder = tmp_path / "digits" / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(pixels[i] * 255 / 16).astype(np.uint8), "L").save(folder / f"{i}.png")
    result = hsci("predict", f"run={SAVED / 'whole'}", "inputs=digits", "top_k=1", "out=digits.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = predictions(tmp_path / "digits.csv")
    right = [row["class_1"] == Path(row["file"]).parent.name for row in rows]
    assert len(rows) == len(test) and np.mean(right) == pytest.approx(summary_of(SAVED / "whole")["test"]["acc"])


@pytest.mark.slow
def test_a_regression_run_predicts_values_in_the_targets_units(tmp_path):
    from sklearn.datasets import load_diabetes

    from hsci.parts.splits import carve

    assert hsci("train", "experiment=smoke", "data=diabetes", "model=mlp", cwd=tmp_path).returncode == 0
    [run] = run_dirs(tmp_path)
    bunch = load_diabetes()
    _, test = carve(bunch.target, 0.2, 0, stratify=False)  # data=diabetes's test split
    (tmp_path / "rows.csv").write_text("".join(",".join(repr(float(v)) for v in bunch.data[i]) + "\n" for i in test))
    assert "top_k=2: this run predicts values" in hsci("predict", f"run={run}", "inputs=rows.csv", "top_k=2",
                                                       cwd=tmp_path).stderr
    result = hsci("predict", f"run={run}", "inputs=rows.csv", "out=out.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = predictions(tmp_path / "out.csv")
    assert list(rows[0]) == ["row", "value"] and rows[0]["row"] == "rows.csv:1"  # no header here
    values = np.array([float(row["value"]) for row in rows], np.float32)
    test_run = recorded(run)
    assert np.array_equal(values[:len(test_run["predicted"])], test_run["predicted"])  # in the target's units


@pytest.mark.slow
def test_a_pretrained_model_predicts_with_its_weights_resize_and_normalisation(tmp_path, monkeypatch):
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    commit, repo = "0" * 40, "models--timm--test_efficientnet.r160_in1k"  # timm's weights in a Hugging Face cache
    (tmp_path / "hub" / repo / "snapshots" / commit).mkdir(parents=True)
    (tmp_path / "hub" / repo / "refs").mkdir()
    (tmp_path / "hub" / repo / "refs" / "main").write_text(commit)
    save_file(timm.create_model("test_efficientnet").state_dict(),
              tmp_path / "hub" / repo / "snapshots" / commit / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    write_imagefolder(tmp_path / "pets", per_class=8)
    result = hsci("train", "experiment=smoke", "trainer.epochs=1", "data=imagefolder", f"data.root={tmp_path / 'pets'}",
                  "data.image_size=16", "data.num_workers=0", "data.batch_size=8", "model=timm",
                  "model.name=test_efficientnet", "model.pretrained=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))  # the checkpoint holds the weights
    test = recorded(run)
    result = hsci("predict", f"run={run}", "inputs=" + ",".join(test["path"]), "top_k=1", "out=p.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "inputs resized to 160 px" in result.stdout  # 16 px images, resized as the weights expect
    top = np.array([float(row["prob_1"]) for row in predictions(tmp_path / "p.csv")], np.float32)
    assert np.array_equal(top.astype(np.float16), test["prob"].max(1))
