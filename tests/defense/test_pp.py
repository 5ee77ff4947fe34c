"""Prediction Poisoning (MAD): argmax kept, ‖ỹ − y‖₁ ≤ ε, answers on the simplex, and more angular
deviation than random feasible perturbations; the batched Jacobian matches the closed form."""

from __future__ import annotations

import pytest
import torch
from support.numerics import PATH_ATOL, top1_margin
from torch import nn

from deepdefense.defense.baselines.pp import (
    PredictionPoisoning,
    angular_deviation,
    last_linear,
    log_prob_jacobian,
    mix_towards,
)
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.models.checkpoint import load_checkpoint
from deepdefense.models.data import load_split

EPSILON = 0.5


@pytest.fixture(scope="module")
def pp() -> PredictionPoisoning:
    model, meta = load_checkpoint("lenet-mnist")
    model.requires_grad_(False)
    return PredictionPoisoning(model, create_interpreter("gradcam", model, tuple(meta.input_shape)), epsilon=EPSILON)


@pytest.fixture(scope="module")
def queries(data_root) -> torch.Tensor:
    """Attacker-like (Fashion-MNIST) and benign (MNIST) queries."""
    fashion = load_split("fashionmnist", data_root, "test").tensors[0][:12]
    digits = load_split("mnist", data_root, "test").tensors[0][:4]
    return torch.cat([fashion, digits])


def test_constraints_hold_on_every_query(pp: PredictionPoisoning, queries: torch.Tensor) -> None:
    answers = pp.answer(queries, explain=True)
    with torch.no_grad():
        y = pp.model(queries).softmax(-1)
    y_tilde = torch.stack([a.probabilities for a in answers])
    # labels compared exactly: y comes from another path than PP's own victim answer, but every top-1
    # leads its runner-up by far more than rounding could move it
    assert top1_margin(y).min() > 100 * PATH_ATOL, "a near-tie: the top-1 may differ by path"
    assert torch.equal(y_tilde.argmax(-1), y.argmax(-1))
    assert [a.label for a in answers] == y.argmax(-1).tolist()
    # 1e-6: y_tilde is float64 cast to float32, y another float32 path; ten entries off by ~1 ulp each
    assert torch.all((y_tilde - y).abs().sum(-1) <= EPSILON + 1e-6)
    assert torch.all(y_tilde >= 0) and torch.allclose(y_tilde.sum(-1), torch.ones(len(y)), atol=1e-6)
    assert (y_tilde - y).abs().sum(-1).mean() > 0.1  # it does perturb
    victim = pp.victim.answer(queries, explain=True)  # the batch PP answered: the same computation
    for a, v in zip(answers, victim, strict=True):
        assert a.attribution is not None and torch.equal(a.attribution, v.attribution), (
            "identity is the property: PP passes the victim's maps through untouched (same batch of 16)"
        )
    assert all(a.attribution is None for a in pp.answer(queries[:2], explain=False))


def test_mad_deviates_more_than_random_feasible_answers(pp: PredictionPoisoning, queries: torch.Tensor) -> None:
    answers = pp.answer(queries, explain=False)
    with torch.no_grad():
        y = pp.model(queries).softmax(-1).double()
    y_tilde = torch.stack([a.probabilities for a in answers]).double()
    G = log_prob_jacobian(pp.surrogate, pp.layer, queries).double()
    mad_dev = angular_deviation(G, y, y_tilde[:, None])[:, 0]
    targets = torch.distributions.Dirichlet(torch.ones(10, dtype=torch.float64)).sample((len(y), 64))
    random_answers = mix_towards(y, targets, EPSILON)
    assert torch.all((random_answers - y[:, None]).abs().sum(-1) <= EPSILON + 1e-9)
    assert torch.all(random_answers.argmax(-1) == y.argmax(-1)[:, None])
    random_dev = angular_deviation(G, y, random_answers)
    assert torch.all(mad_dev >= random_dev.median(-1).values)
    assert mad_dev.mean() > 2 * random_dev.mean()


