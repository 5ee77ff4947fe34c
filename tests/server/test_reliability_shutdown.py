"""Ends of requests and of the server: SIGTERM drains the requests in flight before the process
exits (and refuses new connections meanwhile); a client that disconnects while its request is
queued frees that work — its instances are dropped uncomputed."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.fakes import GatedDefense
from support.faults import marked
from support.servers import metric_value, wait_until
from support.settings import make_settings

from deepdefense.measure.launcher import free_port, in_thread, spawned
from deepdefense.server.app import create_app

pytestmark = pytest.mark.usefixtures("no_server_env")

FAKE_SERVER = Path(__file__).resolve().parents[1] / "support" / "faults.py"


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"DD_BUDGET_DB": str(tmp_path / "budget.sqlite"), "DD_MAX_BATCH_WAIT_MS": "1"}
    command = [sys.executable, str(FAKE_SERVER), "--port", str(port), "--delay", "1.0"]
    with spawned(command, url, env=env) as (process, _), ThreadPoolExecutor(3) as pool:
        bodies = [{"instances": [{"pixels": marked(0.9, i).tolist()}], "explain": False} for i in range(3)]
        pending = [pool.submit(httpx.post, f"{url}/predict", json=b, timeout=60) for b in bodies]
        # three /predict requests in flight, plus the /metrics request asking
        wait_until(lambda: metric_value(httpx.get(f"{url}/metrics").text, "dd_http_requests_in_flight") >= 4)
        process.send_signal(signal.SIGTERM)
        refused_while_draining = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
            except httpx.ConnectError:
                refused_while_draining = process.poll() is None and not all(f.done() for f in pending)
                break
            time.sleep(0.05)
        responses = [f.result() for f in pending]
        process.wait(30)
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all(len(r.json()["predictions"]) == 1 for r in responses)
    assert refused_while_draining
    # uvicorn re-raises the signal once it has drained: killed by SIGTERM, after a clean shutdown
    assert process.returncode in (0, -signal.SIGTERM)


def test_a_client_that_disconnects_frees_its_queued_work(tmp_path: Path, gated: GatedDefense) -> None:
    app = create_app(make_settings(tmp_path, request_timeout_s=60), gated)

    def batcher_of() -> Any:
        return app.state.runtime.default.batcher

    with in_thread(app) as url, ThreadPoolExecutor(1) as pool:
        gated.gate.clear()
        gated.entered.clear()
        first = pool.submit(
            httpx.post, f"{url}/predict", json={"instances": [{"pixels": marked(0.9, 0).tolist()}]}, timeout=60
        )
        assert gated.entered.wait(10)  # the model thread is busy with the first request
        body = json.dumps({"instances": [{"pixels": marked(0.9, 1).tolist()}]}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(
                b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_until(lambda: batcher_of().queued == 1)
        # the server notices the disconnect and cancels the request while its instance is still queued
        wait_until(lambda: 'status="499"} 1.0' in httpx.get(f"{url}/metrics").text)
        gated.gate.set()
        assert first.result().status_code == 200
        wait_until(lambda: metric_value(httpx.get(f"{url}/metrics").text, "dd_dropped_instances_total") == 1)
        assert batcher_of().queued == 0
    assert gated.batches == [(1, True), (1, True)]  # the warm-up and the first request; never the second
