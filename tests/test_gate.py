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

from defense import NoDefense
from defense.gate import MisinformationGate
from defense.interpreters import create_interpreter
from defense.loader import load_defense, load_gate
from models.checkpoint import load_checkpoint
from models.data import load_split
from models.lenet import LeNet
from server.app import create_app
from server.settings import ServerSettings

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
    misinformation = LeNet().eval().requires_grad_(False)
    return MisinformationGate(
        inner, marked, NoDefense(misinformation, create_interpreter("gradcam", misinformation, SHAPE))
    )


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


def test_flagged_queries_are_misinformed_with_a_map_that_agrees_with_the_label(gate: MisinformationGate) -> None:
    x = queries(6, marked=[1, 4])
    gated = gate.answer(x)
    for i in (1, 4):
        a = gated[i]
        assert a.misinformed
        assert torch.isclose(a.probabilities.sum(), torch.tensor(1.0), atol=1e-5)
        assert a.label == int(a.probabilities.argmax())
        # the map is the misinformation model's own map for the label it answers
        interpreter = gate.misinformer.interpreter
        own = interpreter.explain({}, x[i : i + 1], torch.tensor([a.label])).attribution[0]
        torch.testing.assert_close(a.attribution, own, rtol=0, atol=1e-5, msg="the map is not the answered label's")
    assert not torch.allclose(gated[1].probabilities, gate.inner.answer(x[1:2])[0].probabilities, atol=1e-3)


def test_each_query_goes_through_one_path_and_a_forced_one_is_misinformed(gate: MisinformationGate) -> None:
    """Flagged queries are answered by the misinformer alone, the others by the wrapped defense alone: both
    paths are the same computation on networks of one architecture, so neither costs more; ``misinform``
    (an escalated key's queries) sends a query the score did not flag through the misinformation path."""
    calls: dict[str, list[int]] = {"inner": [], "misinformer": []}

    def counting(name: str, d: NoDefense) -> NoDefense:
        kind = type(
            "Counting", (NoDefense,), {"answer": lambda self, x, **kw: calls[name].append(len(x)) or d.answer(x, **kw)}
        )
        return kind(d.model, d.interpreter)

    counted = MisinformationGate(counting("inner", gate.inner), marked, counting("misinformer", gate.misinformer))
    x = queries(6, marked=[1, 4])
    answers = counted.answer(x)
    assert calls == {"inner": [4], "misinformer": [2]}
    assert [a.misinformed for a in answers] == [False, True, False, False, True, False]
    forced = counted.answer(x, misinform=torch.tensor([True, False, False, False, False, False]))
    assert [a.misinformed for a in forced] == [True, True, False, False, True, False]
    torch.testing.assert_close(forced[0].probabilities, gate.misinformer.answer(x[:1])[0].probabilities)


def test_flagged_answers_look_like_any_other(gate: MisinformationGate) -> None:
    x = queries(4, marked=[0])
    gated, plain = gate.answer(x), gate.answer(x, explain=False)
    assert gated[0].attribution.shape == gated[1].attribution.shape == SHAPE[1:]
    assert plain[0].attribution is None and plain[1].attribution is None
    assert gate.name == gate.inner.name and gate.public_settings()["gate"] == "misinform"


def test_a_twin_of_a_flagged_query_moves_its_answer_as_an_honest_twin_does(data_root: Path) -> None:
    """The shipped gate in front of DeepDefense: a misinformed answer comes from the per-query engine on the
    misinformation model, so asking again with one pixel moved by 1/255 changes its probabilities and map
    as it changes an honest answer's (a fixed network's answer would not move: the twin test a thief runs)."""
    engine, _ = load_defense("lenet-mnist", "deepdefense", "gradcam", data_root=str(data_root))
    gated = load_gate(engine, "lenet-mnist")
    digits = load_split("mnist", str(data_root), "test").tensors[0][:6]
    x = torch.cat([digits, torch.rand((6, *SHAPE), generator=torch.Generator().manual_seed(0))])
    twin = x.clone()
    twin[:, 0, 14, 14] = torch.where(x[:, 0, 14, 14] < 0.5, x[:, 0, 14, 14] + 1 / 255, x[:, 0, 14, 14] - 1 / 255)
    first, second = gated.answer(x), gated.answer(twin)
    assert [a.misinformed for a in first] == [False] * 6 + [True] * 6, "the shipped score should flag noise only"
    moved = [
        (
            a.misinformed,
            float((a.probabilities - b.probabilities).abs().max()),
            float((a.attribution - b.attribution).abs().max()),
        )
        for a, b in zip(first, second, strict=True)
    ]
    for misinformed, _, dmap in moved:
        assert dmap > CHANGED, f"a {'misinformed' if misinformed else 'honest'} map did not move with its twin"
    honest_dp = sorted(dp for m, dp, _ in moved if not m)
    misinformed_dp = sorted(dp for m, dp, _ in moved if m)
    assert misinformed_dp[len(misinformed_dp) // 2] > CHANGED, f"misinformed answers stood still: {misinformed_dp}"
    assert sum(dp > CHANGED for dp in honest_dp) > 0, f"honest answers stood still: {honest_dp}"


def test_the_served_gate_misinforms_noise_and_answers_digits_as_the_victim(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--defense none --gate misinform`` (the AM baseline) with the shipped domain score and misinformation
    model: digits get the victim's answer, noise gets the misinformation model's; both look the same, and
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
        wait_until(lambda: app.state.runtime.state != "starting", timeout=60)
        assert app.state.runtime.state == "failed" and "no domain score" in (app.state.runtime.failure or "")


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
