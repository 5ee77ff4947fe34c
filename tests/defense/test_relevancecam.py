"""Relevance-CAM: map properties, a hand-derived case, conservation, LRP-0 = gradient⊙input on
bias-free non-negative residual nets, differentiability in ``params``, ``vmap`` and residual tops."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from deepdefense.defense.interpreters import RelevanceCAM, create_interpreter
from deepdefense.defense.interpreters.probe import probe
from deepdefense.defense.interpreters.relevancecam import Unit, activation_relevance, top_units
from deepdefense.models import CheckpointMeta, Normalized, create_model, load_checkpoint
from deepdefense.models.checkpoint import build_model

K = 5


class Tiny(nn.Module):
    """conv → ReLU (the CAM layer) → global average pool → flatten → linear."""

    cam_layer = "relu"

    def __init__(self, kernel: int = 1, channels: int = 2, classes: int = 3, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, kernel, bias=bias)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


def _lenet() -> Normalized:
    meta = CheckpointMeta(
        arch="lenet",
        dataset="mnist",
        classes=[str(i) for i in range(K)],
        input_shape=[1, 28, 28],
        mean=[0.1307],
        std=[0.3081],
        test_accuracy=0.0,
        seed=0,
        command="",
    )
    return build_model(meta).eval()


def _residual(arch: str, cam_layer: str, shape: tuple[int, ...]) -> Normalized:
    net = create_model(arch, num_classes=K, in_channels=shape[0])
    net.cam_layer = cam_layer
    return Normalized(net, [0.5] * shape[0], [0.25] * shape[0]).eval()


def _relevance(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: int) -> tuple[Tensor, Tensor, Tensor]:
    """(A(x), logits, Contrastive-LRP relevance at A(x)) from one traced forward."""
    with torch.no_grad(), probe(model, model.cam_layer, trace=True) as rec:
        logits = model(x)
        return rec.activation, logits, activation_relevance(rec, params, logits, y)


def _check_map(attribution: Tensor, size: tuple[int, int]) -> None:
    assert attribution.shape == size
    assert torch.isfinite(attribution).all()
    assert attribution.min() >= 0
    assert attribution.max().item() == pytest.approx(1.0, abs=1e-5)


def test_registered_by_name() -> None:
    interp = create_interpreter("relevancecam", _lenet(), (1, 28, 28))
    assert isinstance(interp, RelevanceCAM) and interp.needs_trace


def test_lenet_map_is_a_normalised_heatmap() -> None:
    model = _lenet()
    interp = create_interpreter("relevancecam", model, (1, 28, 28))
    _check_map(interp.explain(dict(model.named_parameters()), torch.rand(1, 1, 28, 28), 3).attribution[0], (28, 28))


def test_shipped_lenet_checkpoint() -> None:
    model, meta = load_checkpoint("lenet-mnist")
    model.eval()
    interp = create_interpreter("relevancecam", model, tuple(meta.input_shape))
    x = torch.rand(1, *meta.input_shape)
    y = int(model(x).argmax())
    _check_map(interp.explain(dict(model.named_parameters()), x, y).attribution[0], (28, 28))


def test_hand_derived_tiny_net() -> None:
    """A = (x, 2x), pooled p = (1.5, 3); W = [[1, 1], [2, -1], [-1, 3]], y = 2, K = 3.

    Start R = (-1/3, -1/3, 1). z⁺ rule at the linear layer: z⁺ = (4.5, 3, 9), so
    R_p0 = 1.5·(1·(-1/3)/4.5 + 2·(-1/3)/3) = -4/9 and R_p1 = 3·(1·(-1/3)/4.5 + 3·1/9) = 7/9.
    z-rule at the pool: R^k_ij = A^k_ij / (4 p_k) · R_pk, so α = (-4/9, 7/9) and the map is
    ReLU(-4/9·x + 7/9·2x) = 10/9·x, normalised x / 3.
    """
    model = Tiny()
    with torch.no_grad():
        model.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        model.fc.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, -1.0], [-1.0, 3.0]]))
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]]).view(1, 1, 2, 2)
    params = dict(model.named_parameters())
    interp = RelevanceCAM(model, (1, 2, 2))

    activation, _, relevance = _relevance(model, params, x, 2)
    torch.testing.assert_close(relevance[0, 0], x[0, 0] * (-2 / 27), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(relevance[0, 1], x[0, 0] * (7 / 54), atol=1e-6, rtol=1e-5)
    alpha = interp.channel_weights(activation, torch.zeros(()), relevance)
    torch.testing.assert_close(alpha, torch.tensor([[-4 / 9, 7 / 9]]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(interp.explain(params, x, 2).attribution[0], x[0, 0] / 3, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("build", [lambda: Tiny(kernel=3, channels=8, classes=K), _lenet], ids=["tiny", "lenet"])
def test_relevance_is_conserved(build: Callable[[], nn.Module]) -> None:
    """Biases stay out of the denominators, so Σ R_A = Σ R_out = 1 - (K-1)/K = 1/K."""
    model = build()
    shape = (1, 10, 10) if isinstance(model, Tiny) else (1, 28, 28)
    _, logits, relevance = _relevance(model, dict(model.named_parameters()), torch.rand(1, *shape), 1)
    assert relevance.sum().item() == pytest.approx(1 / logits.shape[-1], rel=1e-4)


def _non_negative_bias_free(model: nn.Module) -> None:
    """Weights |w|, batch norms with positive scales and no shift (γ > 0, β = 0, mean 0)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.abs_()
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2.0)
                module.bias.zero_()
                module.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize(
    ("arch", "cam_layer", "shape"), [("resnet18", "layer3", (3, 64, 64)), ("wrn16_4", "blocks.3", (3, 32, 32))]
)
def test_residual_top_matches_gradient_times_input(arch: str, cam_layer: str, shape: tuple[int, ...]) -> None:
    """With non-negative weights, bias-free convs and shift-free batch norms every rule reduces to the
    z-rule, and LRP-0 from the start vector c is A ⊙ ∂(Σ_j v_j f_j)/∂A with v = c / (f - b_fc) held
    fixed: an independent check of the residual split, both branches and torchvision's in-place ops."""
    model = _residual(arch, cam_layer, shape)
    _non_negative_bias_free(model)
    x = torch.rand(1, *shape)
    activation, logits, relevance = _relevance(model, dict(model.named_parameters()), x, 2)
    assert [u.entry.name for u in _units(model, x) if u.children] == [f"net.{n}" for n in _TOP_BLOCKS[arch]]

    c = torch.full((K,), -1 / K)
    c[2] = 1.0
    v = c / (logits[0] - model.net.fc.bias)
    delta = torch.zeros_like(activation, requires_grad=True)
    with probe(model, model.cam_layer, delta):
        score = (model(x)[0] * v).sum()
    expected = activation * torch.autograd.grad(score, delta)[0]
    torch.testing.assert_close(relevance, expected, rtol=1e-4, atol=1e-9)


