"""The Ensemble of Diverse Models baseline: its losses on hand-computed cases, the member hash, answers from
the hashed member, the shipped ensemble (verified, bound to its victim), the server serving it, the CLI."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support.files import flip_last_byte
from support.idx import bar_mnist
from support.images import SHAPE
from support.numerics import PATH_ATOL, top1_margin
from support.servers import serving
from support.settings import make_settings

from deepdefense.cli import main as cli
from deepdefense.defense import NoDefense, create_defense
from deepdefense.defense.baselines.edm import (
    EDMError,
    EnsembleOfDiverseModels,
    coherence,
    load_ensemble,
    member_index,
)
from deepdefense.defense.fitting.edm import div_loss
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.defense.loader import load_defense
from deepdefense.measure.edm import served_similarity
from deepdefense.models.artifacts import state_sha256
from deepdefense.models.checkpoint import SHIPPED_DIR, build_model, read_meta
from deepdefense.models.data import load_split
from deepdefense.server.app import create_app

VICTIM = "lenet-mnist"


# --- the losses ---------------------------------------------------------------------------------------------


def test_div_loss_and_coherence_on_hand_computed_cases() -> None:
    e1, e2, mid = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])
    # two members with disjoint supports: CS 0, one pair -> log(exp(0)) = 0
    p = torch.stack([e1, e2])[:, None]  # (N=2, B=1, K=2)
    assert div_loss(p).item() == pytest.approx(0.0, abs=1e-7)
    assert coherence(p).item() == pytest.approx(0.0, abs=1e-7)
    # two proportional members: CS 1 -> DivLoss 1, coherence 1
    p = torch.stack([mid, mid])[:, None]
    assert div_loss(p).item() == pytest.approx(1.0, abs=1e-6)
    assert coherence(p).item() == pytest.approx(1.0, abs=1e-6)
    # three members: CS(e1, e2) = 0, CS(e1, mid) = CS(e2, mid) = 1/√2
    p = torch.stack([e1, e2, mid])[:, None]
    c = 1 / math.sqrt(2)
    assert div_loss(p).item() == pytest.approx(math.log(1 + 2 * math.exp(c)), abs=1e-6)
    assert coherence(p).item() == pytest.approx(c, abs=1e-6)
    # one value per query, queries independent: the batch of both cases gives each case's value
    both = torch.stack([torch.stack([e1, e1]), torch.stack([e2, mid])])  # (N=2, B=2, K=2)
    assert div_loss(both).tolist() == pytest.approx([0.0, c], abs=1e-6)
    with pytest.raises(ValueError, match="at least two members"):
        coherence(p[:1])


def test_served_similarity_is_the_expected_cosine_of_two_hash_draws() -> None:
    e1, e2, mid = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])
    # two disjoint members: the same member (1/2, CS 1) or the other (1/2, CS 0)
    assert served_similarity(torch.stack([e1, e2])[:, None]).tolist() == pytest.approx([0.5], abs=1e-6)
    assert served_similarity(torch.stack([mid, mid])[:, None]).tolist() == pytest.approx([1.0], abs=1e-6)
    # three members: 1/3 + 2/3 · mean(0, 1/√2, 1/√2); unlike coherence (the worst pair) it is not 1/√2
    c = 1 / math.sqrt(2)
    got = served_similarity(torch.stack([e1, e2, mid])[:, None]).item()
    assert got == pytest.approx(1 / 3 + 2 / 3 * (2 * c / 3), abs=1e-6)


def test_div_loss_gradient_pushes_members_apart() -> None:
    """One descent step on DivLoss of two members' logits lowers their cosine similarity."""
    logits = torch.tensor([[[2.0, 1.0, 0.0]], [[1.5, 1.0, 0.2]]], requires_grad=True)
    before = coherence(logits.softmax(-1)).item()
    div_loss(logits.softmax(-1)).sum().backward()
    with torch.no_grad():
        after = coherence((logits - 1.0 * logits.grad).softmax(-1)).item()
    assert after < before


