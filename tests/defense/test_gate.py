"""The misinformation gate (defense/gate.py) with fakes: which queries it answers, and how.

The first tests use a fake domain score that flags queries whose first pixel is marked, and a seeded
random LeNet as the misinformation model, so they need no data set and no shipped files; the last ones
serve the shipped domain score and misinformation model of ``lenet-mnist``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from support.numerics import CHANGED, PATH_ATOL
from support.servers import bearer, metric_value, serving, wait_until
from support.settings import make_settings

from deepdefense.defense import NoDefense
from deepdefense.defense.gate import MISINFORM, SCORE, TRUST, MisinformationGate, rerank
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.defense.loader import load_defense, load_gate
from deepdefense.models.checkpoint import load_checkpoint
from deepdefense.models.data import load_split
from deepdefense.models.lenet import LeNet
from deepdefense.server.app import create_app
from deepdefense.server.settings import ServerSettings

pytestmark = pytest.mark.usefixtures("no_server_env")  # the servers here are configured by the test alone

SHAPE = (1, 28, 28)
MARK = 0.5  # a query whose first pixel is MARK is out of domain for the fake score


def marked(x: torch.Tensor) -> torch.Tensor:
    """The fake domain score's flags: True for marked queries."""
    return x[:, 0, 0, 0] == MARK


@pytest.fixture(scope="module")
def gate() -> MisinformationGate:
    victim, _ = load_checkpoint("lenet-mnist")
    victim.requires_grad_(False)
    inner = NoDefense(victim, create_interpreter("gradcam", victim, SHAPE))
    torch.manual_seed(1)
    return MisinformationGate(inner, marked, LeNet().eval().requires_grad_(False))


def queries(n: int, marked: list[int]) -> torch.Tensor:
    x = torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = 0.9
    x[marked, 0, 0, 0] = MARK
    return x


def test_unflagged_queries_get_the_wrapped_defenses_answer(gate: MisinformationGate) -> None:
    x = queries(6, marked=[1, 4])
    gated, plain = gate.answer(x), gate.inner.answer(x)
    for i in (0, 2, 3, 5):
        assert not gated[i].misinformed
        torch.testing.assert_close(gated[i].probabilities, plain[i].probabilities, rtol=0, atol=PATH_ATOL)
        torch.testing.assert_close(gated[i].attribution, plain[i].attribution, rtol=0, atol=PATH_ATOL)


def test_rerank_gives_the_same_values_to_the_ranked_classes() -> None:
    p = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    ranking = torch.tensor([[2, 0, 1], [0, 1, 2]])
    torch.testing.assert_close(rerank(p, ranking), torch.tensor([[0.3, 0.1, 0.6], [0.6, 0.2, 0.2]]))


def test_flagged_queries_get_the_misinformation_ranking_on_the_honest_answers_values(gate: MisinformationGate) -> None:
    """A flagged answer is the wrapped defense's answer with its values given to the classes in the order the
    misinformation model ranks them: the same confidence, entropy and map as an honest answer, another label."""
    x = queries(6, marked=[1, 4])
    gated, plain = gate.answer(x), gate.inner.answer(x)
    with torch.no_grad():
        ranking = gate.misinformation(x).argsort(1, descending=True)
    for i in (1, 4):
        a, honest = gated[i], plain[i]
        assert a.misinformed and a.label == int(ranking[i, 0]) == int(a.probabilities.argmax())
        torch.testing.assert_close(a.probabilities.sort().values, honest.probabilities.sort().values)
        assert (a.probabilities[ranking[i]].diff() <= 0).all(), "not the misinformation ranking"  # exact: ties too
        torch.testing.assert_close(a.attribution, honest.attribution, rtol=0, atol=PATH_ATOL)
    assert gated[1].label != plain[1].label or gated[4].label != plain[4].label, "the misinformation label is honest"


def test_every_query_runs_one_computation_and_a_forced_one_is_misinformed(gate: MisinformationGate) -> None:
    """Every query, flagged or not, is answered by the wrapped defense (one call for the batch) and ranked by
    the misinformation model, so a flagged query costs what any other costs; ``misinform`` (an escalated key's
    queries) sends a query the score did not flag through the misinformation path."""
    calls: list[int] = []

    class Counting(NoDefense):
        def answer(self, x: torch.Tensor, **kw):  # type: ignore[no-untyped-def]
            calls.append(len(x))
            return super().answer(x, **kw)

    counted = MisinformationGate(Counting(gate.model, gate.interpreter), marked, gate.misinformation)
    x = queries(6, marked=[1, 4])
    answers = counted.answer(x)
    assert calls == [6]
    assert [a.misinformed for a in answers] == [False, True, False, False, True, False]
    assert [a.flagged for a in answers] == [False, True, False, False, True, False]
    override = torch.tensor([MISINFORM, SCORE, SCORE, SCORE, TRUST, TRUST], dtype=torch.int8)
    forced = counted.answer(x, override=override)
    assert [a.misinformed for a in forced] == [True, True, False, False, False, False]
    assert [a.flagged for a in forced] == [False, True, False, False, True, False]  # what the score said, always
    with torch.no_grad():
        assert forced[0].label == int(gate.misinformation(x[:1]).argmax())
    trusted = counted.inner.answer(x[4:5])[0]  # a trusted key's flagged query: the defense's own answer
    assert forced[4].label == trusted.label
    torch.testing.assert_close(forced[4].probabilities, trusted.probabilities)


def test_flagged_answers_look_like_any_other(gate: MisinformationGate) -> None:
    x = queries(4, marked=[0])
    gated, plain = gate.answer(x), gate.answer(x, explain=False)
    assert gated[0].attribution.shape == gated[1].attribution.shape == SHAPE[1:]
    assert plain[0].attribution is None and plain[1].attribution is None
    assert gate.name == gate.inner.name and gate.public_settings()["gate"] == "misinform"


