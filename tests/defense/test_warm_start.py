"""Warm starts (``defense/warm_start.py``): the low-rank preset, the engine starting from a warm start (checked
against the constraints, repeatable, batch-independent), the default step caps, and the shipped file
(verified, bound to its victim). Small and seeded: a warm start learnt here on 20 training digits with 2 steps."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support.files import flip_last_byte
from torch import nn

from deepdefense.defense.engine import COLD_STEPS, DeepDefense
from deepdefense.defense.fitting.warm_start import learn_warm_start
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.defense.loader import load_defense
from deepdefense.defense.low_rank import LowRankWeight
from deepdefense.defense.sensitivity import checkpoint_sensitivity
from deepdefense.defense.warm_start import (
    WARM_STEPS,
    WarmStart,
    WarmStartError,
    WarmStartMeta,
    load_warm_start,
    save_warm_start,
    warm_start_paths,
)
from deepdefense.models.checkpoint import load_checkpoint
from deepdefense.models.data import load_split

SHAPE = (1, 28, 28)


def engine(victim: nn.Module, data_root: Path, warm: WarmStart | None = None, **options: object) -> DeepDefense:
    _, meta = load_checkpoint("lenet-mnist")
    sensitivity = checkpoint_sensitivity(victim, meta, str(data_root))
    interpreter = create_interpreter("gradcam", victim, SHAPE)
    return DeepDefense(victim, interpreter, sensitivity=sensitivity, warm=warm, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def digits(data_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(2 training digits of each class to learn on, 6 test digits to answer)."""
    x, y = load_split("mnist", str(data_root), "train").tensors
    pick = torch.cat([torch.nonzero(y == c)[:2, 0] for c in range(10)])
    return x[pick], load_split("mnist", str(data_root), "test").tensors[0][:6]


@pytest.fixture(scope="module")
def learnt(victim: nn.Module, data_root: Path, digits: tuple[torch.Tensor, torch.Tensor]) -> WarmStart:
    cold = engine(victim, data_root, warm_start=False, steps=2)
    dense, factors = learn_warm_start(cold, digits[0], classes=10, rank=4, progress=False)
    meta = WarmStartMeta("gradcam", cold.layers, 10, 4, 20, "mnist train", 2, 0, "test")
    return WarmStart(meta, dense, factors)


def test_preset_terms_start_the_weight_and_the_solver_never_moves_them() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 7)
    u, v = torch.randn(3, 5, 4), torch.randn(3, 7, 4)
    weight = LowRankWeight(w, batch=3, steps=2 + 2)
    weight.preset(u, v)
    a, b = weight.factors()
    torch.testing.assert_close(a @ b.transpose(1, 2), u @ v.transpose(1, 2))  # W̃ = W + U Vᵀ
    weight.record(torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 5), torch.randn(3, 7))
    weight.step(torch.tensor([True, True, False]), torch.full((3,), 0.1), 0.9, torch.ones(3))
    # exact: coefficients a step must not touch stay the ones they were set to
    assert torch.equal(weight.coef[:, :2], torch.ones(3, 2)), "a step moved the warm start's terms"
    assert weight.coef[0, 2] != 0 and weight.coef[2, 2] == 0
    weight.reset(torch.tensor([False, True, False]))
    assert weight.coef[1].abs().sum() == 0 and torch.equal(weight.coef[0, :2], torch.ones(2))
    with pytest.raises(RuntimeError, match="before the solver's first step"):
        weight.preset(u, v)


def test_the_default_step_cap_follows_the_warm_start(victim: nn.Module, data_root: Path, learnt: WarmStart) -> None:
    assert engine(victim, data_root, learnt).steps == learnt.meta.serve_steps == WARM_STEPS
    fewer = WarmStart(replace(learnt.meta, serve_steps=4), learnt.dense, learnt.factors)
    assert engine(victim, data_root, fewer).steps == 4  # the step cap measured for this warm start
    assert engine(victim, data_root).steps == COLD_STEPS
    assert engine(victim, data_root, learnt, warm_start=False).steps == COLD_STEPS  # the old configuration
    assert engine(victim, data_root, learnt, steps=7).steps == 7
    assert engine(victim, data_root, learnt).public_settings()["warm_start"] is True
    other = WarmStart(replace(learnt.meta, layers=["net.features.conv1"]), learnt.dense, learnt.factors)
    assert engine(victim, data_root, other).warm is None  # learnt for other layers: from the victim