_TOP_BLOCKS = {"resnet18": ["layer4.0", "layer4.1"], "wrn16_4": ["blocks.4", "blocks.5"]}


def _units(model: nn.Module, x: Tensor) -> list[Unit]:
    with torch.no_grad(), probe(model, model.cam_layer, trace=True) as rec:
        model(x)
    return top_units(rec)


def test_probe_trace_is_backwards_compatible() -> None:
    """The leaf trace is unchanged; composite modules after the CAM layer land in ``blocks``, ancestors do not."""
    model = _residual("resnet18", "layer3", (3, 64, 64))
    with torch.no_grad(), probe(model, model.cam_layer, trace=True) as rec:
        model(torch.rand(1, 3, 64, 64))
    leaves = [
        n
        for n, m in model.named_modules()
        if n.startswith(("net.layer4", "net.avgpool", "net.fc")) and not list(m.children())
    ]
    assert sorted({e.name for e in rec.trace}) == sorted(leaves)
    assert [b.name for b in rec.blocks] == ["net.layer4.0.downsample", "net.layer4.0", "net.layer4.1", "net.layer4"]
    lenet = _lenet()
    with torch.no_grad(), probe(lenet, lenet.cam_layer, trace=True) as rec:
        lenet(torch.rand(1, 1, 28, 28))
    assert [e.name.split(".")[-1] for e in rec.trace] == ["pool2", "flatten", "fc1", "relu3", "dropout", "fc2"]
    assert [b.name for b in rec.blocks] == ["net.classifier"]


