"""Datasets. Each `conf/data/<name>.yaml` calls one function here, which returns a `Data` bundle; its
arguments are the file's keys (the image sets' common ones come from `conf/data/base/`).

A builder gathers its keys into the objects they belong to (`Loading`, `Carving`, `Scaling`, `CropFlip`,
hsci/parts/datasets.py) and reads the files through hsci/parts/datafiles.py. torchvision and scikit-learn are
imported by the builders that read their datasets, when they run.
"""

import gzip
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from hsci.parts.datafiles import cifar, idx_files, read_image_folder
from hsci.parts.datasets import Carving, CropFlip, Data, Images, Loading, Scaling, Tensors, table

__all__ = ["Data", "Loading", "Scaling", "Tensors", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "fake",
           "imagefolder", "breast_cancer", "diabetes"]


def digits(test_fraction: float, image_shape: list[int], num_classes: int, batch_size: int, num_workers: int | str,
           loader: str, val_fraction: float, split_seed: int, mean: list[float], std: list[float],
           random_crop_padding: int, horizontal_flip: bool, drop_last: bool | str = "auto") -> Data:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): real data that needs no network."""
    pixels, labels = _digits()
    x = torch.from_numpy(np.round(pixels * 255 / 16)).to(torch.uint8).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(labels)
    carving = Carving(val_fraction, split_seed, test_fraction)
    rest, test = carving.test(y)
    return Images("digits", x[rest], y[rest], x[test], y[test]).data(
        (image_shape, num_classes), Loading(batch_size, num_workers, loader, drop_last), carving,
        Scaling(tuple(mean), tuple(std)), CropFlip.of(random_crop_padding, horizontal_flip))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits' pixels (N, 8, 8), 0 to 16, and labels, as scikit-learn's load_digits gives them: read from the
    file scikit-learn ships, without importing scikit-learn (and SciPy) for it; through load_digits where that
    file is not found."""
    spec = find_spec("sklearn")
    path = Path(next(iter(spec.submodule_search_locations)), "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")  # (N, 65): 64 pixels, then the label
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def mnist(root: str, download: bool, image_shape: list[int], num_classes: int, batch_size: int,
          num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
          std: list[float], random_crop_padding: int, horizontal_flip: bool, drop_last: bool | str = "auto") -> Data:
    """MNIST in torchvision's layout: <root>/MNIST/raw/*-ubyte."""
    from torchvision.datasets import MNIST

    return idx_files(MNIST, "mnist", root, download).data(
        (image_shape, num_classes), Loading(batch_size, num_workers, loader, drop_last),
        Carving(val_fraction, split_seed), Scaling(tuple(mean), tuple(std)),
        CropFlip.of(random_crop_padding, horizontal_flip))


def fashion_mnist(root: str, download: bool, image_shape: list[int], num_classes: int, batch_size: int,
                  num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
                  std: list[float], random_crop_padding: int, horizontal_flip: bool,
                  drop_last: bool | str = "auto") -> Data:
    """Fashion-MNIST in torchvision's layout: <root>/FashionMNIST/raw/*-ubyte."""
    from torchvision.datasets import FashionMNIST

    return idx_files(FashionMNIST, "fashion_mnist", root, download).data(
        (image_shape, num_classes), Loading(batch_size, num_workers, loader, drop_last),
        Carving(val_fraction, split_seed), Scaling(tuple(mean), tuple(std)),
        CropFlip.of(random_crop_padding, horizontal_flip))


def cifar10(root: str, download: bool, image_shape: list[int], num_classes: int, batch_size: int,
            num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
            std: list[float], random_crop_padding: int, horizontal_flip: bool, drop_last: bool | str = "auto") -> Data:
    """CIFAR-10 in torchvision's layout: <root>/cifar-10-batches-py/."""
    from torchvision.datasets import CIFAR10

    return cifar(CIFAR10, "cifar10", root, download, "labels").data(
        (image_shape, num_classes), Loading(batch_size, num_workers, loader, drop_last),
        Carving(val_fraction, split_seed), Scaling(tuple(mean), tuple(std)),
        CropFlip.of(random_crop_padding, horizontal_flip))


def cifar100(root: str, download: bool, image_shape: list[int], num_classes: int, batch_size: int,
             num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
             std: list[float], random_crop_padding: int, horizontal_flip: bool, drop_last: bool | str = "auto") -> Data:
    """CIFAR-100 (fine labels) in torchvision's layout: <root>/cifar-100-python/."""
    from torchvision.datasets import CIFAR100

    return cifar(CIFAR100, "cifar100", root, download, "fine_labels").data(
        (image_shape, num_classes), Loading(batch_size, num_workers, loader, drop_last),
        Carving(val_fraction, split_seed), Scaling(tuple(mean), tuple(std)),
        CropFlip.of(random_crop_padding, horizontal_flip))


def fake(train_size: int, test_size: int, image_shape: list[int], num_classes: int, batch_size: int,
         num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
         std: list[float], random_crop_padding: int, horizontal_flip: bool, drop_last: bool | str = "auto") -> Data:
    """torchvision's FakeData: random images of any (C, H, W) and class count, for smoke runs and benchmarks."""
    from torchvision.datasets import FakeData
    from torchvision.transforms import v2

    def make(size: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds = FakeData(size, tuple(image_shape), num_classes, transform=v2.PILToTensor(), random_offset=offset)
        pairs = [ds[i] for i in range(size)]
        return torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs])

    return Images("fake", *make(train_size, 0), *make(test_size, train_size)).data(
        (image_shape, num_classes), Loading(batch_size, num_workers, loader, drop_last),
        Carving(val_fraction, split_seed), Scaling(tuple(mean), tuple(std)),
        CropFlip.of(random_crop_padding, horizontal_flip))


def imagefolder(root: str, image_size: int, channels: int, test_fraction: float, batch_size: int,
                num_workers: int | str, loader: str, val_fraction: float, split_seed: int, mean: list[float],
                std: list[float], random_crop_padding: int, horizontal_flip: bool,
                drop_last: bool | str = "auto") -> Data:
    """A user's own images: <root>/{train,val,test}/<class>/*.png|jpg; val/ and test/ are optional."""
    train, val, test, classes = read_image_folder(root, (channels, image_size), Carving(val_fraction, split_seed,
                                                                                         test_fraction),
                                                  CropFlip.of(random_crop_padding, horizontal_flip))
    return Data(train, val, test, "multiclass", (channels, image_size, image_size), len(classes),
                Loading(batch_size, num_workers, loader, drop_last), Scaling(tuple(mean), tuple(std)))


def breast_cancer(batch_size: int, num_workers: int | str, loader: str, val_fraction: float, test_fraction: float,
                  split_seed: int, drop_last: bool | str = "auto") -> Data:
    """scikit-learn's Wisconsin breast cancer table (569 x 30): binary classification."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    return table(bunch.data, bunch.target, "binary", Loading(batch_size, num_workers, loader, drop_last),
                 Carving(val_fraction, split_seed, test_fraction), list(bunch.target_names))


def diabetes(batch_size: int, num_workers: int | str, loader: str, val_fraction: float, test_fraction: float,
             split_seed: int, drop_last: bool | str = "auto") -> Data:
    """scikit-learn's diabetes table (442 x 10): regression of disease progression."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    return table(bunch.data, bunch.target, "regression", Loading(batch_size, num_workers, loader, drop_last),
                 Carving(val_fraction, split_seed, test_fraction))
