"""The domain score (defense/domain.py), its outliers (defense/outliers.py), its measures (measure/domain.py)
and ``deepdefense domain``: what it flags, how it is stored and refused, and the numbers it is chosen by.

Most tests need no data set (the shipped victim and score, synthetic images); the ones on real digits
take a few MNIST images through the ``data_root`` fixture and skip without MNIST.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support.files import flip_last_byte
from support.idx import write_idx

from deepdefense.cli import main as cli
from deepdefense.defense.domain import (
    METHODS,
    DomainMeta,
    DomainScore,
    DomainScoreError,
    load_domain_score,
    save_domain_score,
    victim_outputs,
)
from deepdefense.defense.fitting.domain import choose_threshold as threshold_for
from deepdefense.defense.fitting.domain import (
    fit_domain_score,
    fit_mahalanobis,
    fitting_features,
    handwriting_elastic,
    held_out_features,
    honest_threshold,
)
from deepdefense.defense.fitting.domain_choice import DEFAULT_METHOD, Candidate, auroc, select_method
from deepdefense.defense.honest_variants import FAMILIES, by_family, honest_mix
from deepdefense.defense.outliers import OUTLIERS, mild_affine, synthesise
from deepdefense.measure.domain import PERTURBATIONS, draw_shapes, render_symbols
from deepdefense.models.artifacts import sha256_file
from deepdefense.models.checkpoint import SHIPPED_DIR, load_checkpoint, read_meta
from deepdefense.models.data import load_split

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def victim() -> torch.nn.Module:
    model, _ = load_checkpoint("lenet-mnist")
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def shipped(victim: torch.nn.Module) -> tuple[DomainScore, DomainMeta]:
    return load_domain_score("lenet-mnist", victim)


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def digits(data_root: Path, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_split("mnist", data_root, split).tensors  # type: ignore[attr-defined]
    return x[:n], y[:n]


# --- AUROC and the threshold -------------------------------------------------------------------------------


def test_auroc_on_a_hand_example() -> None:
    # pairs (pos, neg): 0.9 and 0.8 beat all three negatives (6); 0.4 beats 0.3 (1), ties 0.4 (½), loses to 0.5
    pos, neg = torch.tensor([0.9, 0.8, 0.4]), torch.tensor([0.5, 0.3, 0.4])
    assert auroc(pos, neg) == pytest.approx(7.5 / 9)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auroc(torch.ones(5), torch.ones(7)) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        auroc(torch.ones(3), torch.ones(0))


def test_threshold_flags_the_asked_share_of_a_known_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    ranks = torch.randperm(1000, generator=g).float()  # 0 … 999 in any order
    t = threshold_for(ranks, 0.005)
    assert t == 5.0 and int((ranks < t).sum()) == 5  # exactly 0.5%
    normal = torch.randn(20_000, generator=g)
    t = threshold_for(normal, 0.005)
    assert float((normal < t).float().mean()) == pytest.approx(0.005, abs=1 / 20_000)
    assert t == pytest.approx(-2.5758, abs=0.1)  # the 0.5% quantile of N(0, 1)
    assert threshold_for(torch.ones(100), 0.005) == 1.0  # ties: nothing below, nothing flagged


def test_honest_threshold_holds_every_variant_family_to_its_rate() -> None:
    clean = torch.arange(1000).float()  # alone: threshold 5 (0.5%)
    lower = torch.arange(1000).float() - 50  # flags at most 1% of these: threshold -40
    t = honest_threshold(clean, 0.005, {"lower": lower, "higher": clean + 100, "empty": torch.empty(0)}, 0.01)
    assert t == -40.0 and float((lower < t).float().mean()) <= 0.01 and float((clean < t).float().mean()) == 0.0
    assert honest_threshold(clean, 0.005) == threshold_for(clean, 0.005) == 5.0


# --- outliers and the measuring sets ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(OUTLIERS))
def test_outliers_are_seeded_images_in_range(kind: str) -> None:
    x = noise(6).mul(0.5)
    a, b = (OUTLIERS[kind](x, torch.Generator().manual_seed(3)) for _ in range(2))
    # exact: the same seeded draw and the same operations on the same tensor
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, x)


def test_synthesise_splits_the_batch_among_kinds() -> None:
    out, kind = synthesise(noise(14), torch.Generator().manual_seed(0), ["uniform_noise", "patch_shuffle"])
    assert out.shape == (14, *SHAPE) and kind.tolist() == [0] * 7 + [1] * 7
    with pytest.raises(ValueError, match="unknown outlier kinds"):
        synthesise(noise(2), torch.Generator(), ["inverted"])


def test_measuring_sets_are_seeded_images_in_range() -> None:
    g = lambda: torch.Generator().manual_seed(1)
    x = noise(4)
    for make in (lambda g: render_symbols(5, g), lambda g: draw_shapes(5, g), lambda g: mild_affine(x, g)):
        a, b = make(g()), make(g())
        # exact: the same seeded draw and the same operations on the same tensor
        assert a.shape[1:] == SHAPE and torch.equal(a, b) and 0.0 <= float(a.min()) <= float(a.max()) <= 1.0
    for fn in [*PERTURBATIONS.values(), handwriting_elastic]:
        out = fn(x, g())
        assert out.shape == x.shape and 0.0 <= float(out.min()) <= float(out.max()) <= 1.0
    assert float(render_symbols(5, g()).amax(dim=(1, 2, 3)).min()) > 0.5  # something was drawn in each


@pytest.mark.parametrize("family", [*FAMILIES, "mix"])
def test_honest_variants_are_seeded_images_in_range_that_change_the_digit(family: str) -> None:
    x = torch.zeros((6, *SHAPE))
    x[:, :, 6:22, 12:16] = 1.0  # a stroke
    make = (lambda g: honest_mix(x, g)) if family == "mix" else (lambda g: FAMILIES[family](x, g))
    a, b = (make(torch.Generator().manual_seed(5)) for _ in range(2))
    # exact: the same seeded draw and the same operations on the same tensor
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 and not torch.equal(a, x)
    assert set(by_family(x, torch.Generator().manual_seed(5))) == {*FAMILIES, "mix"}


# --- the score --------------------------------------------------------------------------------------------


def test_penultimate_features_are_the_input_of_the_last_layer(victim: torch.nn.Module) -> None:
    x = noise(3)
    feats, logits = victim_outputs(victim, x)
    net = victim.net
    manual = net.classifier.relu3(net.classifier.fc1(net.classifier.flatten(net.classifier.pool2(net.features(
        (x - victim.mean) / victim.std)))))  # fmt: skip
    torch.testing.assert_close(feats, manual)
    torch.testing.assert_close(logits, victim(x))


def test_shipped_score_flags_noise_and_names_its_victim(
    victim: torch.nn.Module, shipped: tuple[DomainScore, DomainMeta]
) -> None:
    score, meta = shipped
    assert meta.method == score.method == DEFAULT_METHOD
    victim_meta = read_meta(SHIPPED_DIR / "lenet-mnist.json")
    assert meta.victim["sha256"] == victim_meta.sha256 == sha256_file(SHIPPED_DIR / victim_meta.weights)
    assert meta.sha256 == sha256_file(SHIPPED_DIR / meta.weights)
    assert meta.fpr <= 0.005 and meta.fpr_held_out <= meta.fpr  # the target: at most 0.5% of honest digits flagged
    assert meta.command.startswith("deepdefense domain") and meta.seed == 0
    assert "fashionmnist" in meta.fit_on["never"]
    assert bool(score.flags(noise(64)).all()), "uniform noise must be out of domain"
    assert score.score(noise(5)).shape == (5,)


def test_shipped_score_passes_real_digits_and_flags_their_outliers(
    data_root: Path, shipped: tuple[DomainScore, DomainMeta]
) -> None:
    score, _ = shipped
    x, _ = digits(data_root, "test", 400)
    assert float(score.flags(x).float().mean()) <= 0.02, "more than 2% of MNIST test digits flagged"
    out, _ = synthesise(x[:140], torch.Generator().manual_seed(0), ["gaussian_noise", "pixel_permutation"])
    # honest noisy digits are in domain now, so the odd permuted digit passes (docs/results/domain-score.md)
    assert float(score.flags(out).float().mean()) >= 0.95


def test_shipped_score_keeps_honest_variants_of_test_digits_in_domain(
    data_root: Path, shipped: tuple[DomainScore, DomainMeta]
) -> None:
    """Thicker, thinner, noisy, shifted, faint, scanned test digits are answered honestly: the score shipped before
    honest variants flagged 22-25% of the thicker, thinner and noisy ones."""
    score, meta = shipped
    assert meta.extra["honest_variants"] is True and "honest_mix" in meta.fit_on["honest_variants"]
    x, _ = digits(data_root, "test", 300)
    sets = by_family(x, torch.Generator().manual_seed(11))
    sets |= {
        name: PERTURBATIONS[name](x, torch.Generator().manual_seed(12)) for name in ("thicker", "thinner", "noisy")
    }
    rates = {name: float(score.flags(xv).float().mean()) for name, xv in sets.items()}
    assert max(rates.values()) <= 0.05, rates


def fitted(victim: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, honest: bool) -> DomainScore:
    """A detector fitted on the first 1500 of ``x`` and thresholded on the rest at 1% (and 1% of their variants)."""
    g = torch.Generator().manual_seed(0)
    data = fitting_features(victim, x[:1500], y[:1500], g, honest=honest)
    held = held_out_features(victim, x[1500:], y[1500:], g, g, honest=honest)
    scorer, threshold = fit_domain_score("detector", data, held, 10, g, fpr=0.01)
    return DomainScore(victim, scorer, threshold, "detector")


def flagged_share(score: DomainScore, x: torch.Tensor) -> float:
    return float(score.flags(x).float().mean())


def test_fitting_with_honest_variants_keeps_them_in_domain(data_root: Path, victim: torch.nn.Module) -> None:
    x, y = digits(data_root, "train", 2000)
    test, _ = digits(data_root, "test", 300)
    variants = torch.cat(list(by_family(test, torch.Generator().manual_seed(11)).values()))
    rates = {}
    for honest in (True, False):
        score = fitted(victim, x, y, honest=honest)
        assert flagged_share(score, x[1500:]) <= 0.01 and bool(score.flags(noise(32)).all())
        rates[honest] = float(score.flags(variants).float().mean())
    assert rates[True] <= 0.05 and rates[False] >= 2 * rates[True], rates


def test_fit_on_a_few_digits_flags_noise_at_the_asked_rate(data_root: Path, victim: torch.nn.Module) -> None:
    x, y = digits(data_root, "train", 2000)
    score = fitted(victim, x, y, honest=True)
    assert flagged_share(score, x[1500:]) <= 0.01
    assert bool(score.flags(noise(32)).all())


# --- files -----------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path, victim: torch.nn.Module) -> tuple[Path, DomainScore]:
    """A Mahalanobis score on random features, saved beside a copy of the victim checkpoint in ``tmp_path``."""
    for suffix in (".json", ".safetensors"):
        shutil.copy(SHIPPED_DIR / f"lenet-mnist{suffix}", tmp_path / f"lenet-mnist{suffix}")
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.rand((200, 500), generator=g), torch.arange(200) % 10
    score = DomainScore(victim, fit_mahalanobis(feats, labels, 10), -123.5, "mahalanobis")
    meta = DomainMeta(
        method="",
        threshold=0.0,
        fpr=0.005,
        fpr_held_out=0.004,
        feature_dim=500,
        num_classes=10,
        victim={},
        command="deepdefense domain --seed 7",
        seed=7,
        fit_on={"in_domain": "random features"},
    )
    path = save_domain_score(score, tmp_path / "lenet-mnist.json", meta)
    return path, score


def test_save_load_round_trip(saved: tuple[Path, DomainScore], victim: torch.nn.Module) -> None:
    path, score = saved
    assert path.name == "lenet-mnist.domain.json" and (path.parent / "lenet-mnist.domain.safetensors").is_file()
    for where in (path, path.parent / "lenet-mnist.json"):  # the score's metadata or the victim's
        loaded, meta = load_domain_score(where, victim)
        assert (meta.method, meta.threshold, meta.seed) == ("mahalanobis", -123.5, 7)
        assert meta.victim["sha256"] == read_meta(SHIPPED_DIR / "lenet-mnist.json").sha256
        x = noise(4)
        torch.testing.assert_close(loaded.score(x), score.score(x))
        # exact: the flags are this very comparison of the same scores (same batch, same path)
        assert torch.equal(loaded.flags(x), loaded.score(x) < -123.5), "the flags are its own scores below threshold"


def test_tampered_weights_are_refused(saved: tuple[Path, DomainScore], victim: torch.nn.Module) -> None:
    path, _ = saved
    weights = path.parent / "lenet-mnist.domain.safetensors"
    flip_last_byte(weights)
    with pytest.raises(DomainScoreError, match=r"sha256 .* refusing to load"):
        load_domain_score(path, victim)


def test_a_score_for_other_victim_weights_is_refused(saved: tuple[Path, DomainScore], victim: torch.nn.Module) -> None:
    path, _ = saved
    other = load_checkpoint("lenet-mnist")[0]
    with torch.no_grad():
        other.net.classifier.fc2.bias.add_(0.01)
    with pytest.raises(DomainScoreError, match="model given is not"):
        load_domain_score(path, other)
    meta = json.loads(path.read_text())
    meta["victim"]["sha256"] = "0" * 64
    path.write_text(json.dumps(meta))
    with pytest.raises(DomainScoreError, match="fitted for victim weights"):
        load_domain_score(path, victim)


def test_missing_score_is_named(tmp_path: Path, victim: torch.nn.Module) -> None:
    shutil.copy(SHIPPED_DIR / "lenet-mnist.json", tmp_path / "lenet-mnist.json")
    with pytest.raises(DomainScoreError, match="no domain score"):
        load_domain_score(tmp_path / "lenet-mnist.json", victim)


# --- selection and the command ---------------------------------------------------------------------------


def test_selection_takes_the_best_utility() -> None:
    def cand(method: str, caught: float, honest: float) -> Candidate:
        return Candidate(method, torch.nn.Identity(), 0.0, 0.005, {"a": caught}, {"a": 0.9}, honest)

    picks = {
        "msp": cand("msp", 0.5, 0.01),
        "detector": cand("detector", 0.9, 0.45),
        "energy": cand("energy", 0.6, 0.02),
    }
    assert select_method(picks) == "energy"  # detector catches most but flags too many honest digits
    assert select_method({"msp": cand("msp", 0.5, 0.0), "energy": cand("energy", 0.5, 0.0)}) == "msp"


def test_command_fits_selects_saves_and_reports(tmp_path: Path) -> None:
    """End to end on stand-in data sets (digit-like strokes for MNIST, blocks for the foreign set)."""
    rng = np.random.default_rng(0)
    for folder, n_train, n_test in (("MNIST", 120, 40), ("FashionMNIST", 0, 40)):
        raw = tmp_path / "data" / folder / "raw"
        raw.mkdir(parents=True)
        for split, n in (("train", n_train), ("t10k", n_test)):
            images = np.zeros((max(n, 1), 28, 28))
            for i in range(len(images)):
                if folder == "MNIST":
                    c = rng.integers(6, 22)
                    images[i, 5:23, c : c + 3] = 255  # a vertical stroke, a one
                else:
                    images[i, 6:22, 4:24] = rng.integers(80, 255)
            write_idx(raw / f"{split}-images-idx3-ubyte", images)
            write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(len(images)) % 10)
    for suffix in (".json", ".safetensors"):
        shutil.copy(SHIPPED_DIR / f"lenet-mnist{suffix}", tmp_path / f"lenet-mnist{suffix}")
    report = tmp_path / "report.md"
    argv = ["domain", "--checkpoint", str(tmp_path / "lenet-mnist.json"), "--data-root", str(tmp_path / "data")]
    argv += ["--held-out", "40", "--n-constructed", "10", "--report", str(report), "--method", "msp", "--quiet"]
    assert cli(argv) == 0
    record = json.loads(report.with_suffix(".json").read_text())
    assert set(record["selection"]["candidates"]) == set(METHODS)
    assert record["shipped"]["method"] == "msp" and record["command"].startswith("deepdefense domain")
    methods = record["evaluation"]["methods"]
    assert set(methods) == set(METHODS)
    assert set(methods["msp"]["false_flags"]) == set(PERTURBATIONS)
    text = report.read_text()
    assert "Selected by this rule" in text and "fashionmnist test" in text
    assert "JBDA-like (held-out train + 0.1·sign ∇)" in methods["msp"]["detection"]
    _, meta = load_domain_score(tmp_path / "lenet-mnist.json", load_checkpoint("lenet-mnist")[0])
    assert meta.method == "msp" and meta.seed == 0
    assert meta.extra["honest_variants"] is True and meta.extra["variant_fpr"] == 0.01
    assert cli([*argv, "--no-honest-variants", "--no-eval"]) == 0
    _, meta = load_domain_score(tmp_path / "lenet-mnist.json", load_checkpoint("lenet-mnist")[0])
    assert meta.extra["honest_variants"] is False and meta.fit_on["honest_variants"].startswith("none")
