"""Cluster mode's gateway (``server/gateway.py``) and the budget holds it releases (``server/budget.py``),
without Ray: the gateway forwards to a real app through :func:`call_app` in the same process, budgets in a
real ``redis-server``. A replica that dies is a call that spends under the request's hold, as the app
does, and then raises what Ray raises for a dead actor (here a stand-in class; the Ray run is in
tests/server/test_cluster.py). Shows: answers pass through unchanged, a client's hold header never reaches the
app, a lost replica is 503 ``replica_lost`` JSON with Retry-After and its spend refunded exactly once,
Serve's full queue is 503 ``overloaded``, and the body limits hold before anything is forwarded."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from support.images import pixels
from support.redis_server import RedisServer, redis_key_id
from support.servers import bearer, error_of, wait_until
from support.settings import make_settings

from deepdefense.defense import NoDefense
from deepdefense.server.app import create_app
from deepdefense.server.budget import HOLD_HEADER, RedisLedger, new_hold
from deepdefense.server.gateway import Forwarded, Gateway, Returned, call_app, gateway_app
from deepdefense.server.state import connect_redis

pytestmark = pytest.mark.usefixtures("no_server_env")

KEY = "gateway-test-key-0123"
BUDGET = 10
RETRY_AFTER_S = 3


class ReplicaDied(Exception):
    """Stands for ``ray.exceptions.RayActorError``: the replica's process died with the call."""


class QueueFull(Exception):
    """Stands for ``ray.serve.exceptions.BackPressureError``."""


def ask(client: TestClient, n: int = 1, **headers: str) -> Any:
    body = {"instances": [{"pixels": pixels(i)} for i in range(n)]}
    return client.post("/predict", json=body, headers=bearer(KEY) | headers)


@contextmanager
def through_gateway(
    tmp_path: Path,
    redis_server: RedisServer,
    defense: NoDefense,
    replica: Callable[[Any, Forwarded], Awaitable[Returned]] | None = None,
) -> Iterator[tuple[TestClient, RedisLedger]]:
    """A client of the gateway in front of a cluster-mode app (2 replicas' settings, budget in Redis).
    ``replica(app, request)`` replaces the plain forward (:func:`call_app`) of ``/predict`` when given."""
    settings = make_settings(
        tmp_path, replicas=2, state=redis_server.url, query_budget=BUDGET, api_keys=KEY, max_body_bytes=1_000_000
    )
    app = create_app(settings, defense)
    ledger = RedisLedger(connect_redis(redis_server.url), BUDGET, "lenet-mnist")

    async def to_replica(request: Forwarded) -> Returned:
        forward = replica if replica is not None and request.path == "/predict" else call_app
        return await forward(app, request)

    gateway = Gateway(
        to_replica, lost=(ReplicaDied,), overloaded=(QueueFull,), ledger=ledger, retry_after_s=RETRY_AFTER_S
    )
    front = gateway_app(gateway, max_body_bytes=settings.body_limit(), body_timeout_s=settings.body_timeout_s)

    async def both(scope: Any, receive: Any, send: Any) -> None:  # the app's lifespan runs as in its replica
        await (app if scope["type"] == "lifespan" else front)(scope, receive, send)

    with TestClient(both) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, timeout=30, what="app ready behind the gateway")
        yield client, ledger
    ledger.close()


def holds(redis_server: RedisServer) -> list[str]:
    with redis_server.client() as raw:
        return list(raw.scan_iter("dd:hold:*"))


