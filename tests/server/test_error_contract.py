"""The error contract: every refusal is ``{"error": {"code", "message", "field"}}`` — unknown routes and
methods, exceptions nobody expected (a generic 500 that carries no detail), every route while the
server is starting or failed to start; every check of a defense's answer (``answer_problem``), and a
bad answer over HTTP (500 ``defense_failed``, refunded, nothing of it sent); and a bug outside the
defense costs one request at most, never the worker."""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import HTTPException
from fastapi.testclient import TestClient
from support.fakes import GatedDefense
from support.faults import marked
from support.images import SHAPE, pixels
from support.servers import bearer, error_of, key_id_of, metric_value, serving, wait_until
from support.settings import make_settings

import deepdefense.server.images
from deepdefense.defense import Answer, NoDefense
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.server.app import create_app
from deepdefense.server.isolation import answer_problem

pytestmark = pytest.mark.usefixtures("no_server_env")

KEY = "error-contract-key-0123"
SECRET = "/srv/secret/weights.safetensors sk-live-0123456789"
INTERNAL = {"code": "internal_error", "message": "internal error; the request was not answered", "field": None}


def raising_once(real: Callable[..., Any], error: Exception) -> Callable[..., Any]:
    """``real``, except that its first call raises ``error``."""
    lock, raised = threading.Lock(), []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with lock:
            first = not raised
            raised.append(True)
        if first:
            raise error
        return real(*args, **kwargs)

    return wrapper


def predict(client: TestClient, n: int = 1, explain: bool = True, key: str | None = KEY) -> Any:
    instances = [{"pixels": pixels(i)} for i in range(n)]
    return client.post(
        "/predict", json={"instances": instances, "explain": explain}, headers=bearer(key) if key else {}
    )


# -- HTTP errors and unexpected exceptions ---------------------------------------------------------------------


