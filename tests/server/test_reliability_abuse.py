"""The service itself under attack (not the model): an open bind without keys, work done before a request is
authenticated or paid for, slow sockets, one key starving the others, guessable key ids, a public EDM member
choice, and requests queued before their key was escalated. Each test reproduces one way of abusing the
server that its earlier versions allowed (issue 29)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from support.fakes import idle_batcher
from support.faults import SlowDefense
from support.images import SHAPE, pixels, png_bomb
from support.servers import bearer, error_of, key_id_of, serving
from support.settings import make_settings

import deepdefense.server.images
import deepdefense.server.runtime
from deepdefense.clients.latency import percentiles
from deepdefense.defense import NoDefense
from deepdefense.measure.launcher import in_thread
from deepdefense.models.data import load_split
from deepdefense.server.app import create_app
from deepdefense.server.auth import KEY_RULE
from deepdefense.server.batcher import QueueFull, _Item
from deepdefense.server.cluster import app_builder
from deepdefense.server.keystore import EDM_HASH, KEY_ID, secret_path
from deepdefense.server.limits import default_body_limit
from deepdefense.server.runtime import Runtime, StartupError
from deepdefense.server.settings import ServerSettings

pytestmark = pytest.mark.usefixtures("no_server_env")

ALICE, BOB = "alice-abuse-key-0123456789", "bob-abuse-key-9876543210"


def images(n: int) -> dict[str, Any]:
    """``n`` small PNGs that declare 2000×2000 pixels: cheap to send, costly to decode."""
    return {"instances": [{"image_b64": png_bomb(2000, 2000)} for _ in range(n)], "explain": False}


# -- open by default ----------------------------------------------------------------------------------------------


def test_an_open_bind_without_keys_refuses_to_start_unless_asked_for() -> None:
    for host in ("0.0.0.0", "::", "192.0.2.7", "server.example"):
        with pytest.raises(ValueError, match="no API keys are configured") as refused:
            ServerSettings(host=host)
        assert "--allow-open" in str(refused.value) and "DD_API_KEYS_FILE" in str(refused.value)
        assert ServerSettings(host=host, allow_open=True).host == host
        assert ServerSettings(host=host, api_keys=ALICE).keys() == [ALICE]
    for host in ("127.0.0.1", "127.3.2.1", "::1", "localhost"):
        assert ServerSettings(host=host).host == host  # loopback: only this machine can reach it
    # `serve run docker/serve-config.yaml`: the builder cannot see the proxy's address, and assumes a public one
    with pytest.raises(ValueError, match="no API keys are configured"):
        app_builder({"replicas": 2, "state": "redis://127.0.0.1:6379/0"})


# -- work before authentication and before the budget ---------------------------------------------------------------


def raw_request(url: str, headers: dict[str, str], timeout: float = 10.0) -> tuple[bytes, float]:
    """Send a POST /predict's headers only (its declared body never comes); the status line and head of the
    answer, and the seconds it took."""
    host, port = url.removeprefix("http://").split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        started = time.perf_counter()
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode())
        answer = s.recv(4096)
        return answer, time.perf_counter() - started


def test_a_refused_request_is_answered_before_its_body_is_read(tmp_path: Path, defense: NoDefense) -> None:
    """An unknown key and a spent budget are answered from the headers: the declared body never arrives, and
    the answer comes at once (not a 408 once the body's deadline passed), closing the connection."""
    settings = make_settings(tmp_path, api_keys=ALICE, query_budget=1, body_timeout_s=3)
    app = create_app(settings, defense)
    body = {"Content-Type": "application/json", "Content-Length": "100000"}
    with in_thread(app, like_serve=True) as url:
        assert httpx.post(
            f"{url}/predict", json={"instances": [{"pixels": pixels()}]}, headers=bearer(ALICE)
        ).is_success
        for headers, status in [
            (body, b"401"),
            (body | bearer("wrong-key-0123456789"), b"401"),
            (body | bearer(ALICE), b"429"),
        ]:
            answer, seconds = raw_request(url, headers)
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
            assert b"connection: close" in answer.lower()
            assert seconds < 2.5, f"answered after {seconds:.1f} s: the server waited for the body"


def test_a_spent_key_is_refused_without_decoding_its_images(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, defense: NoDefense
) -> None:
    decoded: list[str] = []
    decode = deepdefense.server.images._image

    def counting(*args: Any) -> torch.Tensor:
        decoded.append(args[1])
        return decode(*args)

    monkeypatch.setattr(deepdefense.server.images, "_image", counting)
    with serving(app := create_app(make_settings(tmp_path, api_keys=f"{ALICE},{BOB}", query_budget=4), defense)) as c:
        assert c.post("/predict", json={"instances": [{"pixels": pixels()}] * 4}, headers=bearer(ALICE)).is_success
        for key, left in ((ALICE, "(0 left)"), (BOB, "(4 left, 16 asked)")):  # none left; fewer than 16 left
            r = c.post("/predict", json=images(16), headers=bearer(key))
            assert r.status_code == 429 and error_of(r)["code"] == "budget_exhausted", r.text
            assert left in error_of(r)["message"]
        assert decoded == [], "images were decoded for a request its budget could not pay"
        assert app.state.runtime.default.ledger.remaining(key_id_of(app, BOB)) == 4
        r = c.post("/predict", json=images(1), headers=bearer(BOB))  # paid for: decoded (and refused, too large)
        assert decoded == ["instances[0].image_b64"] and r.status_code in (413, 422)


def test_the_default_body_limit_follows_the_model_and_max_instances(tmp_path: Path) -> None:
    limit = make_settings(tmp_path).body_limit()
    assert limit == default_body_limit(SHAPE, 16) < 8 << 20
    assert make_settings(tmp_path, max_instances=4).body_limit() < limit
    assert make_settings(tmp_path, max_body_bytes=5000).body_limit() == 5000
    # the largest request of pixels fits, as does one of 16 images of 64 × the input's pixels in RGB, base64
    floats = len(str([[[0.12345678901234568] * 28] * 28] * 16))
    assert floats < limit and limit > 16 * 4 * (64 * 28 * 28 * 3 // 3)


# -- slow sockets -------------------------------------------------------------------------------------------------


def closed_after(s: socket.socket, limit: float) -> float | None:
    """Seconds until the server closes ``s`` (it reads nothing from it), or None if still open after ``limit``."""
    started = time.perf_counter()
    s.settimeout(limit)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.perf_counter() - started


def test_silent_and_trickling_sockets_are_closed(tmp_path: Path, defense: NoDefense) -> None:
    settings = make_settings(tmp_path, header_timeout_s=1.0, keep_alive_s=20, max_connections=4)
    with in_thread(create_app(settings, defense), like_serve=True) as url:
        host, port = url.removeprefix("http://").split(":")
        silent = socket.create_connection((host, int(port)))
        trickling = socket.create_connection((host, int(port)))

        def trickle() -> None:
            try:
                trickling.sendall(b"GET /healthz HTTP/1.1\r\n")
                for i in range(40):  # a header line every 0.25 s: 10 s of headers if nobody stops it
                    time.sleep(0.25)
                    trickling.sendall(f"X-Line-{i}: x\r\n".encode())
            except OSError:
                pass  # closed by the server

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        with httpx.Client(base_url=url) as client:  # meanwhile an honest client, on a connection kept alive
            assert client.get("/healthz").status_code == 200
            with socket.create_connection((host, int(port))):  # the fourth connection: at the limit
                time.sleep(0.1)
                assert client.get("/healthz").status_code == 503, "the connection limit (4) let a request in"
        for s in (silent, trickling):
            seconds = closed_after(s, 8.0)
            assert seconds is not None, "a socket without complete request headers was kept open"
            s.close()
        sender.join(timeout=15)
        with httpx.Client(base_url=url) as client:
            assert client.get("/healthz").status_code == 200
            time.sleep(1.5)  # idle on a kept-alive connection for longer than the header deadline: still open
            assert client.get("/healthz").status_code == 200


# -- one key starving the others ------------------------------------------------------------------------------------


def test_one_saturating_key_does_not_starve_another(tmp_path: Path, victim: torch.nn.Module) -> None:
    """Alice keeps sixteen 16-instance requests in flight against a queue of 32; Bob's single requests are
    still answered (not 503), and soon: round-robin puts his instance in the next micro-batch.

    The expected-latency admission is set out of the way (it has its own tests): Alice's sixteen client threads
    share the server's process and GIL here, so one micro-batch can take a second of wall time on a loaded
    2-core CI machine, and the per-instance cost it leaves would refuse Bob as ``overloaded`` — a 503 about
    this process's contention, not about one key starving another."""
    settings = make_settings(
        tmp_path, api_keys=f"{ALICE},{BOB}", queue_size=32, max_batch_size=16, max_expected_latency_s=1e6
    )
    stop = threading.Event()
    alice: list[int] = []

    def saturate(url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                body = {"instances": [{"pixels": pixels(i)} for i in range(16)], "explain": False}
                alice.append(c.post("/predict", json=body, headers=bearer(ALICE)).status_code)
                if alice[-1] != 200:
                    time.sleep(0.005)

    with in_thread(create_app(settings, SlowDefense(victim, 0.005))) as url, ThreadPoolExecutor(16) as pool:
        for _ in range(16):
            pool.submit(saturate, url)
        time.sleep(1.0)
        bob: list[tuple[int, float]] = []
        refusals: list[str] = []
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                for i in range(20):
                    started = time.perf_counter()
                    r = c.post(
                        "/predict", json={"instances": [{"pixels": pixels(i)}], "explain": False}, headers=bearer(BOB)
                    )
                    bob.append((r.status_code, time.perf_counter() - started))
                    if r.status_code != 200:
                        refusals.append(f"{r.status_code} {r.text}")
        finally:
            stop.set()
    assert 503 in alice, "Alice never saturated the queue: the check would be empty"
    answered = [seconds for status, seconds in bob if status == 200]
    assert len(answered) >= 0.9 * len(bob), refusals
    assert percentiles(answered)["p50"] < 3.0


def test_admission_and_micro_batches_are_fair_across_keys() -> None:
    """Alice's 32 queued instances are her share of a queue of 64: her next request is refused (503 key_share)
    while Bob's is admitted, judged by what the round-robin puts ahead of it (not by Alice's backlog), and his
    instance is in the next micro-batch."""
    b = idle_batcher(key_share=0.5)
    loop = asyncio.new_event_loop()
    try:
        b.cost, b._running = 0.25, 8
        b._queue.extend(_Item(torch.zeros(SHAPE), False, loop.create_future(), key="alice") for _ in range(32))
        with pytest.raises(QueueFull) as refused:
            b._admit(1, "alice")
        assert refused.value.reason == "key_share"
        assert b.expected_latency(1, "bob") == (8 + 1 + 1) * 0.25  # the running batch, one of Alice's, his own
        assert b.expected_latency(1) > b.max_latency  # the whole queue ahead: a server without keys is overloaded
        b._admit(1, "bob")
        b._queue.append(_Item(torch.zeros(SHAPE), False, loop.create_future(), key="bob"))
        assert [item.key for item in b._take()].count("bob") == 1 and len(b._queue) == 25
    finally:
        loop.close()


# -- key ids and keys -----------------------------------------------------------------------------------------------


def test_key_ids_are_keyed_hashes_under_a_kept_secret(tmp_path: Path, defense: NoDefense) -> None:
    settings = make_settings(tmp_path, api_keys=ALICE)
    with serving(app := create_app(settings, defense)):
        kid = key_id_of(app, ALICE)
    assert kid != hashlib.sha256(ALICE.encode()).hexdigest()[:12], "the id is the key's public hash"
    secret = secret_path(settings.budget_db, KEY_ID)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and ALICE not in secret.read_text()
    assert key_id_of(create_app(settings, defense), ALICE) == kid, "a restart changed the key's id"
    other = make_settings(tmp_path / "elsewhere", api_keys=ALICE)
    assert key_id_of(create_app(other, defense), ALICE) != kid, "another server's secret gave the same id"
    secret.chmod(0o644)
    with pytest.raises(StartupError, match="may be read by others"):
        create_app(settings, defense)


@pytest.mark.parametrize("keys", ["alice,bob", f"{ALICE},short-key", "a" * 20, f"{ALICE},0101010101010101"])
def test_weak_keys_are_refused_naming_the_rule_not_the_key(keys: str) -> None:
    for field in ("api_keys", "admin_keys"):
        with pytest.raises(ValueError, match="too weak") as refused:
            ServerSettings(**{field: keys})
        assert KEY_RULE in str(refused.value)
        assert all(k not in str(refused.value) for k in keys.split(","))


# -- EDM's member choice --------------------------------------------------------------------------------------------


def test_edm_gets_a_random_kept_hash_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(
        deepdefense.server.runtime, "load_defense", lambda *args, **options: seen.append(options) or (None, None)
    )
    settings = make_settings(tmp_path, defense="edm", gate="none")
    runtime = Runtime(settings)
    key = runtime.edm_hash_key
    assert key is not None and len(bytes.fromhex(key)) == 32
    assert stat.S_IMODE(secret_path(settings.budget_db, EDM_HASH).stat().st_mode) == 0o600
    assert Runtime(settings).edm_hash_key == key, "a restart changed the member choice"
    assert Runtime(make_settings(tmp_path / "elsewhere", defense="edm", gate="none")).edm_hash_key != key
    deepdefense.server.runtime.build_defense(settings, "lenet-mnist", torch.device("cpu"), key)
    assert seen[-1]["hash_key"] == key
    chosen = make_settings(tmp_path, defense="edm", gate="none", engine={"hash_key": "the operator's own"})
    assert Runtime(chosen).edm_hash_key is None
    deepdefense.server.runtime.build_defense(chosen, "lenet-mnist", torch.device("cpu"), None)
    assert seen[-1]["hash_key"] == "the operator's own"


# -- escalation of a key with requests in the queue -----------------------------------------------------------------


@pytest.mark.parametrize("action", ["refuse", "misinform"])
def test_a_request_queued_before_its_key_was_escalated_is_answered_as_escalated(
    tmp_path: Path, data_root: Path, action: str
) -> None:
    """Alice's request passes the monitor's check, and while it waits for the model another of her requests
    gets her key escalated: its answer is an escalated key's (misinformation, or 403), not the honest one."""
    options = {"gate": "misinform", "monitor": "on", "monitor_window": 10, "monitor_min_queries": 5}
    app = create_app(make_settings(tmp_path, api_keys=f"{ALICE},{BOB}", monitor_action=action, **options))
    digit = load_split("mnist", str(data_root), "test").tensors[0][:1]  # in domain: answered honestly
    body = {"instances": [{"pixels": digit[0].tolist()}], "explain": False}
    with serving(app) as client:
        runtime = app.state.runtime.default
        honest = client.post("/predict", json=body, headers=bearer(ALICE)).json()["predictions"]
        gate = runtime.defense
        answer = gate.answer

        def escalating(x: torch.Tensor, *, explain: bool = True, override: torch.Tensor | None = None) -> list[Any]:
            runtime.monitor.observe(key_id_of(app, ALICE), [True] * 10)  # meanwhile, another request escalated it
            return answer(x, explain=explain, override=override)

        gate.answer = escalating
        r = client.post("/predict", json=body, headers=bearer(ALICE))
        gate.answer = answer
        assert client.post("/predict", json=body, headers=bearer(BOB)).json()["predictions"] == honest
    if action == "refuse":
        assert r.status_code == 403 and error_of(r)["code"] == "key_flagged"
    else:
        assert r.status_code == 200 and r.json()["predictions"] != honest, "answered honestly"
