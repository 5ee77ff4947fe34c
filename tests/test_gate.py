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
from support.servers import metric_value, serving, wait_until
from support.settings import make_settings

from defense import NoDefense
from defense.gate import MisinformationGate
from defense.interpreters import create_interpreter
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
    interpreter = create_interpreter("gradcam", misinformation, SHAPE)
    return MisinformationGate(inner, marked, misinformation=misinformation, misinformation_interpreter=interpreter)


def queries(n: int, marked: list[int]) -> torch.Tensor:
    x = torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = 0.9
    x[marked, 0, 0, 0] = MARK
    return x


def test_unflagged_queries_get_the_wrapped_defenses_answer(gate: MisinformationGate) -> None:
    x = queries(6, marked=[1, 4])
    gated, plain = gate.answer(x), gate.inner.answer(x)
    for i in (0, 2, 3, 5):
        # identity is the property: an unflagged answer is the wrapped defense's, computed on the same batch
        assert torch.equal(gated[i].probabilities, plain[i].probabilities), "an unflagged answer was changed"
        assert torch.equal(gated[i].attribution, plain[i].attribution), "an unflagged map was changed"
        assert not gated[i].misinformed


def test_flagged_queries_are_misinformed_with_a_map_that_agrees_with_the_label(gate: MisinformationGate) -> None:
    x = queries(6, marked=[1, 4])
    gated = gate.answer(x)
    for i in (1, 4):
        a = gated[i]
        assert a.misinformed
        assert torch.isclose(a.probabilities.sum(), torch.tensor(1.0), atol=1e-5)
        assert a.label == int(a.probabilities.argmax())
        # the map is the misinformation model's own map for the label it answers
        own = gate.misinformation_interpreter.explain({}, x[i : i + 1], torch.tensor([a.label])).attribution[0]
        torch.testing.assert_close(a.attribution, own, rtol=0, atol=1e-5, msg="the map is not the answered label's")
    assert not torch.allclose(gated[1].probabilities, gate.inner.answer(x[1:2])[0].probabilities, atol=1e-3)


def test_skipping_the_wrapped_defense_for_flagged_queries_gives_the_same_answers(gate: MisinformationGate) -> None:
    """``equal_cost=False`` (the evaluation harness) answers only the unflagged queries through ``inner``."""
    calls: list[int] = []
    inner = gate.inner
    counting = type(
        "Counting", (NoDefense,), {"answer": lambda self, x, **kw: calls.append(len(x)) or inner.answer(x, **kw)}
    )
    cheap = MisinformationGate(
        counting(inner.model, inner.interpreter),
        marked,
        gate.misinformation,
        gate.misinformation_interpreter,
        equal_cost=False,
    )
    x = queries(6, marked=[1, 4])
    fast, full = cheap.answer(x), gate.answer(x)
    assert calls == [4], "the wrapped defense should answer the 4 unflagged queries only"
    for a, b in zip(fast, full, strict=True):
        assert (a.label, a.misinformed) == (b.label, b.misinformed)
        torch.testing.assert_close(a.probabilities, b.probabilities, rtol=0, atol=PATH_ATOL)
        torch.testing.assert_close(a.attribution, b.attribution, rtol=0, atol=PATH_ATOL)
    assert cheap.answer(queries(3, marked=[0, 1, 2]))[2].misinformed and calls == [4], "all flagged: inner not called"


def test_on_the_server_every_query_pays_both_paths(gate: MisinformationGate) -> None:
    """``equal_cost`` (the server's default): the wrapped defense and the misinformation model both answer
    every query, flagged or not, so that a misinformed answer does not take longer than another."""
    seen: list[int] = []
    hook = gate.misinformation.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    try:
        answers = gate.answer(queries(6, marked=[1, 4]))
    finally:
        hook.remove()
    assert seen and all(n == 6 for n in seen), f"the misinformation model did not answer every query: {seen}"
    assert [a.misinformed for a in answers] == [False, True, False, False, True, False]


def test_flagged_answers_look_like_any_other(gate: MisinformationGate) -> None:
    x = queries(4, marked=[0])
    gated, plain = gate.answer(x), gate.answer(x, explain=False)
    assert gated[0].attribution.shape == gated[1].attribution.shape == SHAPE[1:]
    assert plain[0].attribution is None and plain[1].attribution is None
    assert gate.name == gate.inner.name and gate.public_settings()["gate"] == "misinform"


def test_the_served_gate_misinforms_noise_and_answers_digits_as_the_victim(tmp_path: Path, data_root: Path) -> None:
    """``--defense none --gate misinform`` (the AM baseline) with the shipped domain score and misinformation
    model: digits get the victim's answer, noise gets the misinformation model's; both look the same."""
    digits = load_split("mnist", str(data_root), "test").tensors[0][:8]
    noise = torch.rand((4, *SHAPE), generator=torch.Generator().manual_seed(0))
    victim, _ = load_checkpoint("lenet-mnist")
    with serving(create_app(make_settings(tmp_path, defense="none", gate="misinform"))) as client:
        assert client.get("/v1/models").json()["models"][0]["defense"]["settings"]["gate"] == "misinform"
        body = {"instances": [{"pixels": x.tolist()} for x in torch.cat([digits, noise])], "explain": True}
        r = client.post("/predict", json=body)
        assert r.status_code == 200
        predictions = r.json()["predictions"]
        metrics = client.get("/metrics").text
    with torch.no_grad():
        expected = victim(torch.cat([digits, noise])).softmax(-1)
    # these 8 test digits are not flagged (the score flags few test digits, docs/results/domain-score.md)
    for p, e in zip(predictions[:8], expected[:8], strict=True):
        torch.testing.assert_close(torch.tensor(p["probabilities"]), e, rtol=0, atol=PATH_ATOL)
    for p, e in zip(predictions[8:], expected[8:], strict=True):
        assert not torch.allclose(torch.tensor(p["probabilities"]), e, atol=CHANGED), "noise got the victim's answer"
    assert {tuple(p) for p in map(dict.keys, predictions)} == {("label", "probabilities", "attribution")}
    assert metric_value(metrics, 'dd_misinformed_answers_total{defense="none"}') == 4


def test_a_checkpoint_without_a_domain_score_cannot_be_gated(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, checkpoint="lenet-fashionmnist", gate="misinform"))
    with TestClient(app):
        wait_until(lambda: app.state.runtime.state != "starting", timeout=60)
        assert app.state.runtime.state == "failed" and "no domain score" in (app.state.runtime.failure or "")


def test_the_gate_is_on_by_default_where_the_checkpoint_ships_it(tmp_path: Path) -> None:
    """``gate auto`` (the default): on for ``lenet-mnist`` (domain score and misinformation model shipped), off
    for ``lenet-fashionmnist`` (neither), which is served as before instead of failing to start."""
    assert ServerSettings.model_fields["gate"].default == "auto"
    assert make_settings(tmp_path, gate="auto").gated() and not make_settings(tmp_path, gate="none").gated()
    assert not make_settings(tmp_path, gate="auto", checkpoint="lenet-fashionmnist").gated()
    app = create_app(make_settings(tmp_path, gate="auto"))
    with serving(app) as client:
        assert client.get("/v1/models").json()["models"][0]["defense"]["settings"]["gate"] == "misinform"
    with serving(create_app(make_settings(tmp_path, gate="auto", checkpoint="lenet-fashionmnist"))) as client:
        assert "gate" not in client.get("/v1/models").json()["models"][0]["defense"]["settings"]
