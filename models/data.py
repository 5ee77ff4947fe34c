"""Data sets in torchvision's layout (MNIST, FashionMNIST, KMNIST, CIFAR10, CIFAR100) and
ImageFolder layouts (Flowers-17, CUB-200), as tensors in [0, 1] plus the model's normalisation.

Nothing is downloaded unless ``download=True`` is passed explicitly. ImageFolder data sets are
expected at ``<root>/<folder>/{train,test}/<class name>/<image>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets, transforms

DATA_ROOT_ENV = "DD_DATA_ROOT"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a data set: shape, normalisation, class names."""

    name: str
    folder: str  # where the files live under the data root
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_arch: str
    torchvision_class: type | None = None  # None: ImageFolder layout
    classes: tuple[str, ...] | None = None  # None: read from the ImageFolder

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "mnist", "MNIST/raw", 1, 28, (0.1307,), (0.3081,), "lenet", datasets.MNIST, tuple(str(d) for d in range(10))
        ),
        DatasetSpec(
            "fashionmnist",
            "FashionMNIST/raw",
            1,
            28,
            (0.2860,),
            (0.3530,),
            "lenet",
            datasets.FashionMNIST,
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        ),
        DatasetSpec(
            "kmnist",
            "KMNIST/raw",
            1,
            28,
            (0.1918,),
            (0.3483,),
            "lenet",
            datasets.KMNIST,
            ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        ),
        DatasetSpec(
            "cifar10",
            "cifar-10-batches-py",
            3,
            32,
            (0.4914, 0.4822, 0.4465),
            (0.2470, 0.2435, 0.2616),
            "wrn16_4",
            datasets.CIFAR10,
            ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        ),
        DatasetSpec(
            "cifar100",
            "cifar-100-python",
            3,
            32,
            (0.5071, 0.4865, 0.4409),
            (0.2673, 0.2564, 0.2762),
            "wrn16_4",
            datasets.CIFAR100,
        ),
        DatasetSpec("flowers17", "flowers17", 3, 224, _IMAGENET_MEAN, _IMAGENET_STD, "resnet18"),
        DatasetSpec("cub200", "cub200", 3, 224, _IMAGENET_MEAN, _IMAGENET_STD, "resnet34"),
    )
}


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are not where we looked; the message says where and how to get them."""


class UnknownDatasetError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_spec(name: str) -> DatasetSpec:
    try:
        return SPECS[name.lower()]
    except KeyError:
        raise UnknownDatasetError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(SPECS))}") from None


def default_data_root() -> Path | None:
    """The data root from ``$DD_DATA_ROOT``, or None when it is not set."""
    value = os.environ.get(DATA_ROOT_ENV)
    return Path(value) if value else None


def resolve_data_root(data_root: str | os.PathLike[str] | None) -> Path:
    root = Path(data_root) if data_root else default_data_root()
    if root is None:
        raise DatasetNotFoundError(f"no data root given: pass --data-root or set ${DATA_ROOT_ENV}")
    return root


def load_split(name: str, data_root: str | os.PathLike[str] | None, split: str, *, download: bool = False) -> Dataset:
    """Images of ``split`` ("train" or "test") as a data set of (C×H×W float in [0, 1], int label)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    spec = get_spec(name)
    root = resolve_data_root(data_root)
    if spec.torchvision_class is None:
        return _image_folder(spec, root, split)
    try:
        ds = spec.torchvision_class(str(root), train=split == "train", download=download)
    except RuntimeError as err:
        raise DatasetNotFoundError(_missing_message(spec, root)) from err
    images = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    x = torch.from_numpy(images).float().div_(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    return TensorDataset(x, y)


def class_names(name: str, data_root: str | os.PathLike[str] | None = None) -> list[str]:
    """The data set's class names in label order (read from the files where they are not fixed)."""
    spec = get_spec(name)
    if spec.classes is not None:
        return list(spec.classes)
    root = resolve_data_root(data_root)
    if spec.torchvision_class is None:
        return list(_image_folder(spec, root, "test").classes)
    try:
        return list(spec.torchvision_class(str(root), train=False, download=False).classes)
    except RuntimeError as err:
        raise DatasetNotFoundError(_missing_message(spec, root)) from err


def _image_folder(spec: DatasetSpec, root: Path, split: str) -> datasets.ImageFolder:
    folder = root / spec.folder / split
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"{spec.name}: no folder {folder}. Expected ImageFolder layout "
            f"{root / spec.folder}/{{train,test}}/<class name>/<image files>; prepare it from the "
            f"official archive (this project never downloads {spec.name})."
        )
    if split == "train":
        tf = transforms.Compose(
            [transforms.RandomResizedCrop(spec.size), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
        )
    else:
        tf = transforms.Compose(
            [transforms.Resize(spec.size * 8 // 7), transforms.CenterCrop(spec.size), transforms.ToTensor()]
        )
    rgb = transforms.Lambda(lambda img: img.convert("RGB"))
    return datasets.ImageFolder(str(folder), transform=transforms.Compose([rgb, tf]))


def _missing_message(spec: DatasetSpec, root: Path) -> str:
    return (
        f"{spec.name}: data set files not found under {root / spec.folder}. Place them there in "
        f"torchvision's layout, or pass --download to fetch them (needs internet access)."
    )