def test_last_layer_jacobian_matches_the_closed_form(pp: PredictionPoisoning, queries: torch.Tensor) -> None:
    """For a linear output layer z = W h + b, ∂ log F_k/∂(W, b) = (e_k − p) ⊗ [h, 1]."""
    x = queries[:3]
    G = log_prob_jacobian(pp.surrogate, pp.layer, x)
    layer = pp.surrogate.get_submodule(pp.layer)
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        p = pp.surrogate(x).softmax(-1)
    handle.remove()
    h = torch.cat([seen[0], torch.ones(len(x), 1)], 1)
    K = p.shape[1]
    residual = torch.eye(K)[None] - p[:, None, :]  # (B, K, K): row k is e_k − p
    weight = residual[:, :, :, None] * h[:, None, None, :-1]  # (B, K, K, H)
    expected = torch.cat([weight.flatten(2), residual], 2)
    assert last_linear(pp.surrogate) == "net.classifier.fc2"
    assert torch.allclose(G, expected, atol=1e-5)


def test_the_surrogate_is_a_seeded_random_copy(pp: PredictionPoisoning) -> None:
    other = PredictionPoisoning(pp.model, pp.interpreter, surrogate_seed=0)
    third = PredictionPoisoning(pp.model, pp.interpreter, surrogate_seed=1)
    w = pp.surrogate.get_submodule(pp.layer).weight
    assert torch.equal(w, other.surrogate.get_submodule(pp.layer).weight), (
        "identity is the property: the same seed draws the same surrogate"
    )
    # another draw (or the victim's weights) differs everywhere, not by rounding: each weight is
    # ~U(±1/√fan_in) on its own, so the largest difference is of that order (0.09 and 0.15 here)
    assert (w - third.surrogate.get_submodule(pp.layer).weight).abs().max() > 1e-2, "seed 1 drew seed 0's surrogate"
    assert (w - pp.model.get_submodule(pp.layer).weight).abs().max() > 1e-2, "the surrogate is the victim's layer"
    assert pp.public_settings() == {
        "epsilon": EPSILON,
        "surrogate": "random init (seed 0)",
        "layer": pp.layer,
    }
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        PredictionPoisoning(pp.model, pp.interpreter, surrogate=nn.Sequential(nn.Flatten(), nn.Identity()))


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_order_is_kept(queries: torch.Tensor, top_k: int) -> None:
    """Table 4's PP arms: with top_k = k every answer keeps the victim's top-k classes in their order."""
    model, meta = load_checkpoint("lenet-mnist")
    model.requires_grad_(False)
    pp = PredictionPoisoning(
        model, create_interpreter("gradcam", model, tuple(meta.input_shape)), epsilon=EPSILON, top_k=top_k
    )
    y_tilde = torch.stack([a.probabilities for a in pp.answer(queries, explain=False)]).double()
    # the victim's probabilities as PP itself computed them (the same batch and path: identity is the
    # property), since the 2nd and 3rd classes of a clear digit lie within 1e-7 of each other
    y = torch.stack([a.probabilities for a in pp.victim.answer(queries, explain=False)]).double()
    order = y.argsort(-1, descending=True)
    assert torch.all(y.gather(-1, order)[:, :top_k].diff(dim=-1) < 0), "an exact tie inside the top-k"
    assert torch.equal(y_tilde.argsort(-1, descending=True)[:, :top_k], order[:, :top_k])
    kept = y_tilde.gather(-1, order)
    assert torch.all(kept[:, top_k - 1 : top_k] > kept[:, top_k:]), "s_k must stay above every other class"
    assert torch.all((y_tilde - y).abs().sum(-1) <= EPSILON + 1e-6)
    assert pp.public_settings().get("top_k", 1) == top_k


def test_mix_towards_keeps_the_top_three_order_on_a_hand_case() -> None:
    y = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    towards_last = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]], dtype=torch.float64)
    one = mix_towards(y, towards_last, epsilon=2.0, top_k=1)[0, 0]
    three = mix_towards(y, towards_last, epsilon=2.0, top_k=3)[0, 0]
    assert one.argmax() == 0 and one[3] > one[2]  # k = 1 lets class 3 pass classes 1 and 2
    # k = 3: class 3 may rise only until it meets class 2 (0.15 − α·0.15 = 0.05 + α·0.95 → α = 0.1 / 1.1)
    assert three[2] > three[3] and torch.isclose(three[2], three[3], atol=1e-3)
