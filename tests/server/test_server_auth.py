"""API keys and per-key query budgets: 401, 429, budgets that survive a restart, atomic spending,
and keys that never reach the metrics."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support.images import pixels
from support.servers import bearer, key_id_of, metric_value, serving
from support.settings import make_settings

from deepdefense.defense import NoDefense
from deepdefense.server.app import create_app
from deepdefense.server.auth import KeyRing, key_id
from deepdefense.server.budget import QueryLedger

pytestmark = pytest.mark.usefixtures("no_server_env")

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"


def ask(client: TestClient, key: str | None, n: int = 1) -> int:
    headers = bearer(key) if key else {}
    return client.post(
        "/predict", json={"instances": [{"pixels": pixels(i)} for i in range(n)]}, headers=headers
    ).status_code


def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, defense: NoDefense) -> None:
    monkeypatch.setenv("DD_API_KEYS", f"{ALICE}, {BOB}")
    monkeypatch.setenv("DD_ADMIN_KEYS", "operator-key-0123456789")
    with serving(app := create_app(make_settings(tmp_path), defense)) as client:
        r = client.post("/predict", json={"instances": [{"pixels": pixels()}]})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["error"]["field"] == "Authorization"
        assert ask(client, "wrong-key") == 401
        assert (
            client.post(
                "/predict", json={"instances": [{"pixels": pixels()}]}, headers={"Authorization": f"Basic {ALICE}"}
            ).status_code
            == 401
        )
        assert client.get("/v1/models").status_code == 401
        assert ask(client, ALICE) == 200 and ask(client, BOB, 2) == 200
        assert client.get("/v1/models", headers=bearer(ALICE)).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
        assert "dd_key_queries_total" not in client.get("/metrics").text, "per-key counts shown to anyone"
        metrics = client.get("/metrics", headers=bearer("operator-key-0123456789")).text
    assert metric_value(metrics, f'dd_key_queries_total{{key="{key_id_of(app, ALICE)}",model="lenet-mnist"}}') == 1
    assert metric_value(metrics, f'dd_key_queries_total{{key="{key_id_of(app, BOB)}",model="lenet-mnist"}}') == 2
    assert ALICE not in metrics and BOB not in metrics


def test_keys_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, defense: NoDefense) -> None:
    """One key a line; comments are whole lines (first visible character ``#``); a ``#`` inside a key is kept."""
    carol = "carol#key#0123456789"
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# service keys\n{ALICE}\n\n   # the second one\n{BOB}\n{carol}\n")
    monkeypatch.setenv("DD_API_KEYS_FILE", str(keys))
    with serving(create_app(make_settings(tmp_path), defense)) as client:
        got = [ask(client, k) for k in (None, ALICE, BOB, carol, "carol", "# service keys", "# the second one")]
        assert got == [401, 200, 200, 200, 401, 401, 401]


def test_spent_budget_answers_429_and_survives_a_restart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, defense: NoDefense
) -> None:
    monkeypatch.setenv("DD_API_KEYS", f"{ALICE},{BOB}")
    settings = make_settings(tmp_path, query_budget=3)
    with serving(create_app(settings, defense)) as client:
        assert ask(client, ALICE, 2) == 200
        r = client.post("/predict", json={"instances": [{"pixels": pixels()}] * 2}, headers=bearer(ALICE))
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exhausted"
        assert ALICE not in r.text
        assert ask(client, ALICE) == 200
        assert ask(client, ALICE) == 429
    with serving(create_app(make_settings(tmp_path, query_budget=3), defense)) as client:
        assert ask(client, ALICE) == 429
        assert ask(client, BOB, 3) == 200
        assert ask(client, BOB) == 429
    assert ALICE.encode() not in settings.budget_db.read_bytes()


def test_check_and_spend_is_atomic(tmp_path: Path) -> None:
    """Threads spending through two connections (as two server processes would) never overspend."""
    path = tmp_path / "budget.sqlite"
    ledgers = [QueryLedger(path, budget=100, model="m"), QueryLedger(path, budget=100, model="m")]
    granted: list[int] = []

    def spend(ledger: QueryLedger) -> None:
        for _ in range(40):
            if ledger.spend("k", 1) is not None:
                granted.append(1)

    threads = [threading.Thread(target=spend, args=(ledgers[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 100
    assert ledgers[0].remaining("k") == 0 and ledgers[1].spend("k", 1) is None
    ledgers[0].refund("k", 5)
    assert ledgers[1].remaining("k") == 5
    for ledger in ledgers:
        ledger.close()


def test_key_ring() -> None:
    secret = b"a server's key-id secret"
    ring = KeyRing([ALICE, BOB], secret)
    assert ring.enabled and not KeyRing([], secret).enabled
    assert ring.identify(ALICE) == key_id(ALICE, secret) and ring.identify(BOB) == key_id(BOB, secret)
    assert ring.identify(ALICE[:-1]) is None and ring.identify("") is None
    assert len(key_id(ALICE, secret)) == 12 and ALICE not in key_id(ALICE, secret)
    assert key_id(ALICE, b"another server's secret") != key_id(ALICE, secret)