def test_a_twin_of_a_flagged_query_moves_its_answer_as_an_honest_twin_does(data_root: Path) -> None:
    """The shipped gate in front of DeepDefense: a misinformed answer keeps the per-query engine's values and
    map, so asking again with one pixel moved by 1/255 changes its probabilities and map exactly as it changes
    the honest answer to the same query (a fixed network's answer would not move: the twin test a thief runs)."""
    engine, _ = load_defense("lenet-mnist", "deepdefense", "gradcam", data_root=str(data_root))
    gated = load_gate(engine, "lenet-mnist")
    digits = load_split("mnist", str(data_root), "test").tensors[0][:6]
    x = torch.cat([digits, torch.rand((6, *SHAPE), generator=torch.Generator().manual_seed(0))])
    twin = x.clone()
    twin[:, 0, 14, 14] = torch.where(x[:, 0, 14, 14] < 0.5, x[:, 0, 14, 14] + 1 / 255, x[:, 0, 14, 14] - 1 / 255)
    assert [a.misinformed for a in gated.answer(x)] == [False] * 6 + [True] * 6, "the score should flag noise only"
    everything = torch.full((len(x),), MISINFORM, dtype=torch.int8)

    def moves(answer) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """Per query: how far its sorted probabilities and its map move with its twin."""
        a, b = answer(x), answer(twin)
        pairs = list(zip(a, b, strict=True))
        dp = [(p.probabilities.sort().values - q.probabilities.sort().values).abs().max() for p, q in pairs]
        dm = [(p.attribution - q.attribution).abs().max() for p, q in pairs]
        return torch.stack([torch.stack(dp), torch.stack(dm)], 1)

    honest, misinformed = moves(gated.inner.answer), moves(lambda q: gated.answer(q, override=everything))
    torch.testing.assert_close(misinformed, honest, rtol=0, atol=PATH_ATOL)
    assert (honest[:6, 0] > CHANGED).sum() > 0 and (honest[:, 1] > CHANGED).all(), f"nothing moved: {honest}"


def test_the_served_gate_misinforms_noise_and_answers_digits_as_the_victim(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--defense none --gate misinform`` (the AM baseline) with the shipped domain score and misinformation
    model: digits get the victim's answer, noise gets the misinformation model's classes; both look the same, and
    only an operator's ``/metrics`` counts the misinformed answers."""
    monkeypatch.setenv("DD_ADMIN_KEYS", "operator-key-0123")
    digits = load_split("mnist", str(data_root), "test").tensors[0][:8]
    noise = torch.rand((4, *SHAPE), generator=torch.Generator().manual_seed(0))
    victim, _ = load_checkpoint("lenet-mnist")
    with serving(create_app(make_settings(tmp_path, defense="none", gate="misinform"))) as client:
        assert client.get("/v1/models").json()["models"][0]["defense"]["settings"]["gate"] == "misinform"
        body = {"instances": [{"pixels": x.tolist()} for x in torch.cat([digits, noise])], "explain": True}
        r = client.post("/predict", json=body)
        assert r.status_code == 200
        predictions = r.json()["predictions"]
        anonymous = client.get("/metrics").text
        metrics = client.get("/metrics", headers=bearer("operator-key-0123")).text
    with torch.no_grad():
        expected = victim(torch.cat([digits, noise])).softmax(-1)
    # these 8 test digits are not flagged (the score flags few test digits, docs/results/domain-score.md)
    for p, e in zip(predictions[:8], expected[:8], strict=True):
        torch.testing.assert_close(torch.tensor(p["probabilities"]), e, rtol=0, atol=PATH_ATOL)
    for p, e in zip(predictions[8:], expected[8:], strict=True):
        assert not torch.allclose(torch.tensor(p["probabilities"]), e, atol=CHANGED), "noise got the victim's answer"
    assert {tuple(p) for p in map(dict.keys, predictions)} == {("label", "class_name", "probabilities", "attribution")}
    assert metric_value(metrics, 'dd_misinformed_answers_total{defense="none"}') == 4
    assert "dd_misinformed" not in anonymous and "dd_answers_total" in anonymous, "anonymous /metrics tells the gate"


def test_a_checkpoint_without_a_domain_score_cannot_be_gated(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, checkpoint="lenet-fashionmnist", gate="misinform"))
    with TestClient(app):
        wait_until(lambda: app.state.runtime.phase != "starting", timeout=60)
        assert app.state.runtime.phase == "failed" and "no domain score" in (app.state.runtime.failure or "")


def test_the_gate_is_on_by_default_where_the_checkpoint_ships_it(tmp_path: Path) -> None:
    """``gate auto`` (the default): on for ``lenet-mnist`` (domain score and misinformation model shipped), off
    for ``lenet-fashionmnist`` (neither), which is served as before instead of failing to start."""
    assert ServerSettings.model_fields["gate"].default == "auto"
    assert make_settings(tmp_path, gate="auto").gated("lenet-mnist")
    assert not make_settings(tmp_path, gate="none").gated("lenet-mnist")
    assert not make_settings(tmp_path, gate="auto").gated("lenet-fashionmnist")
    app = create_app(make_settings(tmp_path, gate="auto"))
    with serving(app) as client:
        assert client.get("/v1/models").json()["models"][0]["defense"]["settings"]["gate"] == "misinform"
    with serving(create_app(make_settings(tmp_path, gate="auto", checkpoint="lenet-fashionmnist"))) as client:
        assert "gate" not in client.get("/v1/models").json()["models"][0]["defense"]["settings"]
