"""Cluster mode (``server/cluster.py``): the app as Ray Serve replicas that share one budget in Redis.

Against a real Ray (a local instance of 2 CPUs, no dashboard) and a real ``redis-server``: two replicas,
one key with a budget of 100, 200 concurrent single-instance requests through Serve's proxy (each retried
after a 503's Retry-After, as clients do); exactly 100 are answered and 100 refused with 429
``budget_exhausted``, and both replicas answered some. No
fake and no skip: without ``ray[serve]`` (in the ``dev`` extra) these tests fail and say what to install.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.redis_server import RedisServer, redis_key_id
from support.servers import bearer
from support.settings import make_settings

from deepdefense.measure.cluster_faults import replica_pids
from deepdefense.measure.launcher import LOOPBACK, free_port
from deepdefense.server import cluster
from deepdefense.server.settings import ServerSettings

pytestmark = pytest.mark.usefixtures("no_server_env")

REPO = Path(__file__).resolve().parents[2]
KEY = "cluster-test-key"
BUDGET = 100
REQUESTS = 200
#: Longest a request of the budget-edge burst keeps being refused 503 (and retried after Retry-After).
RETRY_DEADLINE_S = 120.0
#: Longest wait for the scrapes of /metrics to have reached both replicas.
SCRAPE_DEADLINE_S = 60.0
BLANK = {"instances": [{"pixels": [[[0.0] * 28] * 28]}]}
#: The kill: this many concurrent requests of this many instances (2 replicas hold 8 each), killed once
#: the replicas hold them; longest wait for that.
KILL_REQUESTS, KILL_INSTANCES, KILL_DEADLINE_S = 16, 4, 120.0


def ray_modules() -> tuple[Any, Any]:
    """``ray`` and ``ray.serve``; the test fails (never skips) when they are not installed."""
    try:
        import ray
        from ray import serve
    except ImportError as err:
        pytest.fail(
            f"ray[serve] is not installed ({err}); the cluster tests need a real Ray: "
            "pip install -e '.[dev]' (or '.[cluster]')",
            pytrace=False,
        )
    return ray, serve


@pytest.fixture
def local_ray() -> Iterator[Any]:
    """A local Ray instance of 2 CPUs without its dashboard; Serve and Ray are shut down afterwards."""
    ray, serve = ray_modules()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, logging_level="warning")
    try:
        yield ray
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


async def predict_all(url: str, n: int) -> tuple[list[httpx.Response], int]:
    """``n`` concurrent requests, each retried after its 503's Retry-After (as clients do) until it is answered
    otherwise; (the final answers, the 503s seen on the way). A burst of 200 is more than 2 replicas and their
    gateways' queues hold (docs/scaling.md), so some requests are refused 503 ``overloaded`` first."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    auth = {"Authorization": f"Bearer {KEY}"}
    refused = 0
    deadline = time.monotonic() + RETRY_DEADLINE_S

    async def until_answered(client: httpx.AsyncClient) -> httpx.Response:
        nonlocal refused
        while (r := await client.post("/predict", json=BLANK)).status_code == 503:
            assert r.json()["error"]["code"] in ("overloaded", "queue_full"), r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert time.monotonic() < deadline, f"still refused after {RETRY_DEADLINE_S} s"
            refused += 1
            await asyncio.sleep(int(r.headers["Retry-After"]))
        return r

    async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits, headers=auth) as client:
        return list(await asyncio.gather(*(until_answered(client) for _ in range(n)))), refused


def predict_counts(metrics_text: str) -> tuple[str, Counter[str]]:
    """(replica, /predict requests by status) of one replica's /metrics."""
    replica, counts = "", Counter[str]()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "dd_server_info":
                replica = sample.labels["replica"]
            elif sample.name == "dd_http_requests_total" and sample.labels["route"] == "/predict":
                counts[sample.labels["status"]] += int(sample.value)
    return replica, counts


def scrape_every_replica(url: str, replicas: int) -> dict[str, Counter[str]]:
    """/metrics through the proxy until each replica has answered a scrape (Serve picks one per request)."""
    seen: dict[str, Counter[str]] = {}
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while len(seen) < replicas:
        assert time.monotonic() < deadline, f"only replicas {sorted(seen)} answered /metrics in {SCRAPE_DEADLINE_S} s"
        replica, counts = predict_counts(httpx.get(f"{url}/metrics", timeout=30).text)
        seen[replica] = counts
    return seen