def test_resnet_with_residual_blocks_on_top_gives_a_map() -> None:
    model = _residual("resnet18", "layer3", (3, 64, 64))
    interp = create_interpreter("relevancecam", model, (3, 64, 64))
    attribution = interp.explain(dict(model.named_parameters()), torch.rand(1, 3, 64, 64), 1).attribution[0]
    _check_map(attribution, (64, 64))
    assert attribution.std() > 1e-3


def test_cam_layer_inside_a_residual_block_is_refused() -> None:
    with pytest.raises(ValueError, match="outside residual block"):
        RelevanceCAM(_residual("resnet18", "layer4.0.conv2", (3, 64, 64)), (3, 64, 64))


def test_weights_come_from_params() -> None:
    """Explaining with another model's parameters equals explaining that model."""
    victim = _lenet()
    clone = copy.deepcopy(victim)
    with torch.no_grad():
        for p in clone.net.classifier.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(1, 1, 28, 28)
    via_params = RelevanceCAM(victim, (1, 28, 28)).explain(dict(clone.named_parameters()), x, 4).attribution[0]
    direct = RelevanceCAM(clone, (1, 28, 28)).explain(dict(clone.named_parameters()), x, 4).attribution[0]
    own = RelevanceCAM(victim, (1, 28, 28)).explain(dict(victim.named_parameters()), x, 4).attribution[0]
    torch.testing.assert_close(via_params, direct, atol=1e-6, rtol=1e-5)
    assert (via_params - own).abs().max() > 1e-3


def test_map_is_differentiable_in_params() -> None:
    model = _lenet()
    interp = RelevanceCAM(model, (1, 28, 28))
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.rand(1, 1, 28, 28)
    grads = grad(lambda p: interp.explain(p, x, 7 % K).attribution[0].sum())(params)
    for name in ("net.classifier.fc1.weight", "net.classifier.fc2.weight", "net.features.conv2.weight"):
        assert torch.isfinite(grads[name]).all()
        assert grads[name].abs().sum() > 0


def test_gradient_matches_finite_differences() -> None:
    torch.manual_seed(1)
    model = Tiny(kernel=3, channels=4, classes=K, bias=True)
    interp = RelevanceCAM(model, (1, 8, 8))
    model.double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    loss = lambda p: (interp.explain(p, x, 2).attribution[0] * torch.linspace(0, 1, 64, dtype=x.dtype).view(8, 8)).sum()
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    analytic = sum((g * direction[n]).sum() for n, g in grad(loss)(params).items())
    h = 1e-6
    shifted = lambda t: loss({n: p + t * direction[n] for n, p in params.items()})
    numeric = (shifted(h) - shifted(-h)) / (2 * h)
    assert analytic.item() == pytest.approx(numeric.item(), rel=1e-4, abs=1e-8)


def test_vmap_matches_loop() -> None:
    model = _lenet()
    interp = RelevanceCAM(model, (1, 28, 28))
    params = dict(model.named_parameters())
    xs, ys = torch.rand(3, 1, 1, 28, 28), torch.tensor([0, 3, 4])
    batched = vmap(lambda x, y: interp.explain(params, x, y).attribution[0])(xs, ys)
    looped = torch.stack([interp.explain(params, x, int(y)).attribution[0] for x, y in zip(xs, ys, strict=True)])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=0)
