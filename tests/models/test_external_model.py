"""A model trained elsewhere (``models/external.py``): its description is checked field by field, its weights
against the registered architecture, its value range folded into the normalisation, a TorchScript module taken
only when it computes what the architecture computes; ``deepdefense prepare --from`` converts it once into an
ordinary checkpoint, again when a file changes, and never over a checkpoint it did not convert."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.servers import serving
from support.settings import make_settings
from torch import nn

from deepdefense.cli import main
from deepdefense.models.checkpoint import SHIPPED_DIR, load_checkpoint, read_meta
from deepdefense.models.external import DescriptionError, import_model, is_current, load_network, read_description
from deepdefense.models.lenet import LeNet
from deepdefense.server.app import create_app

MNIST = {
    "arch": "lenet",
    "weights": "weights.pt",
    "dataset": "mnist",
    "input_shape": [1, 28, 28],
    "value_range": [0.0, 1.0],
    "normalisation": {"mean": [0.1307], "std": [0.3081]},
    "classes": [str(d) for d in range(10)],
}


def shipped_state() -> dict[str, torch.Tensor]:
    return load_file(str(SHIPPED_DIR / "lenet-mnist.safetensors"))


def describe(folder: Path, name: str = "model.json", **fields: object) -> Path:
    """``lenet-mnist``'s weights saved with torch.save, and a JSON description of them (``fields`` override)."""
    if not (folder / "weights.pt").is_file():
        torch.save(shipped_state(), folder / "weights.pt")
    desc = {k: v for k, v in {**MNIST, **fields}.items() if v is not None}
    path = folder / name
    path.write_text(json.dumps(desc))
    return path


def test_a_toml_description_gives_the_shipped_model(tmp_path: Path) -> None:
    torch.save(shipped_state(), tmp_path / "weights.pt")
    path = tmp_path / "model.toml"
    classes = ", ".join(f'"{d}"' for d in range(10))
    path.write_text(
        'arch = "lenet"\nweights = "weights.pt"\ndataset = "mnist"\ninput_shape = [1, 28, 28]\n'
        f"value_range = [0.0, 1.0]\nclasses = [{classes}]\n"
        '[normalisation]\nmean = [0.1307]\nstd = [0.3081]\n[card]\nsubject = "one digit, drawn"\n'
    )
    desc = read_description(path)
    assert desc.folded() == ([0.1307], [0.3081]) and desc.card == {"subject": "one digit, drawn"}
    shipped, _ = load_checkpoint("lenet-mnist")
    x = torch.rand(8, 1, 28, 28)
    net = load_network(desc)
    same = "identity is the property: the same float32 operations on the same batch as the shipped network"
    assert torch.equal(net((x - 0.1307) / 0.3081), shipped(x)), same


