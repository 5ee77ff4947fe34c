"""Budgets and the extraction monitor's state in Redis (``DD_STATE=redis://…``, server/state.py), against a
real ``redis-server`` of each test's own: the budget edge under concurrent spends from two ledgers (and two
processes), refunds, the monitor's state shared by two instances and kept across a restart, two apps
sharing one budget, Redis lost while serving (503 ``state_unavailable``, then answers again once it is
back), and a start-up that refuses an unreachable Redis without printing its password."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError
from support.images import pixels
from support.redis_server import RedisServer, free_port, redis_key_id, spend_in_process
from support.servers import bearer, error_of, serving
from support.settings import make_settings

from deepdefense.defense import NoDefense
from deepdefense.server.app import create_app
from deepdefense.server.auth import key_id
from deepdefense.server.budget import RedisLedger
from deepdefense.server.monitor import ExtractionMonitor, MonitorPolicy, RedisMonitorStore
from deepdefense.server.runtime import StartupError
from deepdefense.server.state import connect_redis

pytestmark = pytest.mark.usefixtures("no_server_env")

ALICE, BOB, OPERATOR = "alice-key-0123456789", "bob-key-9876543210", "operator-key-0000"
#: A secret for the ledger and monitor tests, which take any key id; the apps' ids come from Redis (:func:`redis_id`).
SECRET = b"the key-id secret of these tests"
KEY = key_id(ALICE, SECRET)
POLICY = MonitorPolicy(window=10, min_queries=5, threshold=0.5)


def ask(client: TestClient, key: str, n: int = 1):
    return client.post("/predict", json={"instances": [{"pixels": pixels(i)} for i in range(n)]}, headers=bearer(key))


# -- the ledger --------------------------------------------------------------------------------------------


def test_concurrent_spends_from_two_ledgers_stop_exactly_at_the_budget(redis_server: RedisServer) -> None:
    ledgers = [RedisLedger(connect_redis(redis_server.url), 100, "lenet-mnist") for _ in range(2)]  # two "processes"
    start = threading.Barrier(16)

    def spend(i: int) -> int | None:
        if i < 16:
            start.wait(timeout=10)  # the first 16 spends leave together
        return ledgers[i % 2].spend(KEY, 1)

    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(spend, range(200)))
        granted = [left for left in results if left is not None]
        assert len(granted) == 100, f"{len(granted)} of 200 spends granted against a budget of 100"
        assert sorted(granted) == list(range(100)), "two spends saw the same remainder: not atomic"
        assert [ledger.remaining(KEY) for ledger in ledgers] == [0, 0]
        assert ledgers[0].spend(KEY, 1) is None and ledgers[1].remaining(KEY) == 0, "a refused spend spent"
    finally:
        for ledger in ledgers:
            ledger.close()
    with redis_server.client() as raw:
        assert raw.keys("*") == [f"dd:budget:lenet-mnist:{KEY}"] and raw.get(f"dd:budget:lenet-mnist:{KEY}") == "100"


def test_two_processes_spend_exactly_the_budget(redis_server: RedisServer) -> None:
    spawn = multiprocessing.get_context("spawn")
    start, results = spawn.Barrier(2), spawn.Queue()
    args = (redis_server.url, KEY, 100, 100, start, results)
    workers = [spawn.Process(target=spend_in_process, args=args) for _ in "ab"]
    for worker in workers:
        worker.start()
    granted = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert sum(granted) == 100, f"the processes were granted {granted} spends against a budget of 100"
    with redis_server.client() as raw:
        assert raw.get(f"dd:budget:lenet-mnist:{KEY}") == "100"


def test_refunds_give_back_but_never_below_nothing_spent(redis_server: RedisServer) -> None:
    ledger = RedisLedger(connect_redis(redis_server.url), 10, "lenet-mnist")
    other = key_id(BOB, SECRET)
    try:
        assert ledger.spend(KEY, 6) == 4 and ledger.spend(KEY, 5) is None, "the budget does not cover 5 more"
        ledger.refund(KEY, 3)
        assert ledger.remaining(KEY) == 7 and ledger.spend(KEY, 7) == 0
        ledger.refund(KEY, 100)
        assert ledger.remaining(KEY) == 10, "a refund made the budget larger than it is"
        assert ledger.spend(KEY, 11) is None and ledger.spend(KEY, 10) == 0
        ledger.refund(other, 5)  # never spent: nothing to give back, no credit either
        assert ledger.remaining(other) == 10 and ledger.spend(other, 11) is None
        with pytest.raises(ValueError, match="12-hex key ids"):
            ledger.spend(ALICE, 1)  # a raw API key never becomes a Redis key
    finally:
        ledger.close()
    with redis_server.client() as raw:
        assert raw.keys("*") == [f"dd:budget:lenet-mnist:{KEY}"], "a refund or a refused spend created a key"


# -- the monitor -------------------------------------------------------------------------------------------


def test_the_monitor_state_is_shared_by_instances_and_survives_a_new_one(redis_server: RedisServer) -> None:
    a, b = key_id("a", SECRET), key_id("b", SECRET)
    first, second = (ExtractionMonitor(RedisMonitorStore(connect_redis(redis_server.url)), POLICY) for _ in "12")
    assert not first.observe(a, [True, True, False])
    second.observe(b, [False] * 20)
    assert second.observe(a, [True, True]), "the other instance's three flags were not seen: 4 of 5 flagged"
    assert first.escalated(a) and not first.escalated(b)
    for monitor in (first, second):
        assert [(k["key_id"], k["escalated_after"], k["queries"]) for k in monitor.flagged_keys()] == [(a, 5, 5)]
        assert monitor.count_flagged() == 1

    # observations from both instances at once are each counted: the read-change-write is atomic per key
    c = key_id("c", SECRET)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: (first, second)[i % 2].observe(c, [False]), range(100)))
    assert first.store.read(c).queries == 100, "concurrent observations were lost"
    escalated_at = first.flagged_keys()[0]["escalated_at"]
    first.close()
    second.close()

    restarted = ExtractionMonitor(RedisMonitorStore(connect_redis(redis_server.url)), POLICY)
    try:
        assert restarted.escalated(a) and restarted.count_flagged() == 1
        assert restarted.flagged_keys()[0]["escalated_at"] == escalated_at
        assert restarted.clear(a) and not restarted.clear(a) and not restarted.clear(b)
        assert not restarted.clear("not-a-key-id"), "a malformed id clears nothing"
        assert not restarted.escalated(a) and restarted.count_flagged() == 0 and restarted.flagged_keys() == []
        assert not restarted.observe(a, [True] * 4), "a cleared key starts from a fresh window"
    finally:
        restarted.close()
    with redis_server.client() as raw:
        # the escalated set is empty: gone; the fingerprints' secret stays
        assert set(raw.keys("*")) == {f"dd:monitor:{k}" for k in (a, b, c)} | {"dd:monitor-secret"}


def test_screening_is_shared_by_replicas_an_escalated_key_everywhere_and_its_queries_taint_another_key(
    redis_server: RedisServer,
) -> None:
    """Two replicas' monitors on one Redis: one secret, one near-duplicate index. A key that twin-tests
    through one replica is escalated on both; another key that sends its queries through the other replica is
    tainted by them (a thief who moves to a fresh key brings his queries along)."""
    thief, fresh, honest = (key_id(name, SECRET) for name in ("thief", "fresh", "honest"))
    one, two = (ExtractionMonitor(RedisMonitorStore(connect_redis(redis_server.url)), POLICY) for _ in "12")
    try:
        assert one._secret == two._secret, "replicas fingerprint with different secrets"
        images = torch.rand((8, 1, 28, 28), generator=torch.Generator().manual_seed(0))
        twins = images.clone()
        twins[:, 0, 3, 3] += 1 / 255
        escalated = [one.screen(thief, torch.stack([x, t])).escalated for x, t in zip(images, twins, strict=True)]
        assert escalated[-1] and not escalated[0], "half of the queries were twins: escalated once the window had 5"
        assert two.escalated(thief) and two.flagged_keys()[0]["reason"] == "duplicates"
        assert not two.screen(honest, torch.rand((6, 1, 28, 28), generator=torch.Generator().manual_seed(1))).escalated
        assert not two.screen(fresh, images[:2]).escalated
        assert two.screen(fresh, images[2:3]).escalated, "3 of the thief's: tainted"
        assert two.store.read(fresh).reason == "taint" and not one.escalated(honest)
    finally:
        one.close()
        two.close()


# -- through the app ---------------------------------------------------------------------------------------


def test_apps_spend_one_budget_from_redis(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defense: NoDefense
) -> None:
    monkeypatch.setenv("DD_API_KEYS", f"{ALICE},{BOB}")
    settings = make_settings(tmp_path, state=redis_server.url, query_budget=3)
    with serving(create_app(settings, defense)) as one, serving(create_app(settings, defense)) as two:
        assert ask(one, ALICE, 2).status_code == 200
        r = ask(two, ALICE, 2)
        assert r.status_code == 429 and error_of(r)["code"] == "budget_exhausted", "the replica had its own budget"
        assert "1 left" in error_of(r)["message"]
        assert ask(two, ALICE).status_code == 200
        assert ask(one, ALICE).status_code == 429 and ask(two, ALICE).status_code == 429
        assert ask(one, BOB, 3).status_code == 200 and ask(two, BOB).status_code == 429
    assert not settings.budget_db.exists(), "the budgets went to SQLite"
    with redis_server.client() as raw:
        state = {name: raw.get(name) for name in raw.keys("*")}
    assert len(bytes.fromhex(state.pop("dd:secret:key-id"))) == 32, "the key-id secret is not kept in Redis"
    assert state == {
        f"dd:budget:lenet-mnist:{redis_key_id(redis_server, ALICE)}": "3",
        f"dd:budget:lenet-mnist:{redis_key_id(redis_server, BOB)}": "3",
    }
    assert ALICE not in repr(state) and BOB not in repr(state)


def test_the_app_reads_and_clears_the_monitor_state_in_redis(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defense: NoDefense
) -> None:
    monkeypatch.setenv("DD_API_KEYS", f"{ALICE},{BOB}")
    monkeypatch.setenv("DD_ADMIN_KEYS", OPERATOR)
    elsewhere = ExtractionMonitor(RedisMonitorStore(connect_redis(redis_server.url)), POLICY)
    alice = redis_key_id(redis_server, ALICE)
    assert elsewhere.observe(alice, [True] * 5)  # escalated by another replica
    options = {"gate": "misinform", "monitor": "on", "monitor_action": "refuse", "monitor_window": 10}
    settings = make_settings(tmp_path, state=redis_server.url, monitor_min_queries=5, **options)
    try:
        with serving(create_app(settings, defense)) as client:
            r = ask(client, ALICE)
            assert r.status_code == 403 and error_of(r)["code"] == "key_flagged"
            assert ask(client, BOB, 2).status_code == 200  # NoDefense flags nothing: observed, not escalated
            bob = redis_key_id(redis_server, BOB)
            assert elsewhere.store.read(bob).queries == 2, "the app's observation did not reach Redis"
            flags = client.get("/v1/admin/flags", headers=bearer(OPERATOR)).json()["keys"]
            assert [k["key_id"] for k in flags] == [alice]
            assert client.delete(f"/v1/admin/flags/{alice}", headers=bearer(OPERATOR)).status_code == 204
            assert not elsewhere.escalated(alice) and ask(client, ALICE).status_code == 200
    finally:
        elsewhere.close()
    assert not settings.budget_db.exists(), "the monitor's state went to SQLite"


def test_redis_lost_while_serving_answers_503_until_it_is_back(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defense: NoDefense
) -> None:
    monkeypatch.setenv("DD_API_KEYS", ALICE)
    app = create_app(make_settings(tmp_path, state=redis_server.url, query_budget=100), defense)
    with serving(app) as client:
        assert ask(client, ALICE).status_code == 200
        redis_server.stop()
        for _ in range(2):
            r = ask(client, ALICE)
            assert r.status_code == 503 and error_of(r)["code"] == "state_unavailable", r.text
            assert r.headers["Retry-After"] == "1" and "predictions" not in r.text
        assert client.get("/healthz").status_code == 200
        not_ready = client.get("/readyz")  # a load balancer stops sending requests here meanwhile
        assert not_ready.status_code == 503 and error_of(not_ready)["code"] == "state_unavailable"
        redis_server.start()  # the same port, nothing remembered (--save ''): the budget starts again
        assert client.get("/readyz").status_code == 200
        r = ask(client, ALICE, 2)
        assert r.status_code == 200, r.text
        assert ask(client, ALICE).status_code == 200
    with redis_server.client() as raw:  # the restarted Redis lost the secret: the app keeps the one it read
        assert raw.get(f"dd:budget:lenet-mnist:{app.state.runtime.keys.identify(ALICE)}") == "3", (
            "the requests after the restart were not metered"
        )


def test_an_unreachable_redis_stops_the_start_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defense: NoDefense
) -> None:
    monkeypatch.setenv("DD_API_KEYS", ALICE)
    port = free_port()  # nothing listens there
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    with pytest.raises(StartupError) as refused:
        create_app(make_settings(tmp_path, state=url, query_budget=3), defense)
    message = str(refused.value)
    assert f"127.0.0.1:{port}/0" in message and "cannot reach the Redis state" in message
    assert "s3cret" not in message and "s3cret" not in repr(refused.value.__cause__)


@pytest.mark.parametrize(
    "url", ["http://:s3cret@127.0.0.1:6379/0", "s3cret:x", "redis://:s3cret@/0", "redis://:s3cret@h:99999/0"]
)
def test_a_state_that_is_no_redis_url_is_refused_without_echo(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValidationError) as refused:
        make_settings(tmp_path, state=url)
    assert "redis://" in str(refused.value) and "s3cret" not in str(refused.value)