def test_http_errors_answer_the_one_error_shape(tmp_path: Path, defense: NoDefense) -> None:
    app = create_app(make_settings(tmp_path), defense)

    async def teapot() -> None:
        raise HTTPException(418, "short and stout", headers={"X-Tea": "earl grey"})

    app.add_api_route("/teapot", teapot)
    with serving(app) as client:
        r = client.get("/nope")
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
        assert r.json() == {"error": {"code": "not_found", "message": "Not Found", "field": None}}
        r = client.get("/predict")
        assert r.status_code == 405 and r.headers["Allow"] == "POST"
        assert r.json() == {"error": {"code": "method_not_allowed", "message": "Method Not Allowed", "field": None}}
        r = client.put("/v1/models")
        assert r.status_code == 405 and r.headers["Allow"] == "GET" and error_of(r)["code"] == "method_not_allowed"
        # not UTF-8: FastAPI cannot parse the body at all (400), which is not malformed JSON
        r = client.post("/predict", content=b'{"instances": "\xff"}', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and (error_of(r)["code"], error_of(r)["field"]) == ("invalid_body", "body")
        r = client.get("/teapot")  # a status the handler has no name for keeps its message and headers
        assert r.status_code == 418 and r.headers["X-Tea"] == "earl grey"
        assert r.json() == {"error": {"code": "http_error", "message": "short and stout", "field": None}}


def test_an_unexpected_exception_is_a_generic_500(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, defense: NoDefense
) -> None:
    app = create_app(make_settings(tmp_path), defense)

    async def boom() -> None:
        raise RuntimeError(SECRET)

    app.add_api_route("/boom", boom)
    with serving(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR, "deepdefense.server"):
        r = client.get("/boom")
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json() == {"error": INTERNAL}
        for leak in ("secret", "safetensors", "sk-live", "Traceback", "RuntimeError", "boom"):
            assert leak not in r.text
        assert client.get("/readyz").status_code == 200
    assert "unhandled error on GET /boom" in caplog.text  # the operator gets it, in the log


def test_a_bug_in_decoding_is_a_generic_500_that_spends_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, defense: NoDefense
) -> None:
    app = create_app(make_settings(tmp_path, api_keys=KEY, query_budget=1), defense)
    with serving(app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(
            deepdefense.server.images,
            "to_tensor",
            raising_once(deepdefense.server.images.to_tensor, RuntimeError(SECRET)),
        )
        r = predict(client)
        assert r.status_code == 500 and r.json() == {"error": INTERNAL}
        assert app.state.runtime.default.ledger.remaining(key_id_of(app, KEY)) == 1
        assert predict(client).status_code == 200  # the next request, with the budget of one
        assert client.get("/readyz").status_code == 200


# -- while the server is starting, or failed to start -----------------------------------------------------------


def test_while_starting_every_model_route_answers_503_not_ready(tmp_path: Path, gated: GatedDefense) -> None:
    app = create_app(make_settings(tmp_path, api_keys=KEY, retry_after_s=3), gated)
    gated.gate.clear()  # the warm-up query waits at the gate: preparing cannot finish until the test says so
    with TestClient(app) as client:
        try:
            assert gated.entered.wait(10)
            assert app.state.runtime.phase == "starting", "nothing but the gate holds the warm-up"
            starting = {
                "error": {"code": "not_ready", "message": "the model lenet-mnist is still loading", "field": None}
            }
            for r in (client.get("/readyz"), client.get("/v1/models", headers=bearer(KEY)), predict(client)):
                assert r.status_code == 503 and r.headers["Retry-After"] == "3" and r.json() == starting
            assert client.get("/v1/models").status_code == 401  # the key is checked first, starting or not
            assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
            gated.gate.set()
            wait_until(lambda: client.get("/readyz").status_code == 200)
            assert client.get("/v1/models", headers=bearer(KEY)).json()["models"][0]["name"] == "lenet-mnist"
            assert predict(client).status_code == 200
        finally:
            gated.gate.set()  # also when the test fails, so that nothing waits for it


class _Broken(NoDefense):
    name = "broken-fake"

    def answer(self, x: torch.Tensor, *, explain: bool = True) -> list[Answer]:
        raise RuntimeError(SECRET)


def test_a_server_that_failed_to_start_answers_503_not_ready(tmp_path: Path, victim: torch.nn.Module) -> None:
    app = create_app(make_settings(tmp_path), _Broken(victim, create_interpreter("gradcam", victim, SHAPE)))
    with TestClient(app) as client:
        wait_until(lambda: app.state.runtime.phase == "failed")
        failed = {"error": {"code": "not_ready", "message": "the model lenet-mnist failed to load", "field": None}}
        for r in (client.get("/readyz"), client.get("/v1/models"), predict(client, key=None)):
            assert r.status_code == 503 and r.headers["Retry-After"] == "1" and r.json() == failed
        assert client.get("/healthz").status_code == 200


# -- the answer check, branch by branch --------------------------------------------------------------------------

K = 10


def good(**changes: Any) -> Answer:
    """A well-formed answer over K classes with a 28×28 map, with ``changes`` applied."""
    a = Answer(
        label=3,
        probabilities=torch.arange(K, dtype=torch.float32).softmax(0),
        attribution=torch.rand(28, 28, generator=torch.Generator().manual_seed(0)),
    )
    for name, value in changes.items():
        setattr(a, name, value)
    return a


def probs(*head: float) -> torch.Tensor:
    """K probabilities starting with ``head``, the rest zero."""
    return torch.tensor([*head] + [0.0] * (K - len(head)))


# (explain, answer, the problem reported: None when the answer may be sent)
ANSWERS = [
    pytest.param(True, good(), None, id="good"),
    pytest.param(False, good(attribution=None), None, id="good-unexplained"),
    pytest.param(True, good(label=torch.tensor(3)), None, id="label-as-integer-tensor"),
    pytest.param(True, good(probabilities=probs(0.5, 0.5 + 5e-4)), None, id="sum-within-tolerance"),
    pytest.param(True, good(probabilities=probs(-1e-7, 1.0)), None, id="rounding-below-zero"),
    pytest.param(True, good(probabilities=probs(1.0).double()), None, id="float64-probabilities"),
    pytest.param(True, good(attribution=torch.rand(28, 28).double()), None, id="float64-map"),
    # the label
    pytest.param(True, {"label": 3}, "not an Answer but dict", id="not-an-answer"),
    pytest.param(True, None, "not an Answer but NoneType", id="none"),
    pytest.param(True, good(label=3.0), "label is not an integer", id="label-float"),
    pytest.param(True, good(label="3"), "label is not an integer", id="label-str"),
    pytest.param(True, good(label=torch.tensor(3.0)), "label is not an integer", id="label-float-tensor"),
    pytest.param(True, good(label=True), "label is not a class index", id="label-bool"),
    pytest.param(True, good(label=-1), "label is not a class index", id="label-negative"),
    pytest.param(True, good(label=K), "label is not a class index", id="label-past-the-classes"),
    # the probabilities: type, shape and dtype
    pytest.param(True, good(probabilities=[0.1] * K), "not a vector over the classes", id="probabilities-list"),
    pytest.param(True, good(probabilities=probs(1.0)[:-1]), "not a vector over the classes", id="too-short"),
    pytest.param(
        True, good(probabilities=torch.cat([probs(1.0), torch.zeros(1)])), "not a vector over the classes", id="long"
    ),
    pytest.param(True, good(probabilities=probs(1.0)[None]), "not a vector over the classes", id="row-not-vector"),
    pytest.param(True, good(probabilities=probs(1.0).long()), "not a vector over the classes", id="integer-dtype"),
    # … finite …
    pytest.param(True, good(probabilities=probs(math.nan, 1.0)), "probabilities are not finite", id="nan"),
    pytest.param(True, good(probabilities=probs(math.inf)), "probabilities are not finite", id="inf"),
    pytest.param(True, good(probabilities=probs(-math.inf, 1.0)), "probabilities are not finite", id="minus-inf"),
    # … a distribution
    pytest.param(True, good(probabilities=probs(-0.1, 1.1)), "do not form a distribution", id="negative"),
    pytest.param(True, good(probabilities=probs(0.5, 0.4)), "do not form a distribution", id="sums-below-1"),
    pytest.param(True, good(probabilities=probs(0.5, 0.51)), "do not form a distribution", id="sums-above-1"),
    pytest.param(True, good(probabilities=torch.zeros(K)), "do not form a distribution", id="all-zero"),
    # the map: not checked (and never sent) when none was asked for …
    pytest.param(False, good(), None, id="unasked-map-is-dropped"),
    pytest.param(False, good(attribution=torch.full((28, 28), math.nan)), None, id="unasked-nan-map"),
    pytest.param(False, good(attribution=torch.rand(1, 28, 28)), None, id="unasked-3d-map"),
    # … a finite 2-D float tensor when one was
    pytest.param(True, good(attribution=None), "the map is not a 2-D float tensor", id="map-missing"),
    pytest.param(True, good(attribution=torch.rand(1, 28, 28)), "the map is not a 2-D float tensor", id="map-3d"),
    pytest.param(True, good(attribution=torch.rand(28)), "the map is not a 2-D float tensor", id="map-1d"),
    pytest.param(
        True, good(attribution=torch.ones(28, 28, dtype=torch.int64)), "the map is not a 2-D float tensor", id="int-map"
    ),
    pytest.param(True, good(attribution=[[0.0] * 28] * 28), "the map is not a 2-D float tensor", id="map-as-list"),
    pytest.param(True, good(attribution=torch.full((28, 28), math.nan)), "the map is not finite", id="nan-map"),
    pytest.param(True, good(attribution=torch.full((28, 28), -math.inf)), "the map is not finite", id="inf-map"),
    # … of the image's height and width
    pytest.param(True, good(attribution=torch.rand(5, 5)), "the map is not the size of the image", id="map-5x5"),
    pytest.param(True, good(attribution=torch.rand(28, 27)), "the map is not the size of the image", id="map-28x27"),
]


def test_a_map_of_any_size_passes_when_no_size_is_given() -> None:
    assert answer_problem(good(attribution=torch.rand(5, 5)), explain=True, num_classes=K) is None


@pytest.mark.parametrize(("explain", "answer", "problem"), ANSWERS)
def test_answer_problem(explain: bool, answer: object, problem: str | None) -> None:
    found = answer_problem(answer, explain=explain, num_classes=K, map_shape=(28, 28))
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


# -- a bad answer over HTTP --------------------------------------------------------------------------------------


def _shift_label(a: Answer) -> Answer:
    a.label = K
    return a


def _double(a: Answer) -> Answer:
    a.probabilities = a.probabilities * 2
    return a


def _extra_class(a: Answer) -> Answer:
    a.probabilities = torch.cat([a.probabilities, a.probabilities[:1]])
    return a


def _map_3d(a: Answer) -> Answer:
    a.attribution = a.attribution[None] if a.attribution is not None else torch.rand(1, 28, 28)
    return a


def _small_map(a: Answer) -> Answer:
    a.attribution = torch.rand(7, 7)
    return a


def _no_map(a: Answer) -> Answer:
    a.attribution = None
    return a


def _as_dict(a: Answer) -> Any:
    return {"label": a.label, "probabilities": a.probabilities.tolist()}


def _stray_map(a: Answer) -> Answer:
    a.attribution = torch.full((28, 28), 0.123456)
    return a


BAD = {
    0.01: _shift_label,
    0.02: _double,
    0.03: _extra_class,
    0.04: _map_3d,
    0.05: _no_map,
    0.06: _as_dict,
    0.08: _small_map,
}
STRAY_MAP = 0.07


class _Crafted(NoDefense):
    """The undefended victim, except that a query marked by its first pixel gets its answer spoiled."""

    name = "crafted-fake"

    def answer(self, x: torch.Tensor, *, explain: bool = True) -> list[Any]:
        answers: list[Any] = super().answer(x, explain=explain)
        for i, first in enumerate(x[:, 0, 0, 0].tolist()):
            spoil = BAD.get(round(first, 2)) or (_stray_map if round(first, 2) == STRAY_MAP else None)
            if spoil is not None:
                answers[i] = spoil(answers[i])
        return answers


def test_a_bad_answer_over_http_is_a_refunded_500_that_sends_nothing_of_it(
    tmp_path: Path, victim: torch.nn.Module
) -> None:
    crafted = _Crafted(victim, create_interpreter("gradcam", victim, SHAPE))
    app = create_app(make_settings(tmp_path, api_keys=KEY, query_budget=1), crafted)

    def ask(marker: float, explain: bool = True) -> Any:
        body = {"instances": [{"pixels": marked(marker).tolist()}], "explain": explain}
        return client.post("/predict", json=body, headers=bearer(KEY))

    with serving(app) as client:
        for marker, spoil in BAD.items():  # a budget of one query: each 500 must be refunded for the next to run
            r = ask(marker)
            assert r.status_code == 500, spoil.__name__
            assert r.json() == {
                "error": {
                    "code": "defense_failed",
                    "message": "the defense could not answer this query; nothing of it is sent "
                    "and the request is not charged",
                    "field": None,
                }
            }, spoil.__name__
            assert not re.search(r"\d", r.text), f"{spoil.__name__}: a number in the body"
        # a map nobody asked for is dropped, not sent
        r = ask(STRAY_MAP, explain=False)
        assert r.status_code == 200 and set(r.json()["predictions"][0]) == {"label", "class_name", "probabilities"}
        assert "0.123456" not in r.text
        assert ask(0.5).status_code == 429  # the one query was spent on the good answer
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
    failed = 'dd_defense_failures_total{defense="crafted-fake",model="lenet-mnist",reason="invalid_answer"}'
    assert metric_value(metrics, failed) == len(BAD)


# -- a bug outside the defense -----------------------------------------------------------------------------------


def test_the_worker_survives_a_bug_while_settling_a_batch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, defense: NoDefense
) -> None:
    app = create_app(make_settings(tmp_path, api_keys=KEY, query_budget=2, request_timeout_s=5), defense)
    metrics = app.state.runtime.default.metrics
    with serving(app) as client:
        monkeypatch.setattr(metrics, "observe_answer", raising_once(metrics.observe_answer, RuntimeError(SECRET)))
        r = predict(client)  # its answer was computed, but the worker failed to hand it over
        assert r.status_code == 500 and error_of(r)["code"] == "defense_failed" and "secret" not in r.text
        assert predict(client, 2).status_code == 200  # the next request, and the budget was refunded
        assert client.get("/readyz").status_code == 200


def test_the_worker_survives_a_bug_while_taking_a_batch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, defense: NoDefense
) -> None:
    app = create_app(make_settings(tmp_path, request_timeout_s=5), defense)
    with serving(app) as client:
        batcher = app.state.runtime.default.batcher
        monkeypatch.setattr(batcher, "_take", raising_once(batcher._take, RuntimeError("queue bookkeeping bug")))
        # the failed take changed nothing: the instance stays queued and the next round takes it
        assert predict(client, key=None).status_code == 200
        assert predict(client, 2, key=None).status_code == 200
        assert client.get("/readyz").status_code == 200
