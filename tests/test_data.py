"""Loading datasets from small files written in their real on-disk formats; splits; augmentation; input step."""

import math
import os
import pickle

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from conftest import write_cifar, write_idx, write_imagefolder
from hsci import UserError, user_error
from hsci.parts.datafiles import read_image
from hsci.parts.loaders import input_fn
from hsci.parts.splits import carve


def load(cfg_of, option, *overrides):
    return instantiate(cfg_of(f"data={option}", *overrides).data)


def load_error(cfg_of, option, *overrides) -> str:
    """The one-line UserError message that loading fails with (Hydra's instantiate wraps it)."""
    with pytest.raises(Exception) as err:
        load(cfg_of, option, *overrides)
    cause = user_error(err.value)
    assert cause is not None, err.value
    return str(cause)


def test_mnist_from_idx_files(cfg_of, tmp_path):
    write_idx(tmp_path, "MNIST", n_train=120, n_test=40)
    data = load(cfg_of, "mnist", f"data.root={tmp_path}", "data.download=false")
    assert (len(data.train), len(data.val), len(data.test)) == (108, 12, 40)  # val_fraction 0.1 of 120
    x, y = data.test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.uint8 and int(y) == 3
    raw = (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    assert torch.equal(x[0], torch.frombuffer(bytearray(raw[16 + 3 * 784:16 + 4 * 784]), dtype=torch.uint8).view(28, 28))


def test_fashion_mnist_from_its_own_folder(cfg_of, tmp_path):
    write_idx(tmp_path, "FashionMNIST")
    data = load(cfg_of, "fashion_mnist", f"data.root={tmp_path}", "data.download=false")
    assert data.input_shape == (1, 28, 28) and data.num_outputs == 10


def test_cifar10_from_pickle_batches(cfg_of, tmp_path):
    write_cifar(tmp_path, per_batch=40)
    data = load(cfg_of, "cifar10", f"data.root={tmp_path}", "data.download=false")
    assert (len(data.train), len(data.val), len(data.test)) == (180, 20, 40)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f)
    x, y = data.test[5]
    assert torch.equal(x, torch.from_numpy(batch["data"][5].reshape(3, 32, 32))) and int(y) == batch["labels"][5]
    assert data.input_shape == (3, 32, 32) and data.num_outputs == 10


def test_cifar100_uses_fine_labels(cfg_of, tmp_path):
    write_cifar(tmp_path, hundred=True, per_batch=40)
    data = load(cfg_of, "cifar100", f"data.root={tmp_path}", "data.download=false")
    assert data.num_outputs == 100 and len(data.test) == 40


