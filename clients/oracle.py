"""The oracle a client queries: a batch of images in, probabilities, labels and attribution maps out.

:class:`HttpOracle` talks to a running ``deepdefense serve`` (``POST /predict`` or the Open Inference
Protocol's ``POST /v2/models/{name}/infer``, ``GET /v1/models``), to one of the models it serves.
Attacks, the benign client and the evaluation harness only see the :class:`Oracle` protocol, so the
harness can also answer in-process (``measure.local_oracle.LocalOracle``).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import torch
from torch import Tensor

API_KEY_ENV = "DD_CLIENT_API_KEY"
#: The routes an :class:`HttpOracle` can query through.
PROTOCOLS = ("predict", "v2")


@dataclass(frozen=True)
class ModelInfo:
    """What the oracle says it serves (``GET /v1/models``)."""

    name: str
    arch: str
    dataset: str
    classes: list[str]
    input_shape: tuple[int, int, int]
    interpreter: str
    defense: str
    defense_settings: dict[str, Any]


@dataclass
class OracleReply:
    """Answers for a batch of B queries, in order."""

    labels: Tensor  # (B,) long
    probabilities: Tensor  # (B, K)
    attributions: Tensor | None  # (B, H, W); None when no explanation was asked for


class Oracle(Protocol):
    """Send a batch of images (B, C, H, W) in [0, 1]; receive the defended answers."""

    def info(self) -> ModelInfo: ...

    def query(self, x: Tensor, *, explain: bool = True) -> OracleReply: ...


class OracleError(RuntimeError):
    """The oracle refused or failed a request; ``status`` (None: no HTTP answer) and ``code`` say why."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(f"{f'HTTP {status} ' if status is not None else ''}{code}: {message}")
        self.status = status
        self.code = code


def read_api_key(path: str | os.PathLike[str] | None = None) -> str | None:
    """The API key: the first line of ``path`` that is neither blank nor a comment (a line whose first visible
    character is ``#``; a ``#`` inside a key is part of it, as the server reads key files), else
    ``$DD_CLIENT_API_KEY``, else None."""
    if path is not None:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                return line
        raise ValueError(f"API key file {path} holds no key")
    return os.environ.get(API_KEY_ENV) or None


def stack_reply(labels: list[int], probabilities: list[Tensor], attributions: list[Tensor] | None) -> OracleReply:
    return OracleReply(
        labels=torch.tensor(labels, dtype=torch.long),
        probabilities=torch.stack(probabilities).float(),
        attributions=torch.stack(attributions).float() if attributions is not None else None,
    )


#: Retries wait up to this share longer than asked (uniformly at random), never shorter than Retry-After.
RETRY_JITTER = 0.25


class HttpOracle:
    """``deepdefense serve`` over HTTP: ``Authorization: Bearer <key>``, requests of at most
    ``max_instances`` images, retries with exponential backoff on 503 (honouring ``Retry-After``),
    504 and connection errors, and an :class:`OracleError` naming the server's reason on any other
    error status (or the connection error once the retries are spent). Every wait is stretched by up
    to :data:`RETRY_JITTER` at random (seeded by ``jitter_seed``), so that clients refused together do
    not come back together. ``model``: the served model to ask, by name (None: the server's default, the first
    it lists); ``protocol``: ``predict`` (``POST /predict``) or ``v2`` (the Open Inference Protocol's ``infer``)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        model: str | None = None,
        protocol: str = "predict",
        timeout: float = 60.0,
        max_instances: int = 16,
        retries: int = 5,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
        jitter_seed: int | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._jitter = random.Random(jitter_seed)
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.max_instances = max_instances
        self.retries = retries
        self.backoff = backoff
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.model, self.protocol = model, protocol
        self._info: ModelInfo | None = None

    def __enter__(self) -> HttpOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def info(self) -> ModelInfo:
        if self._info is None:
            served = self._request("GET", "/v1/models").json()["models"]
            named = [m for m in served if self.model in (None, m["name"])]
            if not named:
                names = ", ".join(m["name"] for m in served)
                raise OracleError(404, "model_not_found", f"the server serves {names}, not {self.model!r}")
            m = named[0]
            self._info = ModelInfo(
                name=m["name"],
                arch=m["arch"],
                dataset=m["dataset"],
                classes=m["classes"],
                input_shape=tuple(m["input_shape"]),
                interpreter=m["interpreter"],
                defense=m["defense"]["name"],
                defense_settings=m["defense"]["settings"],
            )
        return self._info

    def query(self, x: Tensor, *, explain: bool = True) -> OracleReply:
        labels: list[int] = []
        probabilities: list[Tensor] = []
        maps: list[Tensor] = []
        for start in range(0, len(x), self.max_instances):
            chunk = x[start : start + self.max_instances].detach().cpu().float()
            if self.protocol == "v2":
                chunk_labels, chunk_probabilities, chunk_maps = self._infer(chunk, explain)
                labels += chunk_labels
                probabilities += chunk_probabilities
                maps += chunk_maps
                continue
            body: dict[str, Any] = {"instances": [{"pixels": xi.tolist()} for xi in chunk], "explain": explain}
            if self.model is not None:
                body["model"] = self.model
            for p in self._request("POST", "/predict", json=body).json()["predictions"]:
                labels.append(int(p["label"]))
                probabilities.append(torch.tensor(p["probabilities"]))
                if explain:
                    maps.append(torch.tensor(p["attribution"]["values"]))
        return stack_reply(labels, probabilities, maps if explain else None)

    def _infer(self, chunk: Tensor, explain: bool) -> tuple[list[int], list[Tensor], list[Tensor]]:
        """One Open Inference Protocol ``infer`` request for ``chunk`` (B, C, H, W)."""
        wanted = ["label", "probabilities"] + (["attribution"] if explain else [])
        body = {
            "inputs": [
                {"name": "image", "shape": list(chunk.shape), "datatype": "FP32", "data": chunk.flatten().tolist()}
            ],
            "outputs": [{"name": name} for name in wanted],
        }
        outputs = self._request("POST", f"/v2/models/{self.info().name}/infer", json=body).json()["outputs"]
        got = {o["name"]: torch.tensor(o["data"]).reshape(o["shape"]) for o in outputs}
        maps = list(got["attribution"]) if explain else []
        return [int(v) for v in got["label"]], list(got["probabilities"]), maps

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            retry = attempt < self.retries
            wait = self.backoff * 2**attempt
            attempt += 1
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as err:
                if not retry:
                    raise OracleError(None, "connection_failed", f"{self.client.base_url}: {err}") from err
                time.sleep(wait * (1 + RETRY_JITTER * self._jitter.random()))
                continue
            if retry and response.status_code in (503, 504):
                time.sleep(retry_delay(response, wait) * (1 + RETRY_JITTER * self._jitter.random()))
                continue
            if response.is_error:
                raise error_from(response)
            return response


def retry_delay(response: httpx.Response, default: float) -> float:
    """Seconds to wait: the server's ``Retry-After`` (in seconds) when it gives one, else ``default``."""
    try:
        return max(float(response.headers["Retry-After"]), default)
    except (KeyError, ValueError):
        return default


def error_from(response: httpx.Response) -> OracleError:
    """The server's ``{"error": {"code", "message"}}`` as an exception (or the raw status)."""
    try:
        detail = response.json()["error"]
        return OracleError(response.status_code, detail["code"], detail["message"])
    except (ValueError, KeyError, TypeError):
        return OracleError(response.status_code, "http_error", response.reason_phrase or "request failed")
