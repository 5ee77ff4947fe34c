from __future__ import annotations

import pytest
import torch

from deepdefense.models import UnknownModelError, create_model, list_models
from deepdefense.models.normalized import Normalized

INPUT_SIZES = {"lenet": (1, 28), "wrn16_4": (3, 32), "resnet18": (3, 224), "resnet34": (3, 224)}


def test_registry_lists_the_papers_architectures() -> None:
    assert set(INPUT_SIZES) <= set(list_models())


@pytest.mark.parametrize("name", sorted(INPUT_SIZES))
def test_architecture_forward_at_its_input_size(name: str) -> None:
    channels, size = INPUT_SIZES[name]
    model = create_model(name, num_classes=7, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(INPUT_SIZES))
def test_cam_layer_names_a_4d_activation(name: str) -> None:
    channels, size = INPUT_SIZES[name]
    model = Normalized(
        create_model(name, num_classes=5, in_channels=channels), [0.5] * channels, [0.5] * channels
    ).eval()
    seen: list[torch.Tensor] = []
    model.get_submodule(model.cam_layer).register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(torch.rand(1, channels, size, size))
    assert len(seen) == 1 and seen[0].ndim == 4 and seen[0].shape[-1] > 1


def test_resnet_accepts_grey_input() -> None:
    model = create_model("resnet18", num_classes=3, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 3)


def test_registry_rejects_unknown_name_clearly() -> None:
    with pytest.raises(UnknownModelError, match=r"unknown architecture 'vgg99'.*lenet"):
        create_model("vgg99", num_classes=10, in_channels=1)