# --- the member hash ------------------------------------------------------------------------------------------


def test_member_index_is_the_documented_hash() -> None:
    x = torch.zeros(1, 1, 2, 2)
    expected = int.from_bytes(hashlib.sha256(b"\0" * 16).digest()[:8], "big") % 7
    assert member_index(x, 7).tolist() == [expected]
    assert member_index(-x, 7).tolist() == [expected], "-0.0 hashes as 0.0"
    assert member_index(x.double(), 7).tolist() == [expected], "hashed as float32"
    keyed = int.from_bytes(hashlib.sha256(b"k" + b"\0" * 16).digest()[:8], "big") % 7
    assert member_index(x, 7, b"k").tolist() == [keyed]


def test_member_index_is_stable_and_spreads_queries_over_all_members() -> None:
    x = torch.rand(400, *SHAPE, generator=torch.Generator().manual_seed(0))
    picks = member_index(x, 5)
    # exact: member indices are integers from a hash of each query's bytes
    assert torch.equal(member_index(x.clone(), 5), picks)
    assert torch.equal(member_index(x.flip(0), 5), picks.flip(0)), "a query's member does not depend on its batch"
    assert member_index(x[7:8], 5).item() == picks[7].item()
    counts = torch.bincount(picks, minlength=5)
    # 400 seeded queries, 80 expected per member (binomial sd 8): these bounds are 3.75 sd wide
    assert counts.min() >= 50 and counts.max() <= 110, counts.tolist()
    nudged = x.clone()
    nudged[:, 0, 0, 0] += 1e-3  # a change an image encoding could make: a different query, a fresh draw
    assert (member_index(nudged, 5) != picks).float().mean() > 0.6  # 4/5 expected


# --- answers --------------------------------------------------------------------------------------------------


def rolled(victim: torch.nn.Module, k: int) -> torch.nn.Module:
    """The victim with its output layer's rows rolled by ``k``: it answers class (victim's + k) mod 10, as surely."""
    member = copy.deepcopy(victim)
    fc2 = member.net.classifier.fc2
    with torch.no_grad():
        fc2.weight.copy_(fc2.weight.roll(k, 0))
        fc2.bias.copy_(fc2.bias.roll(k, 0))
    return member.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def ensemble(victim: torch.nn.Module) -> EnsembleOfDiverseModels:
    """Three members that tell themselves apart: member k answers the victim's class + k (mod 10)."""
    members = [rolled(victim, k) for k in range(3)]
    return EnsembleOfDiverseModels(victim, create_interpreter("gradcam", victim, SHAPE), members=members)


@pytest.fixture(scope="module")
def digits(data_root: Path) -> torch.Tensor:
    return load_split("mnist", data_root, "test").tensors[0][:12]


def test_each_query_is_answered_by_the_member_its_hash_picks(
    ensemble: EnsembleOfDiverseModels, victim: torch.nn.Module, digits: torch.Tensor
) -> None:
    x = digits
    with torch.no_grad():
        truth = victim(x).argmax(1)
    before = state_sha256(victim)
    answers = ensemble.answer(x, explain=True)
    picks = member_index(x, 3)
    assert len(set(picks.tolist())) == 3, "the 12 queries reach every member"
    for i, a in enumerate(answers):
        member = ensemble.members[int(picks[i])]
        # the member alone on this one query: another batch, so compared with PATH_ATOL
        (own,) = NoDefense(member, create_interpreter("gradcam", member, SHAPE)).answer(x[i : i + 1], explain=True)
        assert a.stats == {"member": float(picks[i])}
        assert torch.allclose(a.probabilities, own.probabilities, atol=PATH_ATOL, rtol=0)
        assert top1_margin(own.probabilities).item() > 100 * PATH_ATOL, "a near-tie: the label may differ by path"
        assert a.label == own.label == int(own.probabilities.argmax()) == (int(truth[i]) + int(picks[i])) % 10
        assert a.attribution is not None and torch.allclose(a.attribution, own.attribution, atol=PATH_ATOL, rtol=0)
    assert state_sha256(victim) == before, "answering never writes the victim"
    others = [m for m in ensemble.members if m is not ensemble.members[int(picks[0])]]
    with torch.no_grad():
        assert not any(torch.allclose(m(x[:1]).softmax(-1)[0], answers[0].probabilities, atol=1e-3) for m in others)


