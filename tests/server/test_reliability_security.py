"""Secrets, access and model confidentiality: keys are compared in constant time, read only from
the environment or a file, and never reach logs, metrics, errors or settings errors; budgets hold
at their edge under parallel requests and across restarts; ``/metrics`` and ``/docs`` can be
opened, put behind an operator key or switched off; no route, error or header reveals weights,
gradients, undefended outputs or file paths."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from support.faults import RAISE, FaultyDefense, marked
from support.servers import bearer, error_of, key_id_of, serving
from support.settings import make_settings

import deepdefense.server.auth
from deepdefense.defense import NoDefense
from deepdefense.measure.launcher import in_thread
from deepdefense.models.checkpoint import SHIPPED_DIR, read_meta
from deepdefense.server.app import create_app
from deepdefense.server.auth import KeyRing, key_id
from deepdefense.server.settings import ServerSettings

pytestmark = pytest.mark.usefixtures("no_server_env")

ALICE, BOB = "alice-secret-key-0123456789", "bob-secret-key-9876543210"
OPERATOR = "operator-secret-key-555555555"


OPERATOR_KEY = "operator-secret-key-0123456789"


def one(seed: int = 0, n: int = 1) -> dict[str, Any]:
    return {"instances": [{"pixels": marked(0.9, seed + i).tolist()} for i in range(n)], "explain": False}


# -- keys -----------------------------------------------------------------------------------------------------


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured key is compared, each with hmac.compare_digest on equal-length digests,
    whatever the token: which key matches, and how long the token is, change no comparison."""
    secret = b"a server's key-id secret"
    ring = KeyRing([ALICE, BOB, "third-key-000000000000"], secret)
    seen: list[tuple[int, int]] = []
    real = deepdefense.server.auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(deepdefense.server.auth.hmac, "compare_digest", counting)
    for token, expected in [
        (ALICE, key_id(ALICE, secret)),
        (BOB, key_id(BOB, secret)),
        (ALICE[:-1], None),
        ("", None),
        ("x" * 100_000, None),
    ]:
        seen.clear()
        assert ring.identify(token) == expected
        assert seen == [(32, 32)] * 3


def test_keys_never_reach_logs_metrics_or_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, defense: NoDefense
) -> None:
    monkeypatch.setenv("DD_API_KEYS", f"{ALICE},{BOB}")
    monkeypatch.setenv("DD_ADMIN_KEYS", OPERATOR_KEY)  # the per-key series are an operator's
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    app = create_app(make_settings(tmp_path, query_budget=2), defense)
    with in_thread(app, like_serve=True) as url:
        # uvicorn writes its access log (raw paths and query strings) only to handlers of its own
        # logger, which `serve` leaves without any: the app's access log names route templates
        assert not logging.getLogger("uvicorn.access").hasHandlers()
        keep = Keep(level=logging.DEBUG)
        loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "deepdefense")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.addHandler(keep)
            lg.setLevel(logging.DEBUG)
        try:
            with httpx.Client(base_url=url, timeout=30) as c:
                answers = [
                    c.post("/predict", json=one(), headers=bearer(ALICE)),
                    c.post("/predict", json=one(n=2), headers=bearer(ALICE)),  # over budget: 429
                    c.post("/predict", json=one(), headers=bearer(ALICE + "x")),  # a near miss: 401
                    c.post("/predict", json=one(), headers={"Authorization": f"Basic {BOB}"}),
                    c.post(f"/predict?api_key={BOB}", json=one(), headers=bearer(BOB)),  # a key in the query
                    c.post("/predict", json=one() | {"api_key": BOB}, headers=bearer(BOB)),
                    c.get(f"/nope/{ALICE}"),
                ]
                metrics = c.get("/metrics", headers=bearer(OPERATOR_KEY)).text
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.removeHandler(keep)
                lg.setLevel(level)
    assert [r.status_code for r in answers] == [200, 429, 401, 401, 200, 422, 404]
    assert records, "nothing was logged: the check would be empty"
    assert any("POST /predict 429" in r for r in records)
    for key in (ALICE, BOB):
        for where, text in [
            ("logs", "\n".join(records)),
            ("metrics", metrics),
            ("answers", "\n".join(r.text + json.dumps(dict(r.headers)) for r in answers)),
        ]:
            assert key not in text, f"a key in the {where}"
    assert key_id_of(app, ALICE) in metrics and key_id_of(app, BOB) in metrics
    assert ALICE.encode() not in (tmp_path / "budget.sqlite").read_bytes()


