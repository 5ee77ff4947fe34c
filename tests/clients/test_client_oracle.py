"""The oracle protocol: HTTP against a loopback uvicorn and in-process give the same answers; the
HTTP client retries 503s with backoff, reports 4xx clearly and sends the API key."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from support.numerics import PATH_ATOL, top1_margin
from support.servers import served_queries
from support.settings import loopback_settings

from deepdefense.clients.oracle import HttpOracle, OracleError, read_api_key
from deepdefense.defense import NoDefense, create_defense
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.measure.launcher import in_thread
from deepdefense.measure.local_oracle import LocalOracle, local_info
from deepdefense.models.checkpoint import load_checkpoint, read_meta, resolve_checkpoint
from deepdefense.server.app import create_app


@pytest.fixture(scope="module")
def undefended() -> NoDefense:
    model, meta = load_checkpoint("lenet-mnist")
    model.requires_grad_(False)
    return create_defense("none", model, create_interpreter("gradcam", model, tuple(meta.input_shape)))  # type: ignore[return-value]


def test_http_and_local_oracles_agree(tmp_path: Path, undefended: NoDefense) -> None:
    x = torch.rand((5, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    local = LocalOracle(undefended, local_info("lenet-mnist", read_meta(resolve_checkpoint("lenet-mnist")), undefended))
    settings = loopback_settings(tmp_path, api_keys="client-oracle-key-k1", max_instances=2)
    with (
        in_thread(create_app(settings, undefended)) as url,
        HttpOracle(url, "client-oracle-key-k1", max_instances=2) as remote,
    ):
        assert remote.info() == local.info()
        got, want = remote.query(x), local.query(x)
        assert served_queries(url) == 5
        labels_only = remote.query(x[:1], explain=False)
        with pytest.raises(OracleError) as err, HttpOracle(url, "wrong") as stranger:
            stranger.query(x[:1])
    assert err.value.status == 401 and err.value.code == "unauthorized"
    # over HTTP the 5 queries are answered in requests of 2, 2 and 1, locally in one batch of 5: another
    # path, so the floats agree within PATH_ATOL; labels exactly, as no top-1 is anywhere near a tie
    assert top1_margin(want.probabilities).min() > 100 * PATH_ATOL, "a near-tie: the top-1 may differ by path"
    assert torch.equal(got.labels, want.labels)
    torch.testing.assert_close(got.probabilities, want.probabilities, rtol=0, atol=PATH_ATOL)
    assert got.attributions is not None and want.attributions is not None
    torch.testing.assert_close(got.attributions, want.attributions, rtol=0, atol=PATH_ATOL)
    assert labels_only.attributions is None and labels_only.labels.tolist() == got.labels[:1].tolist()


def test_http_oracle_retries_503_then_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("deepdefense.clients.oracle.time.sleep", waits.append)
    calls: list[httpx.Request] = []
    body = {
        "model": "m",
        "defense": "none",
        "predictions": [
            {
                "label": 3,
                "probabilities": [0.1, 0.9],
                "attribution": {"method": "gradcam", "shape": [1, 1], "values": [[1.0]]},
            }
        ],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(
                503, headers={"Retry-After": "2"}, json={"error": {"code": "queue_full", "message": "busy"}}
            )
        return httpx.Response(200, json=body)

    transport = httpx.MockTransport(handler)
    with HttpOracle("http://oracle", "secret", backoff=0.5, transport=transport, jitter_seed=0) as oracle:
        reply = oracle.query(torch.zeros(1, 1, 1, 1))
    assert reply.labels.tolist() == [3] and reply.attributions is not None
    assert len(waits) == 2 and len(calls) == 3
    # Retry-After is a floor; the jitter spreads the waits within 25% above it (seeded, so repeatable)
    assert all(2.0 <= w <= 2.5 for w in waits) and waits[0] != waits[1], waits
    assert calls[-1].headers["Authorization"] == "Bearer secret"
    assert json.loads(calls[-1].content) == {"instances": [{"pixels": [[[0.0]]]}], "explain": True}


def test_http_oracle_gives_up_and_reports_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("deepdefense.clients.oracle.time.sleep", lambda s: None)
    busy = httpx.MockTransport(lambda r: httpx.Response(503, json={"error": {"code": "not_ready", "message": "x"}}))
    with HttpOracle("http://oracle", retries=2, transport=busy) as oracle, pytest.raises(OracleError) as err:
        oracle.query(torch.zeros(1, 1, 1, 1))
    assert err.value.status == 503
    spent = httpx.MockTransport(
        lambda r: httpx.Response(
            429, json={"error": {"code": "budget_exhausted", "message": "the query budget of this key is spent"}}
        )
    )
    with HttpOracle("http://oracle", transport=spent) as oracle, pytest.raises(OracleError, match="budget") as err:
        oracle.query(torch.zeros(1, 1, 1, 1))
    assert err.value.status == 429 and err.value.code == "budget_exhausted"

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with (
        HttpOracle("http://oracle", retries=1, transport=httpx.MockTransport(refuse)) as oracle,
        pytest.raises(OracleError, match="connection refused") as err,
    ):
        oracle.info()
    assert err.value.status is None and err.value.code == "connection_failed"


def test_api_key_from_file_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("# the attacker's key\n  abc123  \n")
    assert read_api_key(key_file) == "abc123"
    monkeypatch.setenv("DD_CLIENT_API_KEY", "from-env")
    assert read_api_key() == "from-env"
    key_file.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_api_key(key_file)