def test_two_replicas_spend_one_shared_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer, local_ray: Any
) -> None:
    monkeypatch.setenv("DD_API_KEYS", KEY)  # read here, sent to the replicas inside the settings
    settings = make_settings(
        tmp_path,
        checkpoint=["lenet-mnist", "lenet-fashionmnist"],  # the burst asks the default, lenet-mnist
        replicas=2,
        state=redis_server.url,
        query_budget=BUDGET,
        host=LOOPBACK,
        port=free_port(),
        request_timeout_s=120,
        max_expected_latency_s=60,
    )
    url = cluster.start_replicas(settings)

    page = httpx.get(f"{url}/", timeout=30)  # the playground through Serve's proxy and a gateway, open without a key
    assert page.status_code == 200 and '<canvas id="pad"' in page.text, page.text[:200]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    script = httpx.get(f"{url}/playground/playground.js", timeout=30)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")

    answers, refused = asyncio.run(predict_all(url, REQUESTS))

    statuses = Counter(r.status_code for r in answers)
    assert statuses == {200: BUDGET, 429: REQUESTS - BUDGET}, statuses
    for r in answers:
        if r.status_code == 200:
            assert len(r.json()["predictions"]) == 1
        else:
            assert r.json()["error"]["code"] == "budget_exhausted"
    assert redis_server.client().get(f"dd:budget:lenet-mnist:{redis_key_id(redis_server, KEY)}") == str(BUDGET)
    per_replica = scrape_every_replica(url, 2)
    assert "main" not in per_replica, per_replica  # replica ids of Serve, not the one-process label
    assert all(sum(counts.values()) > 0 for counts in per_replica.values()), per_replica
    by_replicas = sum((c for c in per_replica.values()), Counter())
    assert (by_replicas["200"], by_replicas["429"]) == (BUDGET, REQUESTS - BUDGET), by_replicas
    assert by_replicas["503"] <= refused  # the gateways' own refusals never reached a replica
    fashion = httpx.post(
        f"{url}/predict", json=BLANK | {"model": "lenet-fashionmnist"}, headers=bearer(KEY), timeout=60
    )
    assert fashion.status_code == 200 and fashion.json()["model"] == "lenet-fashionmnist", "a budget per model"
    assert redis_server.client().get(f"dd:budget:lenet-fashionmnist:{redis_key_id(redis_server, KEY)}") == "1"
    assert httpx.get(f"{url}/readyz", timeout=30).json()["models"] == ["lenet-mnist", "lenet-fashionmnist"]


def test_a_replica_killed_under_load_costs_nothing_and_answers_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer, local_ray: Any, data_root: Path
) -> None:
    """SIGKILL of one replica's process while both hold requests (DeepDefense, 4 instances each): every client
    gets 200 or 503 JSON with Retry-After (``replica_lost`` for those the dead replica held), the budget
    spent is exactly the answered instances, and no hold is left behind."""
    monkeypatch.setenv("DD_API_KEYS", KEY)
    settings = make_settings(
        tmp_path,
        defense="deepdefense",
        data_root=str(data_root),
        replicas=2,
        state=redis_server.url,
        query_budget=10_000,
        host=LOOPBACK,
        port=free_port(),
        request_timeout_s=120,
        max_expected_latency_s=60,
        max_batch_wait_ms=50,
    )
    url = cluster.start_replicas(settings)
    raw = redis_server.client()
    body = {"instances": [{"pixels": [[[0.1 * i] * 28] * 28]} for i in range(KILL_INSTANCES)], "explain": True}

    async def load_and_kill() -> tuple[list[httpx.Response], int]:
        limits = httpx.Limits(max_connections=KILL_REQUESTS)
        async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits, headers=bearer(KEY)) as client:
            sent = [asyncio.ensure_future(client.post("/predict", json=body)) for _ in range(KILL_REQUESTS)]
            deadline = time.monotonic() + KILL_DEADLINE_S
            while len(list(raw.scan_iter("dd:hold:*"))) < KILL_REQUESTS - 2:  # both replicas hold requests
                assert time.monotonic() < deadline, "the replicas did not take the requests in time"
                await asyncio.sleep(0.05)
            victim = replica_pids()[0]
            os.kill(victim, signal.SIGKILL)
            return list(await asyncio.gather(*sent)), victim

    answers, victim = asyncio.run(load_and_kill())

    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) <= {200, 503} and statuses[503] > 0, statuses
    for r in answers:
        if r.status_code == 503:
            assert r.json()["error"]["code"] in ("replica_lost", "overloaded") and int(r.headers["Retry-After"]) >= 1
    assert sum(r.json()["error"]["code"] == "replica_lost" for r in answers if r.status_code == 503) > 0
    spent = int(raw.get(f"dd:budget:lenet-mnist:{redis_key_id(redis_server, KEY)}") or 0)
    assert spent == KILL_INSTANCES * statuses[200], f"spent {spent} for {statuses[200]} answered requests"
    assert list(raw.scan_iter("dd:hold:*")) == [], "a hold outlived its request"
    assert victim not in replica_pids()
    raw.close()