def test_warm_answers_are_repeatable_batch_independent_and_keep_the_label(
    victim: nn.Module, data_root: Path, digits: tuple[torch.Tensor, torch.Tensor], learnt: WarmStart
) -> None:
    x, model = digits[1].double(), copy.deepcopy(victim).double()  # float64: batch vs alone within 1e-3
    dd = engine(model, data_root, WarmStart(learnt.meta, *_double(learnt)), steps=3)
    together = dd.answer(x)
    alone = [dd.answer(xi.unsqueeze(0))[0] for xi in x]
    again = dd.answer(x)
    for a, b, c in zip(together, alone, again, strict=True):
        torch.testing.assert_close(a.probabilities, b.probabilities, atol=1e-3, rtol=1e-3)
        assert torch.equal(a.probabilities, c.probabilities), "the same query got another answer"
        assert a.label == b.label and not a.fallback
    labels = model(x).argmax(1).tolist()
    assert [a.label for a in together] == labels == [int(a.probabilities.argmax()) for a in together]
    assert sum(a.stats["warm_start"] for a in together) > 0


def test_a_warm_start_that_breaks_the_constraints_starts_from_the_victim(
    victim: nn.Module, data_root: Path, digits: tuple[torch.Tensor, torch.Tensor], learnt: WarmStart
) -> None:
    dd = engine(victim, data_root, steps=3)
    flipped = {k: -2 * w.detach().expand(10, *w.shape) for k, w in dd.victim_params().items() if k in learnt.dense}
    wrecked = WarmStart(learnt.meta, flipped, learnt.factors)  # every selected weight's sign flipped
    answers = engine(victim, data_root, wrecked, steps=3).answer(digits[1])
    assert [a.stats["warm_start"] for a in answers] == [0.0] * len(answers)
    assert not any(a.fallback for a in answers), "queries kept an infeasible start and found nothing"
    assert [int(a.probabilities.argmax()) for a in answers] == victim(digits[1]).argmax(1).tolist()


def test_saved_warm_starts_are_verified_and_bound_to_their_victim(
    victim: nn.Module, tmp_path: Path, learnt: WarmStart
) -> None:
    victim_json = warm_start_paths("lenet-mnist")[1]
    # a copy of the shipped checkpoint in tmp, so that the test writes nothing beside the shipped one
    for path in victim_json.parent.glob("lenet-mnist.*"):
        if ".warm." not in path.name:
            (tmp_path / path.name).write_bytes(path.read_bytes())
    local = tmp_path / "lenet-mnist.json"
    saved = save_warm_start(WarmStart(replace(learnt.meta), learnt.dense, learnt.factors), local)
    loaded = load_warm_start(local, victim)
    assert loaded is not None and loaded.meta.layers == learnt.meta.layers
    for k in learnt.dense:
        torch.testing.assert_close(loaded.dense[k], learnt.dense[k])
    meta = json.loads(saved.read_text())
    assert meta["victim"]["sha256"] and meta["sha256"]

    other = load_checkpoint("lenet-fashionmnist")[0]
    with pytest.raises(WarmStartError, match="model given is not checkpoint lenet-mnist's weights"):
        load_warm_start(local, other)
    tensors = saved.with_suffix(".safetensors")
    flip_last_byte(tensors)  # one byte of the last tensor changed
    with pytest.raises(WarmStartError, match="sha256"):
        load_warm_start(local, victim)


def test_the_shipped_checkpoint_serves_from_its_warm_start(data_root: Path) -> None:
    dd, _ = load_defense("lenet-mnist", "deepdefense", "gradcam", data_root=str(data_root))
    assert isinstance(dd, DeepDefense) and dd.warm is not None and dd.steps == dd.warm.meta.serve_steps == 10
    assert dd.warm.meta.dataset == "mnist train", "a warm start must be learnt on training images only"
    cold, _ = load_defense("lenet-mnist", "deepdefense", "gradinput", data_root=str(data_root))
    assert isinstance(cold, DeepDefense) and cold.warm is None and cold.steps == COLD_STEPS


def _double(warm: WarmStart) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    return {k: v.double() for k, v in warm.dense.items()}, {
        k: (u.double(), v.double()) for k, (u, v) in warm.factors.items()
    }
