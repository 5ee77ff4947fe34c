"""What a request costs (docs/server.md, "What a request costs"), read back from the key's ledger and
proved by follow-up requests that pass only when the budget was refunded: a request refused before
it reaches the queue (4xx, 429, 503) spends nothing; a 500 is refunded; a request that gives up
(504, or 499 when its client goes away) pays for the instances that reached the model thread and is
refunded the queued ones, which are dropped uncomputed."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from support.fakes import GatedDefense
from support.fakes import batcher as fake_batcher
from support.images import pixels, png_bomb
from support.servers import bearer, error_of, key_id_of, metric_value, serving, wait_until
from support.settings import make_settings

from deepdefense.defense import NoDefense
from deepdefense.measure.launcher import in_thread
from deepdefense.server.app import create_app

pytestmark = pytest.mark.usefixtures("no_server_env")

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
OPERATOR = "operator-key-0123456789"  # the per-key series of /metrics are an operator's


def remaining(app: FastAPI, key: str = ALICE) -> int:
    """The key's budget left, read from the server's ledger."""
    return app.state.runtime.default.ledger.remaining(key_id_of(app, key))


def predict(client: TestClient, n: int, key: str = ALICE, seed: int = 0) -> Any:
    instances = [{"pixels": pixels(seed + i)} for i in range(n)]
    return client.post("/predict", json={"instances": instances}, headers=bearer(key))


def block_worker(client: TestClient, gated: GatedDefense, pool: ThreadPoolExecutor, n: int, key: str) -> Future[Any]:
    """Send a request of ``n`` instances and return once the model thread holds its first batch, gate closed."""
    gated.gate.clear()
    gated.entered.clear()
    first = pool.submit(predict, client, n, key)
    assert gated.entered.wait(10), "the request never reached the model thread"
    return first


@contextmanager
def released(gated: GatedDefense) -> Iterator[None]:
    """Open the gate on the way out, also when the test fails, so that nothing waits for it."""
    try:
        yield
    finally:
        gated.gate.set()


# -- refused before spending ----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _body(*instances: dict[str, Any]) -> dict[str, Any]:
    return {"instances": list(instances)}


JSON, TEXT = {"Content-Type": "application/json"}, {"Content-Type": "text/plain"}
GOOD = {"pixels": pixels()}

# (name, keyword arguments of client.post, status, code), for max_instances=2, max_image_bytes=2000,
# max_image_pixels=250_000 and max_body_bytes=100_000
REFUSED: list[tuple[str, dict[str, Any], int, str]] = [
    ("too many instances", {"json": _body(GOOD, GOOD, GOOD)}, 413, "too_many_instances"),
    ("image too large", {"json": _body({"image_b64": "A" * 4000})}, 413, "image_too_large"),
    ("pixel bomb", {"json": _body({"image_b64": png_bomb(5000, 5000)})}, 413, "too_many_pixels"),
    ("body too large", {"content": b" " * 100_001, "headers": JSON}, 413, "body_too_large"),
    ("bad shape", {"json": _body({"pixels": pixels(shape=(1, 27, 28))})}, 422, "invalid_shape"),
    ("bad channels", {"json": _body({"pixels": pixels(shape=(3, 28, 28))})}, 422, "wrong_channels"),
    ("second instance bad", {"json": _body(GOOD, {"pixels": [[[0.5]]]})}, 422, "invalid_shape"),
    ("pixel out of range", {"json": _body({"pixels": [[[2.0] * 28] * 28]})}, 422, "out_of_range"),
    ("bad base64", {"json": _body({"image_b64": "not base64!"})}, 422, "invalid_base64"),
    ("not an image", {"json": _body({"image_b64": _b64(b"hello, world")})}, 422, "undecodable_image"),
    ("malformed JSON", {"content": b'{"instances": [', "headers": JSON}, 400, "invalid_json"),
    ("not JSON", {"content": json.dumps(_body(GOOD)), "headers": TEXT}, 415, "unsupported_media_type"),
    ("compressed", {"json": _body(GOOD), "headers": {"Content-Encoding": "gzip"}}, 415, "unsupported_encoding"),
]


def test_refused_requests_spend_nothing(tmp_path: Path, defense: NoDefense) -> None:
    settings = make_settings(
        tmp_path,
        api_keys=ALICE,
        admin_keys=OPERATOR,
        query_budget=3,
        max_instances=2,
        max_image_bytes=2000,
        max_image_pixels=250_000,
        max_body_bytes=100_000,
    )
    app = create_app(settings, defense)
    with serving(app) as client:
        for name, request, status, code in REFUSED:
            options = dict(request)
            headers = bearer(ALICE) | options.pop("headers", {})
            r = client.post("/predict", headers=headers, **options)
            assert (r.status_code, error_of(r)["code"]) == (status, code), name
            assert remaining(app) == 3, f"{name}: a refused request spent budget"
        assert predict(client, 2).status_code == 200
        assert remaining(app) == 1
        r = predict(client, 2)  # over the budget: refused whole, nothing spent
        assert r.status_code == 429 and error_of(r)["code"] == "budget_exhausted"
        assert remaining(app) == 1
        assert predict(client, 1).status_code == 200
        assert remaining(app) == 0
        metrics = client.get("/metrics", headers=bearer(OPERATOR)).text
    assert (
        metric_value(metrics, f'dd_key_queries_total{{key="{key_id_of(app, ALICE)}"}}') == 3
    )  # only the answered ones


# -- 503 ---------------------------------------------------------------------------------------------------------


def test_a_full_queue_refunds_what_it_spent(tmp_path: Path, defense: NoDefense) -> None:
    app = create_app(
        make_settings(tmp_path, api_keys=ALICE, admin_keys=OPERATOR, query_budget=3, queue_size=2, retry_after_s=2),
        defense,
    )
    with serving(app) as client:
        r = predict(client, 3)  # three instances never fit a queue of two
        assert r.status_code == 503 and error_of(r)["code"] == "queue_full" and r.headers["Retry-After"] == "2"
        assert remaining(app) == 3
        assert predict(client, 2).status_code == 200 and predict(client, 1).status_code == 200  # the whole budget
        assert predict(client, 1).status_code == 429
        metrics = client.get("/metrics", headers=bearer(OPERATOR)).text
    assert (
        metric_value(metrics, f'dd_key_queries_total{{key="{key_id_of(app, ALICE)}"}}') == 3
    )  # the refused 3 not admitted


def test_an_overloaded_server_refunds_what_it_spent(tmp_path: Path, gated: GatedDefense) -> None:
    # any measured cost exceeds 1 µs of expected latency: a busy server refuses every new request
    settings = make_settings(tmp_path, api_keys=f"{ALICE},{BOB}", query_budget=2, max_expected_latency_s=1e-6)
    app = create_app(settings, gated)
    with serving(app) as client, ThreadPoolExecutor(1) as pool, released(gated):
        first = block_worker(client, gated, pool, 1, BOB)
        r = predict(client, 2)
        assert r.status_code == 503 and error_of(r)["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
        assert remaining(app) == 2
        gated.gate.set()
        assert first.result().status_code == 200
        assert predict(client, 2).status_code == 200  # idle again: the refunded budget buys the whole request
        assert (remaining(app, ALICE), remaining(app, BOB)) == (0, 1)


def test_not_ready_spends_nothing(tmp_path: Path, gated: GatedDefense) -> None:
    app = create_app(make_settings(tmp_path, api_keys=ALICE, query_budget=1), gated)
    gated.gate.clear()  # the warm-up query waits at the gate: the server stays "starting"
    with TestClient(app) as client, released(gated):
        assert gated.entered.wait(10)
        r = predict(client, 1)
        assert r.status_code == 503 and error_of(r)["code"] == "not_ready"
        assert remaining(app) == 1
        gated.gate.set()
        wait_until(lambda: client.get("/readyz").status_code == 200)
        assert predict(client, 1).status_code == 200


# -- 500 -----------------------------------------------------------------------------------------------------------


class _Failing(NoDefense):
    """Raises on a batch holding an all-white query."""

    name = "failing-fake"

    def answer(self, x: torch.Tensor, *, explain: bool = True) -> list:
        if bool((x == 1).flatten(1).all(1).any()):
            raise RuntimeError("diverged")
        return super().answer(x, explain=explain)


def test_a_defense_failure_is_refunded(tmp_path: Path, victim: torch.nn.Module) -> None:
    from deepdefense.defense.interpreters import create_interpreter

    failing = _Failing(victim, create_interpreter("gradcam", victim, (1, 28, 28)))
    app = create_app(make_settings(tmp_path, api_keys=ALICE, query_budget=2), failing)
    with serving(app) as client:
        white = {"pixels": torch.ones(1, 28, 28).tolist()}
        r = client.post("/predict", json={"instances": [{"pixels": pixels()}, white]}, headers=bearer(ALICE))
        assert r.status_code == 500 and error_of(r)["code"] == "defense_failed"
        assert remaining(app) == 2  # both refunded, the instance that was answered too: nothing was sent
        assert predict(client, 2).status_code == 200


def test_an_internal_error_after_spending_is_refunded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, defense: NoDefense
) -> None:
    import deepdefense.server.routes.predict as route

    app = create_app(make_settings(tmp_path, api_keys=ALICE, query_budget=2), defense)
    with serving(app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(route, "_prediction", _raising(RuntimeError("bug while building the response")))
        r = predict(client, 2)
        assert r.status_code == 500 and error_of(r)["code"] == "internal_error"
        assert remaining(app) == 2  # the answers were computed, but nothing was sent
        monkeypatch.undo()
        assert predict(client, 2).status_code == 200


def _raising(error: Exception) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    return fail


# -- giving up: 504 and 499 ----------------------------------------------------------------------------------------


def test_a_timed_out_request_pays_for_what_reached_the_model(tmp_path: Path, gated: GatedDefense) -> None:
    settings = make_settings(tmp_path, api_keys=ALICE, query_budget=4, max_batch_size=1, request_timeout_s=1.0)
    app = create_app(settings, gated)
    with serving(app) as client, ThreadPoolExecutor(1) as pool, released(gated):
        # one instance on the model thread (held at the gate), two queued behind it
        late = block_worker(client, gated, pool, 3, ALICE).result(timeout=30)
        assert late.status_code == 504 and error_of(late)["code"] == "timeout"
        assert remaining(app) == 3  # the instance on the model thread is paid for, the two queued ones are not
        gated.gate.set()  # the held instance finishes; its answer is discarded
        wait_until(lambda: metric_value(client.get("/metrics").text, "dd_dropped_instances_total") == 2)
        assert gated.batches[1:] == [(1, True)]  # after the warm-up, only the paid-for instance was computed
        assert remaining(app) == 3
        assert predict(client, 3).status_code == 200  # passes only if the two dropped instances were refunded
        assert predict(client, 1).status_code == 429


def test_a_client_that_goes_away_pays_for_what_reached_the_model(tmp_path: Path, gated: GatedDefense) -> None:
    app = create_app(make_settings(tmp_path, api_keys=ALICE, query_budget=4, max_batch_size=1), gated)
    runtime = app.state.runtime.default
    with in_thread(app) as url, released(gated):
        gated.gate.clear()
        gated.entered.clear()
        body = json.dumps({"instances": [{"pixels": pixels(i)} for i in range(3)]}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(
                b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (ALICE.encode(), len(body), body)
            )
            assert gated.entered.wait(10)  # the first instance is on the model thread …
            wait_until(lambda: runtime.batcher.queued == 2)  # … the other two are queued
        # the server notices the disconnect, drops the queued instances and refunds them
        wait_until(lambda: 'status="499"} 1.0' in httpx.get(f"{url}/metrics").text)
        wait_until(lambda: remaining(app) == 3)
        gated.gate.set()
        wait_until(lambda: metric_value(httpx.get(f"{url}/metrics").text, "dd_dropped_instances_total") == 2)
        assert gated.batches[1:] == [(1, True)]
        assert remaining(app) == 3
        more = {"instances": [{"pixels": pixels(i)} for i in range(3)]}
        assert httpx.post(f"{url}/predict", json=more, headers=bearer(ALICE), timeout=30).status_code == 200
        assert httpx.post(f"{url}/predict", json=more, headers=bearer(ALICE), timeout=30).status_code == 429


def test_giving_up_counts_exactly_the_instances_handed_to_the_model_thread(gated: GatedDefense) -> None:
    """The batcher's side of the rule, without HTTP or timeouts: ``Ticket.give_up`` drops what is queued
    and counts what the worker took; the count does not change afterwards."""

    async def scenario() -> tuple[int, int, int]:
        batcher = fake_batcher(gated, max_batch=2, capacity=16, timeout=60.0, max_latency=60.0)
        batcher.start()
        try:
            gated.gate.clear()
            ticket = batcher.enqueue(torch.rand(5, 1, 28, 28), explain=False)
            deadline = asyncio.get_running_loop().time() + 10
            while not gated.entered.is_set():  # the worker took the first two
                assert asyncio.get_running_loop().time() < deadline, "the worker never took a batch"
                await asyncio.sleep(0.005)
            computed = ticket.give_up()
            gated.gate.set()
            while batcher._running or batcher.queued:
                assert asyncio.get_running_loop().time() < deadline, "the batch never finished"
                await asyncio.sleep(0.005)
            return (
                computed,
                ticket.give_up(),
                int(batcher.metrics.registry.get_sample_value("dd_dropped_instances_total", {"model": "m"})),
            )
        finally:
            gated.gate.set()
            await batcher.stop()

    computed, again, dropped = asyncio.run(scenario())
    assert (computed, again, dropped) == (2, 2, 3)
    assert gated.batches == [(2, False)]