def test_a_cifar_batch_that_would_run_code_is_refused(cfg_of, tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": Payload()}, f)
    message = load_error(cfg_of, "cifar10", f"data.root={tmp_path}", "data.download=false")
    assert "data_batch_2 is not a readable CIFAR batch" in message and "open is not allowed in a data file" in message
    assert not marker.exists()


@pytest.mark.parametrize("option, files", [("mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1")])
def test_missing_files_name_the_folder_and_files(cfg_of, tmp_path, option, files):
    message = load_error(cfg_of, option, f"data.root={tmp_path}", "data.download=false")
    assert str(tmp_path) in message and files in message and "data.download=false" in message
    assert "\n" not in message


def test_imagefolder_with_all_three_splits(cfg_of, tmp_path):
    write_imagefolder(tmp_path, splits=("train", "val", "test"), per_class=4)
    data = load(cfg_of, "imagefolder", f"data.root={tmp_path}", "data.image_size=24", "data.num_workers=0")
    assert (len(data.train), len(data.val), len(data.test)) == (12, 12, 12)
    assert data.input_shape == (3, 24, 24) and data.num_outputs == 3
    for split in (data.train, data.val, data.test):
        x, y = split[0]
        assert x.shape == (3, 24, 24) and x.dtype == torch.uint8 and y in (0, 1, 2)


def test_imagefolder_carves_missing_val_and_test_and_grayscale(cfg_of, tmp_path):
    write_imagefolder(tmp_path, splits=("train",), per_class=20)
    data = load(cfg_of, "imagefolder", f"data.root={tmp_path}", "data.channels=1", "data.mean=[0.5]",
                "data.std=[0.25]")
    assert (len(data.train), len(data.val), len(data.test)) == (48, 6, 6)
    assert data.train[0][0].shape == (1, 64, 64)
    assert sorted(int(data.test[i][1]) for i in range(6)) == [0, 0, 1, 1, 2, 2]  # stratified


@pytest.mark.parametrize("layout, message", [(None, "does not exist"), ("empty", "has no class folders"),
                                             ("no_images", "no images")])
def test_imagefolder_errors(cfg_of, tmp_path, layout, message):
    if layout == "empty":
        (tmp_path / "train").mkdir()
    if layout == "no_images":
        (tmp_path / "train" / "cat").mkdir(parents=True)
        (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    assert message in load_error(cfg_of, "imagefolder", f"data.root={tmp_path}")


def test_splits_are_fixed_by_split_seed_not_by_the_run_seed(cfg_of):
    a = load(cfg_of, "digits", "seed=1")
    b = load(cfg_of, "digits", "seed=2")
    c = load(cfg_of, "digits", "data.split_seed=7")
    assert torch.equal(a.test.y, b.test.y) and torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.val.x, c.val.x)
    counts = torch.bincount(a.val.y, minlength=10)
    assert counts.min() >= 19 and counts.max() <= 23  # stratified: 216 images, about 21.6 per class


def test_cifar_augmentation_crops_and_flips_training_images_only(cfg_of, tmp_path):
    write_cifar(tmp_path)
    data = load(cfg_of, "cifar10", f"data.root={tmp_path}", "data.download=false")
    torch.manual_seed(0)
    x = data.train.x[0]
    views = [data.train[0][0] for _ in range(20)]
    assert all(v.shape == (3, 32, 32) and v.dtype == torch.uint8 for v in views)
    assert any(not torch.equal(v, x) for v in views)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    crops = [p[:, i:i + 32, j:j + 32] for p in (padded, padded.flip(-1)) for i in range(9) for j in range(9)]
    assert all(any(torch.equal(v, c) for c in crops) for v in views)  # each view: a padded crop, maybe flipped
    assert torch.equal(data.val[0][0], data.val.x[0]) and torch.equal(data.test[0][0], data.test.x[0])


def test_digits_and_mnist_are_not_augmented_by_default(cfg_of):
    data = load(cfg_of, "digits")
    assert data.train.augment is None
    for option in ("mnist", "fashion_mnist"):
        cfg = cfg_of(f"data={option}").data
        assert cfg.random_crop_padding == 0 and cfg.horizontal_flip is False


def test_tables_are_standardised_with_training_statistics(cfg_of):
    data = load(cfg_of, "diabetes")
    x = data.train.x
    assert torch.allclose(x.mean(0), torch.zeros(10), atol=1e-5) and torch.allclose(x.std(0, unbiased=False),
                                                                                  torch.ones(10), atol=1e-4)
    assert data.task == "regression" and data.scaling.target_std > 1  # targets in the dataset's units: tens to hundreds


def test_input_fn_normalises_uint8_on_the_device_and_adapts_to_pretrained_weights():
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = input_fn((0.5,), (0.25,), torch.device("cpu"))(x)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 2.0))
    rgb = input_fn((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), torch.device("cpu"), size=16, channels=3)(x)
    assert rgb.shape == (2, 3, 16, 16) and torch.allclose(rgb, torch.ones_like(rgb))
    table = torch.randn(4, 3)
    assert input_fn(None, None, torch.device("cpu"))(table) is table


def test_a_batched_fetch_gives_the_same_samples_as_one_by_one(cfg_of, tmp_path):
    write_cifar(tmp_path)
    data = load(cfg_of, "cifar10", f"data.root={tmp_path}", "data.download=false")
    keys = [(3, 11), (0, 2**61), (7, 5), (3, 12)]
    x, y = data.train[keys]
    for b, key in enumerate(keys):
        one_x, one_y = data.train[key]
        assert torch.equal(x[b], one_x) and int(y[b]) == int(one_y)
    x, y = data.val[[4, 1]]
    assert torch.equal(x[1], data.val[1][0])


def test_imagefolder_reads_16_bit_images_as_what_they_hold(cfg_of, tmp_path):
    write_imagefolder(tmp_path, splits=("train", "val", "test"), per_class=2)
    dark = np.full((10, 10), 1000, np.uint16)  # 1000 of 65535: nearly black, not white
    Image.fromarray(dark).save(tmp_path / "test" / "cat" / "dark16.png")
    assert Image.open(tmp_path / "test" / "cat" / "dark16.png").mode == "I;16"
    for channels, mean in ((3, "[0.5,0.5,0.5]"), (1, "[0.5]")):
        data = load(cfg_of, "imagefolder", f"data.root={tmp_path}", "data.image_size=10", f"data.channels={channels}",
                    f"data.mean={mean}", f"data.std={mean}")
        i = next(i for i, (path, _) in enumerate(data.test.samples) if path.endswith("dark16.png"))
        x, _ = data.test[i]
        assert x.shape == (channels, 10, 10) and torch.equal(x, torch.full_like(x, 1000 >> 8))  # the high byte: 3


