"""Data sets in torchvision's layout (MNIST, FashionMNIST, KMNIST, CIFAR10, CIFAR100) and
ImageFolder layouts (Flowers-17, CUB-200), as tensors in [0, 1] plus the model's normalisation.

Nothing is downloaded unless ``download=True`` is passed explicitly. ImageFolder data sets are
expected at ``<root>/<folder>/{train,test}/<class name>/<image>``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets, transforms

DATA_ROOT_ENV = "DD_DATA_ROOT"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetLook:
    """What the data set's images look like, for whoever sends a model trained on it an image (the server's
    model card, ``server/card.py``): the subject of one image, which side is dark, how the images were made,
    and inputs such a model is not meant for. A checkpoint's metadata may override any of these
    (``extra["card"]``, read by ``look_of``)."""

    subject: str
    background: str  # "dark": light content on a dark background; "light": the reverse; "any": natural photos
    polarity: str
    appearance: str
    not_for: tuple[str, ...] = ()


_NATURAL_PHOTOS = DatasetLook(
    subject="",
    background="any",
    polarity="natural colour photos, as a camera takes them (nothing inverted)",
    appearance="",
    not_for=("drawings, text or several subjects in one image", "images of classes outside the data set's"),
)


def _photos(subject: str, appearance: str) -> DatasetLook:
    return replace(_NATURAL_PHOTOS, subject=subject, appearance=appearance)


_CIFAR = "RGB 32×32 (Krizhevsky, 2009)"

MNIST_LOOK = DatasetLook(
    subject="one handwritten digit, 0 to 9",
    background="dark",
    polarity="light strokes on a dark background: the background is 0 (black), the strokes up to 1 (white)",
    appearance="grayscale 28×28; each digit was size-normalised to fit a 20×20 box (aspect ratio kept), "
    "anti-aliased and centred by its centre of mass, leaving a margin of about 4 pixels (LeCun et al., 1998)",
    not_for=(
        "dark strokes on a light background (ink on paper, a photographed page) sent without invert: true",
        "photos of scenes, faces or objects",
        "letters, symbols, words or signatures",
        "several digits in one image (a number, a date, a code)",
        "a digit that fills the whole image edge to edge, or sits in a corner or at an edge",
        "photos with uneven light, shadows or a grey paper background (invert makes grey paper dark grey, not black)",
    ),
)

FASHION_MNIST_LOOK = DatasetLook(
    subject="one fashion product alone: a garment, a shoe or a bag of the ten classes",
    background="dark",
    polarity="a light item on a dark background: the background is 0 (black), the item brighter (the white-"
    "background product photos were negated)",
    appearance="grayscale 28×28; Zalando product photos trimmed, resized so that the longest edge is 28 pixels, "
    "sharpened, centred and negated (Xiao et al., 2017)",
    not_for=(
        "items on a light background (a product photo as shops show it) sent without invert: true",
        "people wearing clothes, or several items in one image",
        "handwritten digits, letters or drawings",
        "products of other kinds than the ten classes",
    ),
)

KMNIST_LOOK = DatasetLook(
    subject="one handwritten Kuzushiji (cursive Japanese) character of ten hiragana",
    background="dark",
    polarity="light strokes on a dark background, as MNIST",
    appearance="grayscale 28×28, in MNIST's format (Clanuwat et al., 2018)",
    not_for=("dark strokes on a light background sent without invert: true", "other characters, digits or photos"),
)


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a data set: shape, normalisation, class names, and what its images
    look like."""

    name: str
    folder: str  # where the files live under the data root
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_arch: str
    torchvision_class: type | None = None  # None: ImageFolder layout
    classes: tuple[str, ...] | None = None  # None: read from the ImageFolder
    look: DatasetLook | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "mnist",
            "MNIST/raw",
            1,
            28,
            (0.1307,),
            (0.3081,),
            "lenet",
            datasets.MNIST,
            tuple(str(d) for d in range(10)),
            MNIST_LOOK,
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
            FASHION_MNIST_LOOK,
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
            KMNIST_LOOK,
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
            _photos("a small colour photo of one object or animal of the ten classes", _CIFAR),
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
            look=_photos(
                "a small colour photo of one object or animal of the 100 classes", "RGB 32×32 (Krizhevsky, 2009)"
            ),
        ),
        DatasetSpec(
            "flowers17",
            "flowers17",
            3,
            224,
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            "resnet18",
            look=_photos("a colour photo of one flower of the 17 species", "RGB photos, served at 224×224"),
        ),
        DatasetSpec(
            "cub200",
            "cub200",
            3,
            224,
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            "resnet34",
            look=_photos("a colour photo of one bird of the 200 species", "RGB photos, served at 224×224"),
        ),
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


def look_of(dataset: str, override: Mapping[str, Any] | None = None) -> DatasetLook | None:
    """What ``dataset``'s images look like (its spec's :class:`DatasetLook`), with the fields of ``override``
    (a checkpoint's ``extra["card"]``) in their place; None for a data set this module does not describe and
    no complete override. An override field that :class:`DatasetLook` does not have is a ``ValueError``."""
    override = dict(override or {})
    unknown = set(override) - {f.name for f in fields(DatasetLook)}
    if unknown:
        raise ValueError(f"unknown model card fields {sorted(unknown)}; known: {[f.name for f in fields(DatasetLook)]}")
    if "not_for" in override:
        override["not_for"] = tuple(override["not_for"])
    spec = SPECS.get(dataset.lower())
    base = spec.look if spec is not None else None
    if base is None:
        try:
            return DatasetLook(**override)
        except TypeError:  # incomplete: nothing to say rather than half a card
            return None
    return replace(base, **override)


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


def foreign_dataset(name: str, data_root: str | os.PathLike[str] | None) -> str:
    """The first other data set of ``name``'s input shape present under the data root: the foreign images a
    victim's out-of-domain figures are measured on (``deepdefense prepare``'s default ``--ood-dataset``)."""
    own = get_spec(name)
    for spec in SPECS.values():
        if spec.name != own.name and spec.input_shape == own.input_shape:
            try:
                load_split(spec.name, data_root, "test")
            except DatasetNotFoundError:
                continue
            return spec.name
    raise ValueError(f"no other data set of {own.name}'s input shape under the data root: give --ood-dataset")