@pytest.mark.parametrize(
    "environment",
    [
        {"DD_API_KEYS": f"{ALICE}", "DD_QUERY_BUDGET": "not-a-number"},
        {"DD_API_KEYS": f"{ALICE} with a space"},
        {"DD_API_KEYS": f"{ALICE}", "DD_METRICS_ACCESS": "admin"},
        {"DD_ADMIN_KEYS": f"{ALICE}\u00e9", "DD_METRICS_ACCESS": "admin"},
        {"DD_API_KEYS": f" , {ALICE}", "DD_QUERY_BUDGET": "5", "DD_PORT": "x"},
    ],
)
def test_settings_errors_never_echo_a_key(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as refused:
        ServerSettings()
    assert "secret-key" not in str(refused.value)


def test_no_command_takes_a_key_on_the_command_line() -> None:
    from deepdefense.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, parser in commands.items():
        for action in parser._actions:
            for flag in action.option_strings:
                if "key" in flag:
                    assert flag.endswith("-file"), f"'deepdefense {name} {flag}' would put a key in argv"


# -- budgets at their edge --------------------------------------------------------------------------------------


@pytest.fixture
def budgeted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, defense: NoDefense) -> Iterator[tuple[str, Any]]:
    monkeypatch.setenv("DD_API_KEYS", f"{ALICE},{BOB}")

    def start() -> Any:
        return in_thread(create_app(make_settings(tmp_path, query_budget=10, queue_size=256), defense), like_serve=True)

    with start() as url:
        yield url, start


def parallel(url: str, key: str, bodies: list[dict[str, Any]]) -> list[int]:
    with (
        httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=len(bodies))) as c,
        ThreadPoolExecutor(len(bodies)) as pool,
    ):
        return list(pool.map(lambda b: c.post("/predict", json=b, headers=bearer(key)).status_code, bodies))


def test_parallel_requests_cannot_overspend_a_budget(budgeted: tuple[str, Any]) -> None:
    url, _ = budgeted
    statuses = parallel(url, ALICE, [one(i) for i in range(24)])
    assert sorted(statuses) == [200] * 10 + [429] * 14
    # three instances a request: three requests fit (9), the tenth query only alone
    statuses = parallel(url, BOB, [one(i, n=3) for i in range(8)])
    assert sorted(statuses) == [200] * 3 + [429] * 5
    assert parallel(url, BOB, [one(0, n=2), one(1, n=2)]) == [429, 429]
    assert parallel(url, BOB, [one(0)] * 4).count(200) == 1


def test_a_spent_budget_survives_a_restart(budgeted: tuple[str, Any]) -> None:
    url, start = budgeted
    assert parallel(url, ALICE, [one(i) for i in range(12)]).count(200) == 10
    with start() as again:  # a second server on the same database, as after a restart
        assert parallel(again, ALICE, [one(0)] * 3) == [429] * 3
        assert parallel(again, BOB, [one(i) for i in range(12)]).count(200) == 10


# -- operator routes --------------------------------------------------------------------------------------------


DOCS = ("/docs", "/redoc", "/openapi.json")


@pytest.mark.parametrize(
    ("access", "anonymous", "api_key", "operator"),
    [
        ("open", 200, 200, 200),
        ("admin", 401, 401, 200),
        ("off", 404, 404, 404),
    ],
)
def test_metrics_and_docs_access(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    defense: NoDefense,
    access: str,
    anonymous: int,
    api_key: int,
    operator: int,
) -> None:
    monkeypatch.setenv("DD_API_KEYS", ALICE)
    monkeypatch.setenv("DD_ADMIN_KEYS", OPERATOR)
    settings = make_settings(tmp_path, metrics_access=access, docs_access=access)
    with serving(create_app(settings, defense)) as client:
        for path in ("/metrics", *DOCS):
            got = [
                client.get(path).status_code,
                client.get(path, headers=bearer(ALICE)).status_code,
                client.get(path, headers=bearer(OPERATOR)).status_code,
            ]
            assert got == [anonymous, api_key, operator], path
            if anonymous != 200:
                error_of(client.get(path))
        assert client.post("/predict", json=one(), headers=bearer(OPERATOR)).status_code == 401
        assert client.post("/predict", json=one(), headers=bearer(ALICE)).status_code == 200
        assert client.get("/healthz").status_code == 200
        if access == "admin":
            spec = client.get("/openapi.json", headers=bearer(OPERATOR)).json()
            assert "/predict" in spec["paths"] and "/docs" not in spec["paths"]