# -- without a cluster: what the settings and the config file promise -------------------------------------


def test_replicas_with_a_budget_need_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DD_API_KEYS", KEY)
    with pytest.raises(ValueError, match="redis://"):
        make_settings(tmp_path, replicas=2, query_budget=BUDGET)
    make_settings(tmp_path, replicas=1, query_budget=BUDGET)  # one replica may keep its SQLite file
    make_settings(tmp_path, replicas=2)  # nothing per key to share


def test_the_settings_reach_a_replica_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dict sent to the replicas rebuilds the same settings where no DD_* variable is set, keys included."""
    (tmp_path / "keys").write_text("# a comment\nsecond-key#0123456789\n")
    monkeypatch.setenv("DD_API_KEYS", KEY)
    monkeypatch.setenv("DD_API_KEYS_FILE", str(tmp_path / "keys"))
    settings = make_settings(tmp_path, replicas=2, state="redis://127.0.0.1:1/0", query_budget=BUDGET, device="cuda:1")
    payload = cluster.settings_payload(settings)
    yaml.safe_dump(payload)  # plain data only
    monkeypatch.delenv("DD_API_KEYS")
    monkeypatch.delenv("DD_API_KEYS_FILE")
    monkeypatch.setenv("DD_QUERY_BUDGET", "5")  # a replica host's environment changes nothing
    rebuilt = ServerSettings(**payload)
    assert rebuilt.keys() == [KEY, "second-key#0123456789"]
    assert (rebuilt.query_budget, rebuilt.state, rebuilt.replicas) == (BUDGET, settings.state, 2)
    assert rebuilt.device == "cuda" and rebuilt.budget_db.is_absolute()


def test_deployment_options(tmp_path: Path) -> None:
    ray_modules()
    settings = make_settings(tmp_path, replicas=3, max_ongoing_requests=4, replica_cpus=0.5, device="cuda")
    deployment = cluster.deployment(settings)
    assert (deployment.name, deployment.num_replicas, deployment.max_ongoing_requests) == ("DeepDefense", 3, 4)
    assert deployment.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 1}
    assert cluster.deployment(make_settings(tmp_path, device="cpu")).ray_actor_options["num_gpus"] == 0
    gateway = cluster.gateway_deployment(settings)  # Serve's ingress: holds no model, reserves no CPU
    assert (gateway.name, gateway.num_replicas, gateway.ray_actor_options) == ("Gateway", 3, {"num_cpus": 0})
    assert gateway.max_ongoing_requests == 3 * 4 + settings.max_queued_requests


def test_serve_config_builds_the_application(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve run docker/serve-config.yaml``: its import path is the builder, its args are valid settings."""
    _, serve = ray_modules()
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "docker" / "serve-config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve run` / `serve deploy` check first
    (application,) = config["applications"]
    module, name = application["import_path"].split(":")
    builder = getattr(import_module(module), name)
    assert builder is cluster.app_builder
    monkeypatch.setenv("DD_API_KEYS", KEY)
    built = builder(application["args"])
    assert isinstance(built, serve.Application)
    assert application["args"]["replicas"] > 1 and application["args"]["state"].startswith("redis://")