def test_the_same_query_gets_the_same_answer(ensemble: EnsembleOfDiverseModels, digits: torch.Tensor) -> None:
    x = digits[:6]
    first, again = ensemble.answer(x), ensemble.answer(x.clone())
    for a, b in zip(first, again, strict=True):  # the same computation in the same batch shape: identity
        assert a.label == b.label and torch.equal(a.probabilities, b.probabilities)
        assert torch.equal(a.attribution, b.attribution)
    (alone,) = ensemble.answer(x[4:5])
    assert alone.label == first[4].label and alone.stats == first[4].stats
    assert torch.allclose(alone.probabilities, first[4].probabilities, atol=PATH_ATOL, rtol=0)
    assert all(a.attribution is None for a in ensemble.answer(x, explain=False))


def test_create_defense_needs_the_members(victim: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="load_defense"):
        create_defense("edm", victim, create_interpreter("gradcam", victim, SHAPE))


# --- the shipped ensemble -------------------------------------------------------------------------------------


def test_shipped_ensemble_loads_and_names_its_victim() -> None:
    members, meta = load_ensemble(VICTIM)
    victim = read_meta(SHIPPED_DIR / f"{VICTIM}.json")
    assert meta.kind == "edm"
    assert meta.victim == {"checkpoint": VICTIM, "weights": victim.weights, "sha256": victim.sha256}
    assert len(members) == meta.members >= 2 and meta.lambda_d > 0
    assert meta.command.startswith(f"deepdefense edm --checkpoint {VICTIM}")
    assert "fashionmnist" not in " ".join(meta.d_out["kinds"]) and meta.d_out["kinds"]
    test = meta.measured["test"]
    assert len(test["member_accuracy"]) == meta.members and test["served_accuracy"] > 97
    assert all(not p.requires_grad for m in members for p in m.parameters())
    assert len({state_sha256(m) for m in members}) == meta.members, "every member has weights of its own"


def test_shipped_ensemble_is_accurate_in_domain(data_root: Path) -> None:
    """200 MNIST test digits through the served defense: ≥ 97% right (the metadata's full-test figure is ~99%)."""
    defense, _ = load_defense(VICTIM, "edm")
    x, y = load_split("mnist", data_root, "test").tensors
    labels = [a.label for a in defense.answer(x[:200], explain=False)]
    assert float((torch.tensor(labels) == y[:200]).double().mean()) >= 0.97


def _copy(tmp_path: Path) -> Path:
    """The shipped victim and its ensemble, copied side by side into ``tmp_path``; the victim's metadata path."""
    for stem in (VICTIM, f"{VICTIM}.edm"):
        for suffix in (".json", ".safetensors"):
            shutil.copy(SHIPPED_DIR / f"{stem}{suffix}", tmp_path / f"{stem}{suffix}")
    return tmp_path / f"{VICTIM}.json"


def test_a_tampered_ensemble_is_refused(tmp_path: Path) -> None:
    victim = _copy(tmp_path)
    load_ensemble(victim)  # the intact copy loads from beside the copied victim
    weights = tmp_path / f"{VICTIM}.edm.safetensors"
    flip_last_byte(weights)
    with pytest.raises(EDMError, match="sha256"):
        load_ensemble(victim)