def test_admin_access_needs_operator_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DD_API_KEYS", ALICE)
    with pytest.raises(ValueError, match="metrics_access 'admin' needs operator keys"):
        ServerSettings(metrics_access="admin")


# -- model confidentiality ----------------------------------------------------------------------------------------


def weight_fingerprints(model: torch.nn.Module) -> list[str]:
    """Texts that would betray weights: a few values as they print, and digests of the state."""
    w = model.net.features.conv1.weight.flatten()[:4].tolist()  # type: ignore[union-attr]
    state = b"".join(t.numpy().tobytes() for t in model.state_dict().values())
    return [f"{v:.4f}" for v in w] + [hashlib.sha256(state).hexdigest()[:12]]


def test_no_route_error_or_header_reveals_the_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, victim: torch.nn.Module
) -> None:
    monkeypatch.setenv("DD_API_KEYS", ALICE)
    faulty = FaultyDefense(victim)
    meta = read_meta(SHIPPED_DIR / "lenet-mnist.json")
    forbidden = [
        str(SHIPPED_DIR),
        "checkpoints/",
        ".safetensors",
        meta.sha256,
        meta.sha256[:12],
        "Traceback",
        "tensor(",
        "grad_fn",
        "requires_grad",
        "/srv/",
        "diverged",
        weight_fingerprints(victim)[-1],
    ]
    app = create_app(make_settings(tmp_path, query_budget=50, max_instances=2), faulty)
    answers: list[Any] = []
    with in_thread(app, like_serve=True) as url, httpx.Client(base_url=url, timeout=30) as c:
        key = bearer(ALICE)
        answers += [c.get(p) for p in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/nope")]
        answers += [c.get("/v1/models", headers=key), c.get("/v1/models"), c.delete("/predict", headers=key)]
        for body in (
            one(),
            one(n=3),
            {"instances": [{"pixels": [[[2.0]]]}]},
            {"instances": [{"image_b64": "!"}]},
            {"instances": [{"pixels": marked(RAISE).tolist()}]},
        ):
            answers.append(c.post("/predict", json=body, headers=key))
        answers.append(c.post("/predict", content=b"{", headers=key | {"Content-Type": "application/json"}))
        answers.append(c.post("/predict", content=b"{}", headers=key | {"Content-Type": "text/plain"}))
        app.state.runtime.default.phase = "starting"
        answers.append(c.post("/predict", json=one(), headers=key))
    statuses = [r.status_code for r in answers]
    assert statuses == [200, 200, 200, 200, 200, 404, 200, 401, 405, 200, 413, 422, 422, 500, 400, 415, 503]
    for r in answers:
        text = r.text + json.dumps(dict(r.headers))
        for secret in forbidden:
            assert secret not in text, f"{secret!r} revealed by a {r.status_code} answer"
        assert "server" not in {k.lower() for k in r.headers}
        if r.status_code >= 400:
            assert not re.search(r"\d\.\d{3,}", r.text), "an error carries numbers"
            assert not any(w in r.text for w in weight_fingerprints(victim)[:-1])
    settings = answers[6].json()["models"][0]["defense"]["settings"]
    assert all(isinstance(v, int | float | str | bool) for v in settings.values())


def test_errors_in_a_defended_batch_never_carry_the_undefended_answer(tmp_path: Path, victim: torch.nn.Module) -> None:
    faulty = FaultyDefense(victim)
    with serving(create_app(make_settings(tmp_path, warmup=False), faulty)) as client:
        x = marked(RAISE)
        r = client.post("/predict", json={"instances": [{"pixels": x.tolist()}]})
    probs = victim(x.unsqueeze(0)).softmax(-1)[0].tolist()
    assert r.status_code == 500
    for p in probs:
        assert f"{p:.3f}"[2:] not in r.text
    assert set(r.json()) == {"error"}