def test_imagefolder_walks_links_without_loops_and_counts_each_file_once(cfg_of, tmp_path):
    write_imagefolder(tmp_path, splits=("train", "val", "test"), per_class=4)
    (tmp_path / "train" / "cat" / "up").symlink_to(tmp_path / "train")  # a loop, reaching every class
    (tmp_path / "train" / "dog" / "cats").symlink_to(tmp_path / "train" / "cat")  # another class's folder
    (tmp_path / "train" / "fox" / "twice.png").symlink_to(tmp_path / "train" / "fox" / "1.png")  # one file twice
    extra = tmp_path.parent / f"{tmp_path.name}_more_foxes"
    write_imagefolder(extra, classes=("fox",), per_class=2)
    (tmp_path / "train" / "fox" / "more").symlink_to(extra / "train" / "fox")  # a link to images elsewhere: read
    write_imagefolder(tmp_path, classes=("dog/sub",), per_class=2)  # dog's own subfolder ...
    (tmp_path / "train" / "cat" / "dogs").symlink_to(tmp_path / "train" / "dog" / "sub")  # ... linked from cat
    data = load(cfg_of, "imagefolder", f"data.root={tmp_path}")
    assert len(data.train) == 12 + 2 + 2 and len(data.val) == 12 and len(data.test) == 12
    assert {label for path, label in data.train.samples if "/sub/" in path or "/dogs/" in path} == {1}  # dog's
    assert sum("/more/" in path for path, _ in data.train.samples) == 2
    assert sorted(label for _, label in data.train.samples) == [0] * 4 + [1] * 6 + [2] * 6


def test_a_hard_link_across_splits_is_the_same_file(cfg_of, tmp_path):
    write_imagefolder(tmp_path, splits=("train", "val"), per_class=4)
    os.link(tmp_path / "train" / "cat" / "1.png", tmp_path / "val" / "dog" / "copy.png")
    assert "copy.png is the same file as" in load_error(cfg_of, "imagefolder", f"data.root={tmp_path}")


def test_images_of_unknown_range_are_refused_by_name(tmp_path):
    Image.fromarray(np.full((4, 4), 200, np.int32)).save(tmp_path / "deep.tif")  # 32-bit integers
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "float.tif")
    for name, why in (("deep.tif", "32-bit integer pixels"), ("float.tif", "floating-point pixels")):
        with pytest.raises(UserError, match=f"{name} holds {why}"):
            read_image(str(tmp_path / name), "RGB")


def test_an_empty_class_folder_is_an_error(cfg_of, tmp_path):
    write_imagefolder(tmp_path, per_class=4)
    (tmp_path / "train" / "wolf").mkdir()
    message = load_error(cfg_of, "imagefolder", f"data.root={tmp_path}")
    assert f"{tmp_path / 'train' / 'wolf'} holds no images" in message


def test_carved_splits_are_scikit_learns_train_test_split():
    # hsci carves without importing scikit-learn, and must carve what it always has: scikit-learn's split (stratified
    # where every class has two samples, at random otherwise), on label sets of every shape.
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(0)
    for case in range(300):
        n, classes = int(rng.integers(2, 300)), int(rng.integers(1, 12))
        labels = rng.integers(0, classes, n)
        fraction, seed, stratify = float(rng.uniform(0.05, 0.6)), int(rng.integers(2**31)), bool(case % 4)
        idx = np.arange(n)
        held = max(math.ceil(fraction * n), len(np.unique(labels))) if stratify else fraction
        try:
            expected = train_test_split(idx, test_size=held, random_state=seed, stratify=labels if stratify else None)
        except ValueError:  # too few per class to stratify (or no room)
            try:
                expected = train_test_split(idx, test_size=fraction, random_state=seed)
            except ValueError:
                with pytest.raises(UserError, match="too small"):
                    carve(labels, fraction, seed, stratify)
                continue
        kept, out = carve(labels, fraction, seed, stratify)
        assert np.array_equal(kept, np.sort(expected[0])) and np.array_equal(out, np.sort(expected[1])), case