def test_an_ensemble_of_other_victim_weights_is_refused(tmp_path: Path, victim: torch.nn.Module) -> None:
    path = _copy(tmp_path)
    meta_path = tmp_path / f"{VICTIM}.edm.json"
    meta = json.loads(meta_path.read_text())
    meta["victim"]["sha256"] = "0" * 64  # trained for weights the victim no longer has
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(EDMError, match="trained for victim weights 000000000000"):
        load_ensemble(path)
    with pytest.raises(ValueError, match="refusing to load"):  # the same refusal through the loader
        load_defense(str(path), "edm")
    shutil.copy(SHIPPED_DIR / f"{VICTIM}.edm.json", meta_path)
    other = build_model(read_meta(path))  # a model that is not the checkpoint's weights
    with pytest.raises(EDMError, match="not checkpoint lenet-mnist's weights"):
        load_ensemble(path, other)
    load_ensemble(path, victim)


def test_a_checkpoint_without_an_ensemble_says_how_to_make_one(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    (tmp_path / f"{VICTIM}.edm.json").unlink()
    with pytest.raises(ValueError, match=f"run deepdefense edm --checkpoint {VICTIM}"):
        load_defense(str(path), "edm")


# --- the server -----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_server_env")
def test_the_server_serves_edm(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, defense="edm"))  # built from the settings
    # with the server's random hash key, kept beside its budget database (server/keystore.py)
    defense, _ = load_defense(VICTIM, "edm", hash_key=app.state.runtime.edm_hash_key)
    x = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(3))
    expected = defense.answer(x, explain=True)
    with serving(app) as client:
        (model,) = client.get("/v1/models").json()["models"]
        settings = model["defense"]["settings"]
        assert model["defense"]["name"] == "edm" and settings["members"] == defense.public_settings()["members"]
        assert settings["member_choice"].startswith("keyed "), "the member choice is public"
        assert settings["lambda_d"] > 0 and "synthetic outliers" in settings["d_out"]
        response = client.post("/predict", json={"instances": [{"pixels": q.tolist()} for q in x], "explain": True})
    assert response.status_code == 200, response.text
    assert "member" not in response.text, "which member answered stays on the server"
    for got, want in zip(response.json()["predictions"], expected, strict=True):
        assert got["label"] == want.label
        assert got["probabilities"] == pytest.approx(want.probabilities.tolist(), abs=PATH_ATOL)
        assert np.allclose(got["attribution"]["values"], want.attribution.numpy(), atol=PATH_ATOL)


# --- the command ----------------------------------------------------------------------------------------------


def test_cli_trains_measures_and_writes_a_repeatable_ensemble(tmp_path: Path) -> None:
    root = bar_mnist(tmp_path / "data")
    metas = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        for suffix in (".json", ".safetensors"):
            shutil.copy(SHIPPED_DIR / f"{VICTIM}{suffix}", tmp_path / run / f"{VICTIM}{suffix}")
        argv = ["edm", "--checkpoint", str(tmp_path / run / f"{VICTIM}.json"), "--data-root", str(root)]
        argv += ["--members", "2", "--lambda-d", "0.5", "--epochs", "1", "--batch-size", "32", "--outlier-batch", "14"]
        argv += ["--held-out", "64", "--seed", "0", "--device", "cpu", "--quiet"]
        assert cli(argv) == 0
        metas.append(json.loads((tmp_path / run / f"{VICTIM}.edm.json").read_text()))
    meta = metas[0]
    assert metas[1]["sha256"] == meta["sha256"], "same seed, same data: same weights"
    assert meta["members"] == 2 and meta["lambda_d"] == 0.5 and meta["command"].startswith("deepdefense edm")
    assert meta["victim"]["sha256"] == read_meta(SHIPPED_DIR / f"{VICTIM}.json").sha256
    assert meta["measured"]["held_out"]["n"] == 64 and meta["measured"]["test"]["n"] == 64
    assert sum(meta["measured"]["test"]["answered_by_member"]) == 64
    assert "192 images fitted, 64 held out" in meta["training"]["split"]
    members, _ = load_ensemble(tmp_path / "a" / f"{VICTIM}.json")
    assert len(members) == 2
