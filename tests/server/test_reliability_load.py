"""Load and soak: 32 concurrent clients against a server in its own process. Overload must become
immediate 503s with Retry-After — no timeouts, no transport errors, latency bounded by the
admission limit, resident memory flat.

Latency is judged by the server's own clock (``dd_queue_wait_seconds``), which admission controls,
not by the load generator's: its 32 clients share the CPU with the server, so on a slow or busy
machine their round trips grow for reasons admission cannot see. Time limits here are either the
server's configured limits (a 504 or a client timeout is a failure by status) or many times the
typical value.

The CI form runs 5 s against a fast fake defense. The two-minute form runs against the real
defended server (``deepdefense serve`` with its defaults, DeepDefense + Grad-CAM) and is behind a
flag: ``DD_SOAK=1 python -m pytest -q tests/server/test_reliability_load.py`` (``DD_SOAK_SECONDS``
changes its length, ``DD_SOAK_REPORT=path.json`` keeps its report).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.settings import make_settings

from deepdefense.clients.latency import percentiles
from deepdefense.clients.load import LoadConfig, LoadReport, pss_mb, rss_mb, run_load
from deepdefense.defense import NoDefense
from deepdefense.measure.launcher import free_port, in_thread, serve_command, spawned
from deepdefense.server.app import create_app

pytestmark = pytest.mark.usefixtures("no_server_env")

FAKE_SERVER = Path(__file__).resolve().parents[1] / "support" / "faults.py"
# read at import: the no_server_env fixture (every test here) clears every DD_* variable before each test
SOAK = bool(os.environ.get("DD_SOAK"))
SOAK_SECONDS = float(os.environ.get("DD_SOAK_SECONDS", "120"))
SOAK_REPORT = os.environ.get("DD_SOAK_REPORT")


def assert_overload_is_orderly(report: LoadReport) -> None:
    """Served answers and 503s with Retry-After only: no 504 (nothing reached the server's request
    timeout), no transport error (nor the client's timeout), no other status."""
    assert report.served > 0
    assert set(report.statuses) <= {"200", "503"}, report.statuses
    assert all(e in ("503 overloaded", "503 queue_full") for e in report.errors), report.errors
    assert report.retry_after_s["missing"] == 0


def queue_waits(url: str) -> dict[float, float]:
    """The server's ``dd_queue_wait_seconds`` histogram: instances that waited at most ``le`` seconds
    before their micro-batch ran, by bucket (``inf``: every instance that ran)."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    return {
        float(s.labels["le"]): s.value
        for s in families["dd_queue_wait_seconds"].samples
        if s.name == "dd_queue_wait_seconds_bucket"
    }


def test_short_soak_overload_becomes_503_with_retry_after(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {
        "DD_BUDGET_DB": str(tmp_path / "budget.sqlite"),
        "DD_MAX_BATCH_SIZE": "4",
        "DD_MAX_BATCH_WAIT_MS": "2",
        "DD_MAX_EXPECTED_LATENCY_S": "0.3",
        "DD_REQUEST_TIMEOUT_S": "5",
    }
    command = [sys.executable, str(FAKE_SERVER), "--port", str(port), "--delay", "0.02"]
    with spawned(command, url, env=env) as (process, shutdown):
        report = asyncio.run(
            run_load(LoadConfig(url=url, clients=32, duration_s=5, timeout_s=10, server_pid=process.pid, seed=0))
        )
        waits = queue_waits(url)
    summary = {k: v for k, v in report.as_dict().items() if k not in ("server_metrics", "rss_mb")} | {"waits": waits}
    assert_overload_is_orderly(report)
    # It was overloaded and it served. Measured on one core, alone or beside 1-2 CPU hogs: 120-210 served,
    # 75-100 refused. 503s do not fall on a slower machine (admission refuses more); served does, hence 20.
    assert report.served >= 20 and report.statuses.get("503", 0) >= 10, summary
    assert report.server_metrics["dd_rejected_requests_total{reason=overloaded}"] >= 10
    assert report.retry_after_s["min"] >= 1
    # Admission keeps latency near DD_MAX_EXPECTED_LATENCY_S (0.3 s) by the server's clock: 95% of admitted
    # instances start within 0.5 s (the limit + 0.2 s). Measured on one core, alone or beside 1-2 CPU hogs:
    # all of them did (mean 0.08-0.13 s); with admission off (limit 3600 s) most wait 0.7-0.8 s, so this fails.
    # (The clients' own p99, 0.35-1.75 s in the same runs and 0.8 s with admission off, was the old check, < 2 s:
    # it measures the load generator's share of the CPU, not admission.)
    assert waits[0.5] >= 0.95 * waits[float("inf")] > 0, summary
    # memory sampled once a second (6 samples in 5 s); 3 is enough to see growth if the sampler runs late
    assert report.rss_mb["samples"] >= 3 and report.rss_mb["growth"] < 50, report.rss_mb
    # the drain after SIGTERM takes 0.3 s here; 10 s is the bound on "exits promptly"
    assert shutdown["exit_code"] in (0, -15) and shutdown["seconds_after_sigterm"] < 10, shutdown


@pytest.mark.skipif(not SOAK, reason="the two-minute soak runs with DD_SOAK=1")
def test_two_minute_soak_against_the_defended_server(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"DD_BUDGET_DB": str(tmp_path / "budget.sqlite"), "DD_LOG_LEVEL": "warning"}
    with spawned(serve_command(port), url, env=env, log=sys.stderr) as (process, shutdown):
        report = asyncio.run(
            run_load(
                LoadConfig(url=url, clients=32, duration_s=SOAK_SECONDS, timeout_s=60, server_pid=process.pid, seed=0)
            )
        )
    report.shutdown = shutdown
    if SOAK_REPORT:
        Path(SOAK_REPORT).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    assert_overload_is_orderly(report)
    assert report.rss_mb["growth_second_half"] < 50
    assert shutdown["exit_code"] in (0, -15)


def test_the_load_command_reports_over_loopback_only(
    tmp_path: Path, defense: NoDefense, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepdefense.cli import main

    with in_thread(create_app(make_settings(tmp_path), defense), like_serve=True) as url:
        out = tmp_path / "report.json"
        assert (
            main(
                [
                    "load",
                    "--url",
                    url,
                    "--clients",
                    "3",
                    "--duration",
                    "60",  # an upper bound only: the 20-request cap ends the run (in under a second here)
                    "--max-requests",
                    "20",
                    "--no-explain",
                    "--server-pid",
                    str(os.getpid()),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["requests"] == report["served"] == 20 and report["statuses"] == {"200": 20}
    assert set(report["latency_ms"]) == {"p50", "p95", "p99", "max", "mean"} and report["rss_mb"]["samples"] >= 1
    assert report["server_metrics"]["dd_answers_total"] == 20
    for bad in (["--url", "http://192.0.2.1:8000"], ["--clients", "1000"], ["--duration", "0"]):
        assert main(["load", *bad]) == 2


def test_percentiles_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0, "mean": 50.5}
    assert percentiles([3.0]) == {"p50": 3.0, "p95": 3.0, "p99": 3.0, "max": 3.0, "mean": 3.0}
    assert percentiles([]) == {}


def test_the_server_keeps_idle_connections_longer_than_clients_do(tmp_path: Path, defense: NoDefense) -> None:
    """With equal idle timeouts a client may reuse a connection just as the server closes it: a soak
    client waiting a 4-second Retry-After (+ jitter) got a transport ReadError that way."""
    from deepdefense.server.app import uvicorn_config

    app = create_app(make_settings(tmp_path), defense)
    assert uvicorn_config(app, app.state.runtime.settings).timeout_keep_alive > 2 * httpx.Limits().keepalive_expiry


def test_the_memory_of_a_server_counts_its_worker_processes() -> None:
    # a child holding 64 MiB resident: the load's figure for this process must include it
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; b = bytearray(64 << 20); print(flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline()  # allocated
        alone, together = rss_mb(os.getpid()), rss_mb(os.getpid(), descendants=True)
        assert alone is not None and together is not None
        assert together - alone >= 60, (alone, together)
        proportional = pss_mb(os.getpid())  # this process's and the child's, shared pages split between them
        assert proportional is not None and proportional >= 60, proportional
    finally:
        child.kill()
        child.wait()
