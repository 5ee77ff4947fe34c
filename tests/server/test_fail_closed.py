"""Fail closed over HTTP, with the real DeepDefense engine built by the server itself.

A server whose engine cannot meet its constraints (a Spearman floor above 1, or no optimisation step at all)
must answer every query with the documented safe answer (``defense.engine.safe_answer``, docs/design.md
"Fail closed"): probabilities softmax(k, k−1, …, 1, 0, …) on the victim's top-k, and a map of each pixel's
normalised rank in the victim's map; never the victim's raw probabilities or map. The ablations show what
docs/design.md "Ablations" documents for them: ``dd-s`` always shows the victim's map (and the safe
probabilities), ``dd-i`` always shows the victim's probabilities (and the safe map).

And a failure of the victim's side (``DeepDefense.reference``) for one query costs only that query: the
other requests of its micro-batch get their answers, its own request a 500 ``defense_failed``, refunded.

The expected answers are computed here from the undefended victim (``NoDefense``, another path than the
engine's) and the documented rule, not by the engine's code.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from support.images import SHAPE, queries
from support.numerics import CHANGED, PATH_ATOL
from support.servers import bearer, error_of, metric_value, serving
from support.settings import make_settings
from torch import Tensor

from deepdefense.defense import Answer, NoDefense
from deepdefense.defense.engine import DeepDefense, safe_answer
from deepdefense.defense.loader import load_defense
from deepdefense.server.app import create_app
from deepdefense.server.isolation import Failure, answer_isolated
from deepdefense.server.precision import rounded

pytestmark = pytest.mark.usefixtures("no_server_env")

MODES = ("deepdefense", "dd-s", "dd-i")
#: Engine options under which no query can be answered from a misdirection model, so every answer is the
#: fallback: a Spearman floor no map can reach (ρ ≤ 1; the optimisation runs its steps, none is feasible),
#: or no step at all (the start is never an answer).
IMPOSSIBLE = {
    "spearman-above-1": {"steps": 2, "min_spearman": 1.01},
    "no-steps": {"steps": 0},
}
QUERIES = 4
KEY = "fail-closed-key-0123456789"


def assert_rank_map_of(served: Tensor, victim_map: Tensor) -> None:
    """``served`` is the rank-only map of ``victim_map`` that ``safe_answer`` documents.

    Not compared value by value with a locally computed safe map: the victim's map reaches the server along
    another path (batch shape, threads), rounding can split or join its near-equal values, and every
    normalised rank then moves by a share of a rank. So the two defining properties are checked instead:
    (1) its values are exactly the levels 0, 1/M, …, 1 (a rank, nothing of the victim's values), up to
    float32 rounding of the division; (2) it orders the pixels as the victim's map does wherever the victim's
    values differ by more than PATH_ATOL (within that, rounding may decide either way); and it is not the
    victim's map itself."""
    levels = served.unique()
    top = len(levels) - 1
    assert top >= 1, "a constant map: the victim's order is lost"
    steps = torch.arange(top + 1, dtype=torch.float64) / top
    torch.testing.assert_close(levels.double(), steps, rtol=0, atol=1e-6, msg="not a rank map: levels not j/M")
    s, m = served.flatten().double(), victim_map.flatten().double()
    victim_above = (m[:, None] - m[None, :]) > PATH_ATOL
    assert bool((s[:, None] > s[None, :])[victim_above].all()), "the map does not keep the victim's order"
    assert not torch.allclose(s, m, atol=CHANGED), "the victim's own map was sent"


@pytest.fixture(scope="module")
def victim_answers(defense: NoDefense) -> list[Answer]:
    """The undefended victim's answers (probabilities and Grad-CAM maps) on ``queries(QUERIES)``, in one batch here."""
    answers = defense.answer(queries(QUERIES), explain=True)
    for a in answers:  # the top-k (k = 1) is the same along any path: no near-tie that rounding could flip
        top2 = a.probabilities.topk(2).values
        assert float(top2[0] - top2[1]) > 100 * PATH_ATOL, "a near-tie: the top-1 may differ by path"
    return answers


@pytest.fixture(params=list(IMPOSSIBLE), scope="module")
def impossible(request: pytest.FixtureRequest) -> dict[str, Any]:
    return IMPOSSIBLE[request.param]


@pytest.mark.parametrize("mode", MODES)
def test_every_answer_is_the_documented_safe_answer(
    tmp_path: Path, mode: str, impossible: dict[str, Any], victim_answers: list[Answer]
) -> None:
    settings = make_settings(tmp_path, defense=mode, engine=impossible, max_batch_size=QUERIES)
    x = queries(QUERIES)
    instances = [{"pixels": xi.tolist()} for xi in x]
    with serving(create_app(settings)) as client:  # the engine is built by the server, as `serve` builds it
        engine = client.app.state.runtime.default.defense  # type: ignore[attr-defined]
        assert isinstance(engine, DeepDefense) and engine.mode == mode
        assert {k: getattr(engine.config, k) for k in impossible} == impossible
        explained = client.post("/predict", json={"instances": instances, "explain": True})
        plain = client.post("/predict", json={"instances": instances, "explain": False})
        metrics = client.get("/metrics").text
    assert explained.status_code == plain.status_code == 200
    assert explained.json()["defense"] == plain.json()["defense"] == mode
    k = engine.config.top_k
    for explain, response in ((True, explained), (False, plain)):
        for pred, own in zip(response.json()["predictions"], victim_answers, strict=True):
            safe_probs, _ = safe_answer(own.probabilities, own.attribution, k)
            probs = torch.tensor(pred["probabilities"])
            assert pred["label"] == int(own.probabilities.argmax())
            if mode == "dd-i":  # documented: DD-I shows the victim's probabilities, whatever the map
                torch.testing.assert_close(probs, own.probabilities, rtol=0, atol=PATH_ATOL)
            else:
                # identity is the property: the safe probabilities are a function of the top-k indices only (the
                # same here: no near-tie), the same vector softmax(k, …, 1, 0, …) placed at the same positions,
                # as the server sends it (server/precision.py). And not the victim's own (support/numerics.py, CHANGED).
                assert pred["probabilities"] == rounded(safe_probs), f"{mode}: not the safe probabilities: {probs}"
                assert not torch.allclose(probs, own.probabilities, rtol=CHANGED, atol=0), "the victim's were sent"
            if not explain:
                assert "attribution" not in pred, "a map was sent though none was asked for"
                continue
            values = torch.tensor(pred["attribution"]["values"])
            assert values.shape == SHAPE[1:]
            if mode == "dd-s":  # documented: DD-S shows the victim's map, whatever the probabilities
                torch.testing.assert_close(values, own.attribution, rtol=0, atol=PATH_ATOL)
            else:
                assert_rank_map_of(values, own.attribution)
    # the fallback flag is not in the response body; the server counts it, for every answer it sent (the warm-up
    # query bypasses the counters)
    answered = 2 * QUERIES
    assert metric_value(metrics, f'dd_answers_total{{defense="{mode}"}}') == answered
    assert metric_value(metrics, f'dd_defense_fallbacks_total{{defense="{mode}"}}') == answered


# -- a failure of the victim's side of one query -----------------------------------------------------------

BAD = 1.0  # the first pixel of the query whose reference() fails (every other query has 0 there)


@pytest.fixture
def fragile() -> Iterator[tuple[DeepDefense, list[int]]]:
    """A real engine (2 steps) whose ``reference`` raises for any batch holding a marked query; records the
    size of every batch it is given."""
    engine, _ = load_defense("lenet-mnist", "deepdefense", "gradcam", steps=2)
    assert isinstance(engine, DeepDefense)
    real, sizes = engine.reference, []

    def reference(x: Tensor) -> Any:
        sizes.append(len(x))
        if bool((x[:, 0, 0, 0] == BAD).any()):
            raise RuntimeError("injected fault in the victim's reference")
        return real(x)

    engine.reference = reference  # type: ignore[method-assign]
    yield engine, sizes


def test_a_failing_reference_loses_only_its_query_in_process(fragile: tuple[DeepDefense, list[int]]) -> None:
    engine, sizes = fragile
    x = queries(QUERIES)
    x[1, 0, 0, 0] = BAD
    results = answer_isolated(engine, x, explain=True, num_classes=10)
    assert [type(r) for r in results] == [Answer, Failure, Answer, Answer]
    assert results[1] == Failure("exception")
    assert sizes[0] == QUERIES  # the whole micro-batch was tried first
    alone = [engine.answer(x[i : i + 1])[0] for i in (0, 2, 3)]  # the others are answered one by one, as here
    for got, own in zip((results[0], results[2], results[3]), alone, strict=True):
        assert isinstance(got, Answer) and not got.fallback and got.label == own.label
        torch.testing.assert_close(got.probabilities, own.probabilities, rtol=0, atol=PATH_ATOL)
        torch.testing.assert_close(got.attribution, own.attribution, rtol=0, atol=PATH_ATOL)


def test_a_failing_reference_over_http_fails_its_request_only_and_is_refunded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fragile: tuple[DeepDefense, list[int]]
) -> None:
    engine, sizes = fragile
    monkeypatch.setenv("DD_API_KEYS", KEY)
    settings = make_settings(
        tmp_path,
        defense="deepdefense",
        query_budget=QUERIES + 1,
        max_batch_size=QUERIES,
        max_batch_wait_ms=5_000,  # the micro-batch is taken once all QUERIES requests are queued
        request_timeout_s=120,
        max_expected_latency_s=120,
        model_worker_kind="thread",  # the fault is patched into this process's engine, which records the batches
    )
    x = queries(QUERIES, seed=1)
    x[2, 0, 0, 0] = BAD
    with serving(create_app(settings, engine)) as client, ThreadPoolExecutor(QUERIES) as pool:
        warm_up = len(sizes)

        def post(xi: Tensor) -> Any:
            return client.post("/predict", json={"instances": [{"pixels": xi.tolist()}]}, headers=bearer(KEY))

        responses = list(pool.map(post, x))
        assert sizes[warm_up] == QUERIES, f"the requests did not share one micro-batch: batches {sizes[warm_up:]}"
        assert [r.status_code for r in responses] == [200, 200, 500, 200]
        assert error_of(responses[2])["code"] == "defense_failed"
        assert "injected" not in responses[2].text
        # the budget of QUERIES + 1 queries: 3 answered, the failed one refunded, so two more are left
        assert post(queries(1, seed=2)[0]).status_code == 200
        assert post(queries(1, seed=3)[0]).status_code == 200
        assert post(queries(1, seed=4)[0]).status_code == 429
        metrics = client.get("/metrics").text
    # the server answered the others one by one after the micro-batch failed: each is its own answer alone
    for i in (0, 1, 3):
        (pred,) = responses[i].json()["predictions"]
        (own,) = engine.answer(x[i : i + 1])
        assert pred["label"] == own.label and not own.fallback
        probs = torch.tensor(pred["probabilities"])
        torch.testing.assert_close(probs, own.probabilities, rtol=0, atol=PATH_ATOL)
        torch.testing.assert_close(torch.tensor(pred["attribution"]["values"]), own.attribution, rtol=0, atol=PATH_ATOL)
    assert metric_value(metrics, 'dd_defense_failures_total{defense="deepdefense",reason="exception"}') == 1
    assert metric_value(metrics, "dd_batch_isolation_retries_total") == 1
    assert metric_value(metrics, 'dd_defense_fallbacks_total{defense="deepdefense"}') == 0
