"""Driving and reading a server under test: a TestClient once the app is ready, polling for a
condition, the one error shape, the bearer header, and samples of ``/metrics``.

Servers on a real loopback port come from ``measure.launcher`` (``in_thread``, ``spawned``)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

#: ``name="value"`` pairs of a sample's labels.
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@contextmanager
def serving(app: FastAPI, **client_options: Any) -> Iterator[TestClient]:
    """``app`` in FastAPI's TestClient (lifespan run); yields the client once ``/readyz`` answers 200."""
    with TestClient(app, **client_options) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, timeout=30, what="server ready (/readyz 200)")
        yield client


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str | None = None) -> None:
    """Poll ``condition`` every 5 ms; fail the test if it is not true within ``timeout`` seconds.

    The deadline is there so that a condition that never comes fails the test instead of hanging it;
    it is not a speed requirement: the conditions polled here come within milliseconds, so the
    default of 10 s leaves a slow or busy machine room to spare."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            code = getattr(condition, "__code__", None)
            where = f"{code.co_filename}:{code.co_firstlineno}" if code else repr(condition)
            raise AssertionError(f"{what or 'condition at ' + where} not reached within {timeout:g} s")
        time.sleep(0.005)


def error_of(response: Any) -> dict[str, Any]:
    """The ``error`` object ``{"code", "message", "field"}`` of a refusal, after checking that the body is exactly
    the one error shape (on the Open Inference Protocol's routes, the protocol's: :func:`protocol_error_of`)."""
    path = urlsplit(str(response.request.url)).path  # an httpx or a requests response
    if path == "/v2" or path.startswith("/v2/"):
        return protocol_error_of(response)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    return body["error"]


def protocol_error_of(response: Any) -> dict[str, Any]:
    """A refusal on an Open Inference Protocol route as ``{"code", "message", "field"}``, after checking that the
    body is the protocol's shape: ``{"error": "<message> (<code>, field <field>)", "code", "field"}``."""
    body = response.json()
    assert set(body) == {"error", "code", "field"} and isinstance(body["error"], str)
    where = f", field {body['field']}" if body["field"] else ""
    suffix = f" ({body['code']}{where})"
    assert body["error"].endswith(suffix), body
    return {"code": body["code"], "message": body["error"].removesuffix(suffix), "field": body["field"]}


def bearer(key: str) -> dict[str, str]:
    """The Authorization header that presents ``key``."""
    return {"Authorization": f"Bearer {key}"}


def metric_value(metrics_text: str, sample: str) -> float:
    """The value of the samples of a /metrics page that ``sample`` names, e.g. ``dd_answers_total{defense="none"}``:
    the series of that name whose labels include the ones given (a per-model series matches without its
    ``model`` label), summed; an AssertionError when there are none."""
    name, _, labels = sample.partition("{")
    wanted = dict(_LABEL.findall(labels))
    values = [
        s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
        if s.name == name and wanted.items() <= s.labels.items()
    ]
    if not values:
        raise AssertionError(f"{sample} is not exported")
    return sum(values)


def served_queries(url: str) -> float:
    """Instances the server at ``url`` answered (``dd_answers_total``, a series anyone who may read ``/metrics``
    gets; the per-key counts are an operator's)."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    family = families.get("dd_answers")
    return sum(s.value for s in family.samples if s.name == "dd_answers_total") if family else 0.0


def key_id_of(app: FastAPI, key: str) -> str:
    """The id the server of ``app`` gives ``key`` (an HMAC under its key-id secret, ``server/auth.py``)."""
    kid = app.state.runtime.keys.identify(key)
    assert kid is not None, "not a key of this server"
    return kid