def test_answers_pass_through_and_the_hold_is_the_gateways(
    tmp_path: Path, redis_server: RedisServer, defense: NoDefense
) -> None:
    seen: list[str] = []

    async def recording(app: Any, request: Forwarded) -> Returned:
        seen.append(dict(request.headers)[HOLD_HEADER.encode()].decode())
        return await call_app(app, request)

    forged = new_hold()
    with through_gateway(tmp_path, redis_server, defense, recording) as (client, ledger):
        answer = ask(client, 3, **{HOLD_HEADER: forged})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 3
        assert answer.headers["content-type"] == "application/json"
        assert ledger.remaining(redis_key_id(redis_server, KEY)) == BUDGET - 3
        assert seen[-1] != forged and len(seen[-1]) == 32, "a client's hold header reached the app"
        assert holds(redis_server) == [], "an answered request left its hold behind"
        refused = ask(client, 8)  # 3 spent: 8 more are not covered
        assert refused.status_code == 429 and error_of(refused)["code"] == "budget_exhausted"
        assert client.get("/healthz").status_code == 200


def test_a_replica_lost_with_the_request_is_503_and_costs_nothing(
    tmp_path: Path, redis_server: RedisServer, defense: NoDefense
) -> None:
    async def dies_after_spending(app: Any, request: Forwarded) -> Returned:
        hold = dict(request.headers)[HOLD_HEADER.encode()].decode()
        assert ledger.spend(redis_key_id(redis_server, KEY), 4, hold) is not None  # what the replica's app does first
        raise ReplicaDied

    with through_gateway(tmp_path, redis_server, defense, dies_after_spending) as (client, ledger):
        lost = ask(client, 4)
        assert lost.status_code == 503 and error_of(lost)["code"] == "replica_lost"
        assert lost.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert ledger.remaining(redis_key_id(redis_server, KEY)) == BUDGET, "the lost request's queries stayed spent"
        assert holds(redis_server) == []


def test_servers_full_queue_is_503_overloaded(tmp_path: Path, redis_server: RedisServer, defense: NoDefense) -> None:
    async def full(app: Any, request: Forwarded) -> Returned:
        raise QueueFull

    with through_gateway(tmp_path, redis_server, defense, full) as (client, ledger):
        busy = ask(client)
        assert busy.status_code == 503 and error_of(busy)["code"] == "overloaded"
        assert busy.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert ledger.remaining(redis_key_id(redis_server, KEY)) == BUDGET


def test_body_limits_hold_before_forwarding(tmp_path: Path, redis_server: RedisServer, defense: NoDefense) -> None:
    forwarded: list[Forwarded] = []

    async def counting(app: Any, request: Forwarded) -> Returned:
        forwarded.append(request)
        return await call_app(app, request)

    with through_gateway(tmp_path, redis_server, defense, counting) as (client, _):
        big = client.post(
            "/predict", content=b"x" * 2_000_000, headers=bearer(KEY) | {"content-type": "application/json"}
        )
        assert big.status_code == 413 and error_of(big)["code"] == "body_too_large"
        assert forwarded == [], "a body over the limit was forwarded"


# -- holds in the Redis ledger -----------------------------------------------------------------------------


def test_a_hold_refunds_once_whoever_ends_it(redis_server: RedisServer) -> None:
    ledger, key = RedisLedger(connect_redis(redis_server.url), BUDGET, "lenet-mnist"), redis_key_id(redis_server, KEY)
    try:
        settled, released = new_hold(), new_hold()
        assert ledger.spend(key, 3, settled) == 7
        ledger.refund(key, 1, settled)  # the replica refunds what never reached the model
        ledger.settle(settled)  # the request ended: 2 stay charged
        assert ledger.release(settled) == 0 and ledger.remaining(key) == 8, "a settled hold was refunded"

        assert ledger.spend(key, 5, released) == 3
        ledger.refund(key, 2, released)
        assert ledger.release(released) == 3 and ledger.remaining(key) == 8, "the release refunded wrong"
        ledger.refund(key, 5, released)  # the dying replica's own refund, after the gateway's release
        assert ledger.remaining(key) == 8, "a refund through a released hold refunded twice"
        with pytest.raises(ValueError, match="32 hex"):
            ledger.spend(key, 1, "not-a-hold")
    finally:
        ledger.close()
    assert holds(redis_server) == []
