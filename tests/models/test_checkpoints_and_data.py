from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.files import flip_last_byte
from support.idx import stand_in_mnist

from deepdefense.cli import main as cli
from deepdefense.models import CheckpointError, load_checkpoint
from deepdefense.models.data import DatasetNotFoundError, class_names, load_split
from deepdefense.models.train import evaluate


def _square(image: np.ndarray, c: int) -> None:
    r, col = divmod(c, 5)
    image[4 + 10 * r : 12 + 10 * r, 2 + 5 * col : 6 + 5 * col] = 255


@pytest.fixture()
def tiny_mnist(tmp_path: Path) -> Path:
    """A 200/50-image stand-in in MNIST's raw layout: class c is a bright square at position c."""
    return stand_in_mnist(tmp_path, (200, 50), _square)


def _train(root: Path, out: Path, seed: int = 3) -> dict:
    argv = [
        "train",
        "--arch",
        "lenet",
        "--dataset",
        "mnist",
        "--data-root",
        str(root),
        "--save",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--seed",
        str(seed),
        "--device",
        "cpu",
    ]
    assert cli(argv) == 0
    return json.loads(out.with_suffix(".json").read_text())


def test_train_writes_weights_and_metadata_and_is_repeatable(tiny_mnist: Path, tmp_path: Path) -> None:
    meta = _train(tiny_mnist, tmp_path / "a" / "m")
    assert meta["arch"] == "lenet" and meta["dataset"] == "mnist"
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["input_shape"] == [1, 28, 28] and meta["mean"] == [0.1307] and meta["std"] == [0.3081]
    assert meta["seed"] == 3 and meta["command"].startswith("deepdefense train --arch lenet")
    assert 0.0 <= meta["test_accuracy"] <= 100.0
    again = _train(tiny_mnist, tmp_path / "b" / "m")
    assert again["sha256"] == meta["sha256"], "same seed, same data: same weights"
    model, loaded = load_checkpoint(tmp_path / "a" / "m.json", arch="lenet")
    assert loaded.sha256 == meta["sha256"]
    test = load_split("mnist", tiny_mnist, "test")
    assert evaluate(model, test, torch.device("cpu")) == pytest.approx(meta["test_accuracy"], abs=0.01)


def test_load_refuses_tampered_weights(tiny_mnist: Path, tmp_path: Path) -> None:
    _train(tiny_mnist, tmp_path / "m")
    weights = tmp_path / "m.safetensors"
    flip_last_byte(weights)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "m.json")


def test_load_refuses_a_mismatching_architecture(tiny_mnist: Path, tmp_path: Path) -> None:
    _train(tiny_mnist, tmp_path / "m")
    with pytest.raises(CheckpointError, match="holds architecture 'lenet', expected 'resnet18'"):
        load_checkpoint(tmp_path / "m.json", arch="resnet18")
    meta_path = tmp_path / "m.json"
    meta = json.loads(meta_path.read_text())
    meta["arch"] = "wrn16_4"  # metadata lies about what the weights are
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit architecture 'wrn16_4'"):
        load_checkpoint(meta_path)


def test_unknown_checkpoint_names_the_shipped_ones() -> None:
    with pytest.raises(CheckpointError, match="lenet-mnist"):
        load_checkpoint("no-such-model")


def test_missing_data_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "KMNIST")):
        load_split("kmnist", tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match="--download"):
        load_split("cifar10", tmp_path, "test")
    with pytest.raises(DatasetNotFoundError, match="flowers17"):
        load_split("flowers17", tmp_path, "test")


def test_cli_reports_missing_data_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli(
        ["train", "--arch", "lenet", "--dataset", "mnist", "--data-root", str(tmp_path), "--save", str(tmp_path / "x")]
    )
    assert rc == 2
    assert str(tmp_path / "MNIST") in capsys.readouterr().err


def test_image_folder_stand_in(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in ("daisy", "tulip"):
            folder = tmp_path / "flowers17" / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("L", (300, 260), color=40 * i).save(folder / f"{i}.png")
    test = load_split("flowers17", tmp_path, "test")
    x, y = test[3]
    assert x.shape == (3, 224, 224) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and y == 1
    assert load_split("flowers17", tmp_path, "train")[0][0].shape == (3, 224, 224)
    assert class_names("flowers17", tmp_path) == ["daisy", "tulip"]


@pytest.mark.parametrize(("name", "minimum"), [("lenet-mnist", 99.0), ("lenet-fashionmnist", 89.0)])
def test_shipped_checkpoint_accuracy(name: str, minimum: float, data_root: Path) -> None:
    model, meta = load_checkpoint(name)
    accuracy = evaluate(model, load_split(meta.dataset, data_root, "test"), torch.device("cpu"))
    assert accuracy >= minimum
    assert accuracy == pytest.approx(meta.test_accuracy, abs=0.01)


def test_the_foreign_data_set_is_the_first_other_one_of_the_same_shape_present(tiny_mnist: Path) -> None:
    from deepdefense.models.data import foreign_dataset

    with pytest.raises(ValueError, match="give --ood-dataset"):
        foreign_dataset("mnist", tiny_mnist)
    shutil.copytree(tiny_mnist / "MNIST", tiny_mnist / "FashionMNIST")
    assert foreign_dataset("mnist", tiny_mnist) == "fashionmnist"
    assert foreign_dataset("fashionmnist", tiny_mnist) == "mnist"
