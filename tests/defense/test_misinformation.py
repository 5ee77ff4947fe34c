"""The misinformation model (Adaptive Misinformation): its loss, the blend, the shipped checkpoint, the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from support.files import flip_last_byte
from support.idx import bar_mnist

from deepdefense.cli import main as cli
from deepdefense.defense.fitting.misinformation import answer_spread_penalty, misinformation_loss
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.defense.misinformation import blend, load_misinformation, misinformation_weight, mix
from deepdefense.models import CheckpointError, load_checkpoint
from deepdefense.models.checkpoint import SHIPPED_DIR, read_meta
from deepdefense.models.data import load_split

VICTIM = "lenet-mnist"
MISINFO = "lenet-mnist-misinfo"


# --- the loss ---------------------------------------------------------------------------------------


def test_loss_on_hand_examples() -> None:
    """Uniform over 10 classes: p_true = 0.1, L = −log 0.9. Two classes with logits (ln 3, 0), true class 0:
    p_true = 3/4, L = −log(1/4) = ln 4. Averaged over the batch."""
    assert float(misinformation_loss(torch.zeros(1, 10), torch.tensor([3]))) == pytest.approx(-math.log(0.9))
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    assert float(misinformation_loss(logits, torch.tensor([0, 0]))) == pytest.approx(math.log(4.0))
    assert float(misinformation_loss(logits, torch.tensor([0, 1]))) == pytest.approx(
        (math.log(4.0) - math.log(3 / 4)) / 2
    )


def test_loss_matches_the_naive_formula_and_stays_finite_where_it_overflows() -> None:
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8)
    naive = -torch.log(1 - logits.softmax(-1).gather(1, y[:, None])).mean()
    assert float(misinformation_loss(logits, y)) == pytest.approx(float(naive), rel=1e-5)
    sure = torch.tensor([[100.0, 0.0, 0.0]], requires_grad=True)  # p_true rounds to 1 in float32
    loss = misinformation_loss(sure, torch.tensor([0]))
    loss.backward()
    assert loss.item() == pytest.approx(100.0 - math.log(2.0), abs=1e-3)
    assert torch.isfinite(sure.grad).all() and float(sure.grad[0, 0]) > 0.99


def test_a_descent_step_lowers_the_true_class_probability() -> None:
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3))
    misinformation_loss(logits, y).backward()
    p_true = logits.softmax(-1).gather(1, y[:, None])
    assert (logits.grad.gather(1, y[:, None]) > 0).all(), "∂L/∂z_y = p_y/B > 0: descent lowers the true logit"
    stepped = (logits - 0.5 * logits.grad).softmax(-1).gather(1, y[:, None])
    assert (stepped < p_true).all()


def test_spread_penalty_prefers_confident_answers_over_all_classes() -> None:
    """log K − I(x; ŷ): 0 for confident answers spread evenly, log K for uniform answers and for one
    confident class given to every query."""
    spread = 50.0 * torch.eye(10)  # ten queries, ten confident, different answers
    assert float(answer_spread_penalty(spread)) == pytest.approx(0.0, abs=1e-4)
    assert float(answer_spread_penalty(torch.zeros(10, 10))) == pytest.approx(math.log(10), abs=1e-5)
    one_class = torch.zeros(10, 10)
    one_class[:, 3] = 50.0
    assert float(answer_spread_penalty(one_class)) == pytest.approx(math.log(10), abs=1e-4)


# --- the blend ------------------------------------------------------------------------------------


def _probabilities(seed: int, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, 10, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def test_blend_is_the_formula() -> None:
    p_v, p_m = _probabilities(0), _probabilities(1)
    score = torch.tensor([0.2, 0.5, 0.8, 0.95])
    alpha = torch.sigmoid(4.0 * (0.5 - score))
    expected = (1 - alpha)[:, None] * p_v + alpha[:, None] * p_m
    torch.testing.assert_close(blend(p_v, p_m, score, tau=0.5, nu=4.0), expected)
    torch.testing.assert_close(misinformation_weight(score, 0.5, 4.0), alpha)
    torch.testing.assert_close(blend(p_v, p_m, 0.5, tau=0.5, nu=4.0), (p_v + p_m) / 2)  # score = τ: α = ½


def test_blend_ends_at_the_victim_and_at_the_misinformation_model_and_sums_to_one() -> None:
    p_v, p_m = _probabilities(2), _probabilities(3)
    in_domain = blend(p_v, p_m, torch.ones(4), tau=0.5, nu=1000.0)  # score ≫ τ: α → 0
    out_of_domain = blend(p_v, p_m, torch.zeros(4), tau=0.5, nu=1000.0)  # score ≪ τ: α → 1
    torch.testing.assert_close(in_domain, p_v)
    torch.testing.assert_close(out_of_domain, p_m)
    torch.testing.assert_close(mix(p_v, p_m, 0.0), p_v)
    torch.testing.assert_close(mix(p_v, p_m, 1.0), p_m)
    for alpha in (0.0, 0.3, 1.0, torch.tensor([0.0, 0.25, 0.75, 1.0])):
        torch.testing.assert_close(mix(p_v, p_m, alpha).sum(1), torch.ones(4))
    torch.testing.assert_close(blend(p_v, p_m, torch.rand(4), tau=0.7, nu=10.0).sum(1), torch.ones(4))


# --- the shipped checkpoint ----------------------------------------------------------------------------


def test_shipped_model_loads_and_names_its_victim() -> None:
    model, meta = load_misinformation(VICTIM)
    victim = read_meta(SHIPPED_DIR / f"{VICTIM}.json")
    assert meta.extra["kind"] == "misinformation" and meta.extra["victim"] == VICTIM
    assert meta.extra["victim_sha256"] == victim.sha256
    assert (meta.arch, meta.dataset, meta.input_shape, meta.mean, meta.std) == (
        victim.arch,
        victim.dataset,
        victim.input_shape,
        victim.mean,
        victim.std,
    )
    assert meta.command.startswith("deepdefense misinfo --checkpoint lenet-mnist")
    assert meta.test_accuracy < 1.0 and meta.extra["measured"]["misinfo_top1_accuracy"] == meta.test_accuracy
    _, same = load_checkpoint(MISINFO)  # an ordinary checkpoint for every other reader
    assert same.sha256 == meta.sha256
    x = torch.rand(4, *meta.input_shape, generator=torch.Generator().manual_seed(0))
    maps = create_interpreter("gradcam", model, tuple(meta.input_shape)).explain({}, x, model(x).argmax(1))
    assert maps.attribution.shape == (4, 28, 28) and torch.isfinite(maps.attribution).all()


def _copy_pair(tmp_path: Path, names: tuple[str, ...] = (VICTIM, MISINFO)) -> tuple[Path, Path]:
    """The shipped victim and its misinformation model, copied side by side into ``tmp_path``."""
    for name in names:
        for suffix in (".json", ".safetensors"):
            shutil.copy(SHIPPED_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    return tmp_path / f"{VICTIM}.json", tmp_path / f"{MISINFO}.json"


def test_a_tampered_misinformation_model_is_refused(tmp_path: Path) -> None:
    victim, _ = _copy_pair(tmp_path)
    load_misinformation(victim)  # the intact copy loads from beside the copied victim
    weights = tmp_path / f"{MISINFO}.safetensors"
    flip_last_byte(weights)
    with pytest.raises(CheckpointError, match="sha256"):
        load_misinformation(victim)


def test_a_misinformation_model_of_other_victim_weights_is_refused(tmp_path: Path) -> None:
    victim, misinfo = _copy_pair(tmp_path)
    meta = json.loads(misinfo.read_text())
    meta["extra"]["victim_sha256"] = "0" * 64  # made for weights the victim no longer has
    misinfo.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="trained for victim weights 000000000000"):
        load_misinformation(victim)
    meta["extra"]["kind"] = "victim"
    misinfo.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a misinformation model"):
        load_misinformation(victim)


def test_a_missing_misinformation_model_says_how_to_make_one(tmp_path: Path) -> None:
    victim, misinfo = _copy_pair(tmp_path)
    misinfo.unlink()
    with pytest.raises(CheckpointError, match="deepdefense misinfo --checkpoint lenet-mnist"):
        load_misinformation(victim)


def test_shipped_model_is_rarely_right_on_mnist(data_root: Path) -> None:
    """On 200 MNIST test images the victim is right on ≥ 97%; the misinformation model's top-1 is the true
    label on at most 2% (it measured 0.0x% on the full test set) and puts < 5% mean mass on it."""
    victim, _ = load_checkpoint(VICTIM)
    model, _ = load_misinformation(VICTIM)
    x, y = load_split("mnist", data_root, "test").tensors
    x, y = x[:200], y[:200]
    with torch.no_grad():
        p_v, p_m = victim(x).softmax(-1), model(x).softmax(-1)
    assert float((p_v.argmax(1) == y).double().mean()) >= 0.97
    assert float((p_m.argmax(1) == y).double().mean()) <= 0.02
    assert float(p_m.gather(1, y[:, None]).mean()) < 0.05


# --- the command ------------------------------------------------------------------------------------


def test_cli_trains_measures_and_writes_a_repeatable_checkpoint(tmp_path: Path) -> None:
    root = bar_mnist(tmp_path / "data")
    victim, _ = _copy_pair(tmp_path, (VICTIM,))
    metas = []
    for run in ("a", "b"):
        out = tmp_path / run / f"{MISINFO}"
        argv = ["misinfo", "--checkpoint", str(victim), "--data-root", str(root), "--epochs", "1"]
        argv += ["--batch-size", "32", "--seed", "0", "--device", "cpu", "--quiet", "--save", str(out)]
        argv += ["--report", str(tmp_path / run / "report.md")]
        assert cli(argv) == 0
        metas.append(json.loads(out.with_suffix(".json").read_text()))
    meta = metas[0]
    assert metas[1]["sha256"] == meta["sha256"], "same seed, same data: same weights"
    assert meta["extra"]["kind"] == "misinformation" and meta["extra"]["victim"] == VICTIM
    assert meta["extra"]["victim_sha256"] == read_meta(victim).sha256
    assert meta["command"].startswith("deepdefense misinfo --checkpoint")
    measured = meta["extra"]["measured"]
    assert measured["n"] == 64 and measured["gradcam"]["all_finite"]
    assert measured["misinfo_top1_accuracy"] == meta["test_accuracy"]
    assert set(measured["blend_top1_accuracy"]) >= {"0", "0.5", "1"}
    assert measured["blend_top1_accuracy"]["1"] == meta["test_accuracy"]
    assert "misinfo --checkpoint" in (tmp_path / "a" / "report.md").read_text()


def test_a_misinformation_model_is_never_loaded_as_a_victim() -> None:
    from deepdefense.defense.loader import load_defense

    with pytest.raises(ValueError, match="misinformation model, not a victim"):
        load_defense("lenet-mnist-misinfo", "none")
