"""Micro-batching, the bounded queue (503 with Retry-After) and the request timeout (504), driven by
a fake defense that holds the model thread until the test lets it go."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from support.fakes import GatedDefense
from support.images import pixels
from support.servers import metric_value, serving, wait_until
from support.settings import make_settings

from deepdefense.server.app import create_app

pytestmark = pytest.mark.usefixtures("no_server_env")


def block_worker(client: TestClient, gated: GatedDefense, pool: ThreadPoolExecutor) -> Future[Any]:
    """Send one request and return once the model thread is busy with it, gate closed."""
    gated.gate.clear()
    gated.entered.clear()
    first = pool.submit(post, client, 1)
    assert gated.entered.wait(10)
    return first


def post(client: TestClient, n: int, explain: bool = True) -> Any:
    return client.post("/predict", json={"instances": [{"pixels": pixels(i)} for i in range(n)], "explain": explain})


def test_concurrent_requests_share_micro_batches(tmp_path: Path, gated: GatedDefense) -> None:
    app = create_app(make_settings(tmp_path, max_batch_size=4, max_batch_wait_ms=50), gated)
    with serving(app) as client, ThreadPoolExecutor(8) as pool:
        first = block_worker(client, gated, pool)
        queued = [pool.submit(post, client, 1) for _ in range(5)]
        wait_until(lambda: app.state.runtime.default.batcher.queued == 5)
        queued.append(pool.submit(post, client, 2, False))
        wait_until(lambda: app.state.runtime.default.batcher.queued == 7)
        gated.gate.set()
        responses = [f.result() for f in [first, *queued]]
        metrics = client.get("/metrics").text
    assert all(r.status_code == 200 for r in responses)
    assert "attribution" not in responses[-1].json()["predictions"][0]
    # warm-up, the blocking request, then ≤ 4 same-flag instances per batch: 4 + 1 explained, 2 not
    assert gated.batches[1:] == [(1, True), (4, True), (1, True), (2, False)]
    assert metric_value(metrics, 'dd_batch_instances_count{model="lenet-mnist"}') == 4
    assert metric_value(metrics, 'dd_queue_wait_seconds_count{model="lenet-mnist"}') == 8


def test_full_queue_answers_503_with_retry_after(tmp_path: Path, gated: GatedDefense) -> None:
    app = create_app(make_settings(tmp_path, max_batch_size=1, queue_size=3, retry_after_s=2), gated)
    with serving(app) as client, ThreadPoolExecutor(4) as pool:
        first = block_worker(client, gated, pool)
        waiting = [pool.submit(post, client, 1), pool.submit(post, client, 2)]
        wait_until(lambda: app.state.runtime.default.batcher.queued == 3)
        full = post(client, 1)
        gated.gate.set()
        assert [f.result().status_code for f in [first, *waiting]] == [200, 200, 200]
        metrics = client.get("/metrics").text
    assert full.status_code == 503 and full.headers["Retry-After"] == "2"
    assert full.json()["error"]["code"] == "queue_full"
    assert 'dd_http_requests_total{method="POST",route="/predict",status="503"} 1.0' in metrics


def test_slow_answer_times_out_with_504(tmp_path: Path, gated: GatedDefense) -> None:
    app = create_app(make_settings(tmp_path, request_timeout_s=0.2), gated)
    with serving(app) as client, ThreadPoolExecutor(2) as pool:
        first = block_worker(client, gated, pool)
        late = post(client, 1)  # queued behind the blocked one: dropped unanswered after 0.2 s
        slow = first.result(timeout=10)
        gated.gate.set()
        wait_until(lambda: app.state.runtime.default.batcher.queued == 0)
    for r in (slow, late):
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert len(gated.batches) == 2  # the warm-up and the blocked request; the late one never ran
