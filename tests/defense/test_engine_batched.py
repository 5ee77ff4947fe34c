"""The batched engine: per-query layers, batched interpreters, factored gradients, and the engine
itself — a batch gives what one query at a time gives, faults stay with their query, early stopping."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from deepdefense.defense import Answer
from deepdefense.defense.engine import DeepDefense, safe_answer
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.defense.loader import load_defense
from deepdefense.defense.per_query import per_query_view
from deepdefense.defense.weight_gradients import inner, norm, weight_gradient
from deepdefense.models.data import load_split
from deepdefense.models.lenet import LeNet

TOLERANCE = 1e-6  # float64: one step (loss, map, gradients) batched vs one query; low-rank vs dense fc1
PATH_TOLERANCE = 1e-3  # float64, 4 steps: answers of a batch of 32 vs one query at a time


def _perturbed(model: nn.Module, names: list[str], batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: params[n].detach() + 0.05 * torch.randn((batch, *params[n].shape), generator=g) for n in names}


@pytest.mark.parametrize("impl", ["unfold", "grouped"])
def test_per_query_layers_match_separate_models(impl: str) -> None:
    torch.manual_seed(0)
    model = LeNet().eval()
    layers = ["features.conv1", "features.conv2", "classifier.fc1"]
    view = per_query_view(model, layers, impl)
    names = [f"{layer}.{p}" for layer in layers for p in ("weight", "bias")]
    params = _perturbed(model, names, 3)
    x = torch.rand(3, 1, 28, 28)
    batched = torch.func.functional_call(view, params, (x,), strict=False)
    for b in range(3):
        own = torch.func.functional_call(model, {n: p[b] for n, p in params.items()}, (x[b : b + 1],), strict=False)
        torch.testing.assert_close(batched[b : b + 1], own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(view(x), model(x))  # shared weights: exactly nn.Conv2d / nn.Linear
    assert all(p is q for p, q in zip(view.parameters(), model.parameters(), strict=True))


@pytest.mark.parametrize("name", ["gradcam", "relevancecam", "gradinput"])
def test_batched_explanations_match_one_query_at_a_time(name: str) -> None:
    torch.manual_seed(1)
    model = LeNet().eval()
    layers = ["features.conv2", "classifier.fc1"]
    batched = create_interpreter(name, per_query_view(model, layers), (1, 28, 28))
    single = create_interpreter(name, model, (1, 28, 28))
    names = [f"{layer}.{p}" for layer in layers for p in ("weight", "bias")]
    params = _perturbed(model, names, 4)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 5, 7, 2])
    e = batched.explain(params, x, y)
    for b in range(4):
        one = single.explain({n: p[b] for n, p in params.items()}, x[b : b + 1], int(y[b]))
        torch.testing.assert_close(e.attribution[b], one.attribution[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(e.logits[b], one.logits[0], atol=1e-5, rtol=1e-5)
        for n in names:
            torch.testing.assert_close(e.param_grads[n][b], one.param_grads[n], atol=1e-5, rtol=1e-4)


def test_factored_linear_gradients_give_the_dense_inner_products() -> None:
    torch.manual_seed(2)
    model = LeNet().eval()
    layers = ["features.conv2", "classifier.fc1", "classifier.fc2"]
    interp = create_interpreter("gradcam", per_query_view(model, layers), (1, 28, 28))
    names = [f"{layer}.{p}" for layer in layers for p in ("weight", "bias")]
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 4, 9])
    a, b = _perturbed(model, names, 3, seed=3), _perturbed(model, names, 3, seed=4)
    dense_a, dense_b = interp.explain(a, x, y), interp.explain(b, x, y)
    fact_a = interp.explain(a, x, y, factored=["classifier.fc1", "classifier.fc2"])
    fact_b = interp.explain(b, x, y, factored=["classifier.fc1", "classifier.fc2"])
    assert "classifier.fc1.weight" not in fact_a.param_grads and "classifier.fc1" in fact_a.factors
    flat_a = torch.cat([dense_a.param_grads[n].flatten(1) for n in names], 1)
    flat_b = torch.cat([dense_b.param_grads[n].flatten(1) for n in names], 1)
    wa, wb = weight_gradient(fact_a, names, 3), weight_gradient(fact_b, names, 3)
    torch.testing.assert_close(inner(wa, wb), (flat_a * flat_b).sum(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(norm(wa), flat_a.norm(dim=1), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def mnist(data_root: Path) -> torch.Tensor:
    return load_split("mnist", data_root, "test").tensors[0][:32]


def _engine(batch_size: int, **options: object) -> DeepDefense:
    defense, _ = load_defense("lenet-mnist", "deepdefense", "gradcam", batch_size=batch_size, **options)
    return defense


def test_batch_of_32_gives_the_one_query_answers(mnist: torch.Tensor) -> None:
    """float64, 4 steps: every one of 32 queries within PATH_TOLERANCE of its one-query answer. One step is
    equal within TOLERANCE (below); along the path, rounding differences of the summation order (batch
    size, threads) are amplified — a step is normalised to a fixed length whatever its gradient's size,
    a max-pool winner can flip between near-equal values — so paths part slowly (docs/design.md)."""
    batched, single = _float64(_engine(32, steps=4)), _float64(_engine(1, steps=4))
    x = mnist.double()
    together, alone = batched.answer(x), single.answer(x)
    assert len(together) == len(alone) == 32
    for a, b in zip(together, alone, strict=True):
        assert a.fallback == b.fallback and a.label == b.label
        torch.testing.assert_close(a.probabilities, b.probabilities, atol=PATH_TOLERANCE, rtol=0)
        torch.testing.assert_close(a.attribution, b.attribution, atol=PATH_TOLERANCE, rtol=0)


def _float64(engine: DeepDefense, **overrides: object) -> DeepDefense:
    """The same engine rebuilt on a float64 copy of its victim (the shipped model stays float32)."""
    model64 = copy.deepcopy(engine.model).double()
    ranks = dict(zip(engine.layers, range(len(engine.layers), 0, -1), strict=True))  # the same layers at CS 100%
    return DeepDefense(
        model64,
        create_interpreter(engine.interpreter.name, model64, engine.interpreter.input_shape),
        sensitivity=ranks,
        config=engine.config,
        cs=100.0,
        **overrides,
    )


def test_low_rank_linear_weights_give_the_dense_iterates(mnist: torch.Tensor) -> None:
    """fc1 kept as W + Σ rank-two steps (defense/low_rank.py) follows the dense solver's path exactly."""
    low = _float64(_engine(8, steps=6))  # longer paths meet max-pool near-ties, where rounding picks the winner
    dense = _float64(low, low_rank=False)
    assert low.low_rank == ["net.classifier.fc1"] and "net.classifier.fc1.weight" in dense.param_names
    noisy = dense.initial_params

    def no_noise_on_fc1(q: torch.Tensor) -> dict[str, torch.Tensor]:  # the low-rank start is W itself
        params = noisy(q)
        params["net.classifier.fc1.weight"] = (
            dense.victim_params()["net.classifier.fc1.weight"].detach().expand(len(q), -1, -1).clone()
        )
        return params

    dense.initial_params = no_noise_on_fc1
    x = mnist[:8].double()
    for a, b in zip(low.answer(x), dense.answer(x), strict=True):
        assert a.fallback == b.fallback
        assert a.stats["l_orth"] == pytest.approx(b.stats["l_orth"], abs=TOLERANCE)
        torch.testing.assert_close(a.probabilities, b.probabilities, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(a.attribution, b.attribution, atol=TOLERANCE, rtol=0)


def test_one_step_of_32_queries_is_each_querys_own_step(mnist: torch.Tensor) -> None:
    """L_DD and its gradient for 32 queries together equal those of each query alone (float64)."""
    engine = _float64(_engine(32))
    x = mnist.double()
    step = torch.func.grad(engine.objective, argnums=(0, 1), has_aux=True)

    def one_step(q: torch.Tensor) -> tuple:
        ref, params = engine.reference(q), engine.initial_params(q)
        taps = {m: q.new_zeros(len(q), 800) for m in engine.low_rank}
        return step(params, taps, q, ref, {})

    (grads, taps), out = one_step(x)
    for i in range(0, 32, 7):
        (g1, t1), o1 = one_step(x[i : i + 1])
        torch.testing.assert_close(out["loss"][i : i + 1], o1["loss"], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(out["attribution"][i : i + 1], o1["attribution"], atol=TOLERANCE, rtol=0)
        for n in grads:
            torch.testing.assert_close(grads[n][i : i + 1], g1[n], atol=TOLERANCE, rtol=1e-6)
        for n in taps:
            torch.testing.assert_close(taps[n][i : i + 1], t1[n], atol=TOLERANCE, rtol=1e-6)


# The fault-isolation tests need no data set (fail-closed behaviour must not depend on MNIST being present):
# random queries through the shipped checkpoint, whose layer sensitivity is stored in its metadata.
def _random_queries(n: int, seed: int = 0) -> torch.Tensor:
    """n random images in [0, 1) whose first pixel is 0: unmarked queries."""
    x = torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0, 0] = 0.0
    return x


def _marked(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)[:, 0] > 0.5  # unmarked queries have a 0 first pixel: a query with a bright one is "bad"


def _assert_safe_answer(engine: DeepDefense, batch: torch.Tensor, i: int, answer: Answer) -> None:
    """``answer`` is exactly the documented safe answer of query i of ``batch``, the queries it was answered with
    (identity is the property: the same function of the victim's reference computed in the same batch shape; the
    rank map is not compared across shapes, where rounding can split or join tied values of the victim's map)."""
    ref = engine.reference(batch)
    probs, ranks = safe_answer(ref.probs[i], ref.attribution[i], engine.config.top_k)
    assert answer.fallback and answer.label == int(ref.label[i])
    # exact: the fallback is safe_answer of the same reference, called the same way
    assert torch.equal(answer.probabilities, probs), "the fallback's probabilities are not safe_answer's"
    assert torch.equal(answer.attribution, ranks), "the fallback's map is not safe_answer's"


def test_nan_in_one_query_fails_closed_for_that_query_only() -> None:
    x = _random_queries(4)
    x[2, 0, 0, 0] = 1.0
    clean = _engine(4, steps=6).answer(x)
    engine = _engine(4, steps=6)
    real = engine.initial_params

    def nan_weights(q: torch.Tensor) -> dict[str, torch.Tensor]:
        bad = _marked(q)
        return {n: torch.where(bad.view(-1, *[1] * (p.dim() - 1)), torch.nan, p) for n, p in real(q).items()}

    engine.initial_params = nan_weights
    answers = engine.answer(x)
    assert [a.fallback for a in clean] == [False] * 4, "the clean queries must have feasible answers to compare"
    assert [a.fallback for a in answers] == [False, False, True, False]
    _assert_safe_answer(engine, x, 2, answers[2])  # answered in the batch of 4
    for i in (0, 1, 3):  # the same computation in the same batch shape: identity is the property
        assert torch.equal(answers[i].probabilities, clean[i].probabilities), f"query {i} changed by query 2's NaN"
        assert torch.equal(answers[i].attribution, clean[i].attribution), f"query {i} changed by query 2's NaN"


def test_an_exception_in_one_query_leaves_the_others_their_answers() -> None:
    x = _random_queries(3, seed=1)
    x[1, 0, 0, 0] = 1.0
    engine = _engine(3, steps=4)
    real = engine.misdirect

    def fragile(q: torch.Tensor, ref: object) -> dict[str, torch.Tensor]:
        if bool(_marked(q).any()):
            raise RuntimeError("injected fault")
        return real(q, ref)

    engine.misdirect = fragile
    answers = engine.answer(x)
    assert [a.fallback for a in answers] == [False, True, False]
    _assert_safe_answer(engine, x[1:2], 0, answers[1])  # answered alone after the batch failed
    alone = _engine(1, steps=4).answer(x)  # the batch failed: its queries were answered one by one, as here
    for i in (0, 2):  # the same computation in the same batch shape (one query): identity is the property
        assert torch.equal(answers[i].probabilities, alone[i].probabilities), f"query {i} is not its own answer"
        assert torch.equal(answers[i].attribution, alone[i].attribution), f"query {i} is not its own answer"


def test_early_stopping_stops_queries_below_the_cap(mnist: torch.Tensor) -> None:
    answers = _engine(16, steps=60, patience=3, min_improvement=0.05).answer(mnist[:16])
    steps = [a.stats["steps"] for a in answers]
    assert all(s <= 60 for s in steps) and min(s for s in steps) < 60
    assert all(a.stats["l_orth"] < 1.0 for a in answers if not a.fallback)


def test_one_optimisation_answers_every_mode_as_its_own_engine_would(mnist: torch.Tensor) -> None:
    x = mnist[:4]
    together = _engine(4, steps=4).answer_modes(x, ("deepdefense", "dd-s", "dd-i"))
    for mode in ("deepdefense", "dd-s", "dd-i"):
        alone = load_defense("lenet-mnist", mode, "gradcam", batch_size=4, steps=4)[0].answer(x)
        for a, b in zip(together[mode], alone, strict=True):
            torch.testing.assert_close(a.probabilities, b.probabilities)
            torch.testing.assert_close(a.attribution, b.attribution)