def test_the_value_range_is_folded_into_the_normalisation(tmp_path: Path) -> None:
    """A model trained on 0..255 values, normalised in those units, reads [0, 1] inputs the same way once
    converted: mean' = (mean − lo) / (hi − lo), std' = std / (hi − lo)."""
    desc = read_description(
        describe(tmp_path, value_range=[0, 255], normalisation={"mean": [0.1307 * 255], "std": [0.3081 * 255]})
    )
    mean, std = desc.folded()
    assert mean == pytest.approx([0.1307]) and std == pytest.approx([0.3081])
    centred = describe(tmp_path, "c.json", value_range=[-1, 1], normalisation={"mean": [0], "std": [1]})
    assert read_description(centred).folded() == ([0.5], [0.5])  # x in [0, 1] → 2x − 1, as it was trained to read


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"classes": None}, "missing field(s) classes"),
        ({"normalisation": None, "value_range": None}, "missing field(s) value_range, normalisation"),
        ({"colour": "grey"}, "unknown field(s) colour"),
        ({"arch": "vgg"}, "arch 'vgg' is not a registered architecture"),
        ({"dataset": "svhn"}, "unknown data set 'svhn'"),
        ({"input_shape": [1, 32, 32]}, "input_shape [1, 32, 32] is not the shape of mnist's images [1, 28, 28]"),
        ({"input_shape": [28, 28]}, "input_shape must be [channels, height, width]"),
        ({"value_range": [1, 0]}, "value_range must be [lo, hi] with lo < hi"),
        ({"normalisation": {"mean": [0.1, 0.1], "std": [0.3, 0.3]}}, "one mean and one std per channel (1)"),
        ({"normalisation": {"mean": [0.1]}}, "normalisation must hold exactly mean and std"),
        ({"normalisation": {"mean": [0.1], "std": [0]}}, "std must be positive"),
        ({"classes": ["a", "b"]}, "classes has 2 names, mnist has 10 labels"),
        ({"card": {"colour": "grey"}}, "card: unknown model card fields ['colour']"),
        ({"format": "onnx"}, "format 'onnx' is not one of state_dict, torchscript"),
    ],
)
def test_a_wrong_description_says_what_is_wrong(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(DescriptionError) as err:
        read_description(describe(tmp_path, **fields))
    assert message in str(err.value) and "model.json" in str(err.value)


def test_weights_that_do_not_fit_the_architecture_are_refused_with_the_tensors_named(tmp_path: Path) -> None:
    torch.save(LeNet(num_classes=10, in_channels=3).state_dict(), tmp_path / "rgb.pt")
    with pytest.raises(DescriptionError) as err:
        load_network(read_description(describe(tmp_path, weights="rgb.pt")))
    assert "features.conv1.weight is (20, 3, 5, 5) in the file, (20, 1, 5, 5) in 'lenet'" in str(err.value)
    state = shipped_state()
    state["head.weight"] = state.pop("classifier.fc2.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(DescriptionError, match=r"missing classifier\.fc2\.weight; unexpected head\.weight"):
        load_network(read_description(describe(tmp_path, weights="renamed.pt")))
    torch.save({"model": shipped_state(), "epoch": 3}, tmp_path / "container.pt")
    with pytest.raises(DescriptionError, match=r"not a state dict of tensors \(save model.state_dict\(\)\)"):
        load_network(read_description(describe(tmp_path, weights="container.pt")))
    with pytest.raises(DescriptionError, match=r"weights file .*missing\.pt not found"):
        load_network(read_description(describe(tmp_path, weights="missing.pt")))


class Doubled(nn.Module):
    """LeNet's tensors under LeNet's names, but another computation (its input doubled)."""

    def __init__(self, net: LeNet) -> None:
        super().__init__()
        self.features, self.classifier = net.features, net.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(2 * x))


def test_a_torchscript_module_is_taken_only_when_it_computes_the_architecture(tmp_path: Path) -> None:
    net = LeNet()
    net.load_state_dict(shipped_state())
    net.eval()
    torch.jit.script(net).save(str(tmp_path / "scripted.pt"))
    desc = read_description(describe(tmp_path, weights="scripted.pt", format="torchscript"))
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(load_network(desc)(x), net(x))
    torch.jit.script(Doubled(net)).save(str(tmp_path / "doubled.pt"))
    with pytest.raises(DescriptionError, match="logits differ from architecture 'lenet'"):
        load_network(read_description(describe(tmp_path, weights="doubled.pt", format="torchscript")))
    with pytest.raises(DescriptionError, match=r"is a TorchScript module: give format = \"torchscript\""):
        load_network(read_description(describe(tmp_path, weights="scripted.pt")))  # format left out


def test_conversion_makes_an_ordinary_checkpoint_and_notices_changed_files(tmp_path: Path, data_root: Path) -> None:
    desc = read_description(describe(tmp_path))
    assert not is_current(tmp_path / "mine.json", desc)
    path = import_model(desc, tmp_path / "mine", data_root=data_root, command="test")
    _, meta = load_checkpoint(path)
    assert meta.test_accuracy == 99.51  # lenet-mnist's, measured again on the 10,000 test digits
    assert meta.sha256 == read_meta(SHIPPED_DIR / "lenet-mnist.json").sha256  # the same weights, byte for byte
    assert meta.extra["imported"]["description"] == "model.json" and meta.seed == -1
    assert is_current(path, desc)
    state = shipped_state()
    state["classifier.fc2.bias"] += 1.0
    torch.save(state, tmp_path / "weights.pt")  # retrained elsewhere
    assert not is_current(path, read_description(tmp_path / "model.json"))
    shutil.copy(SHIPPED_DIR / "lenet-mnist.json", tmp_path / "trained-here.json")
    with pytest.raises(DescriptionError, match="not converted from a description; refusing to overwrite"):
        is_current(tmp_path / "trained-here.json", desc)


def test_prepare_from_a_bad_description_fails_with_its_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = describe(tmp_path, classes=None)
    code = main(["prepare", "--from", str(bad), "--checkpoint", str(tmp_path / "mine"), "--data-root", str(tmp_path)])
    assert code == 2
    assert "deepdefense prepare: error: model.json: missing field(s) classes" in capsys.readouterr().err
    assert not (tmp_path / "mine.json").exists()


def test_the_converted_checkpoint_is_served_with_its_card(tmp_path: Path, data_root: Path, no_server_env: None) -> None:
    """``deepdefense serve --checkpoint <converted>``: a model trained on 0..255 values answers the server's [0, 1]
    pixels as the shipped model does, and its card shows the description's override and the folded normalisation."""
    desc = read_description(
        describe(
            tmp_path,
            value_range=[0, 255],
            normalisation={"mean": [0.1307 * 255], "std": [0.3081 * 255]},
            card={"subject": "one digit written on a tablet"},
        )
    )
    path = import_model(desc, tmp_path / "tablet", data_root=data_root, command="test")
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    shipped, _ = load_checkpoint("lenet-mnist")
    with serving(create_app(make_settings(tmp_path, checkpoint=str(path)))) as client:
        (model,) = client.get("/v1/models").json()["models"]
        answer = client.post("/predict", json={"instances": [{"pixels": xi.tolist()} for xi in x]})
    assert model["card"]["expects"]["subject"] == "one digit written on a tablet"
    assert model["card"]["expects"]["normalisation"]["mean"] == pytest.approx([0.1307])
    labels = [p["label"] for p in answer.json()["predictions"]]
    assert labels == shipped(x).argmax(1).tolist()
