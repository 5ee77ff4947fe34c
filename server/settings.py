"""Server configuration: ``DD_*`` environment variables, overridden by ``deepdefense serve`` flags.

API keys are read only from ``DD_API_KEYS`` (comma-separated) or the file named by
``DD_API_KEYS_FILE`` (one key per line; a line whose first visible character is ``#`` is a comment, a ``#``
inside a key is part of the key), never from a flag, so that they do
not show up in process listings or shell history; operator keys for ``/metrics`` and ``/docs``
likewise from ``DD_ADMIN_KEYS`` or ``DD_ADMIN_KEYS_FILE``. Validation errors never echo an input
(``hide_input_in_errors``), so a bad setting cannot print a key. Several checkpoints (one model each):
``--checkpoint`` repeated, or ``DD_CHECKPOINT=lenet-mnist,lenet-fashionmnist``. Engine options go through
unchanged as a dict: ``DD_ENGINE='{"steps": 10}'`` or ``DD_ENGINE__STEPS=10`` (values are read as JSON when they parse).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from deepdefense.common.options import json_or_text
from deepdefense.defense.loader import gate_available
from deepdefense.defense.names import DefenseName
from deepdefense.models.checkpoint import read_meta, resolve_checkpoint

from .auth import KEY_RULE, weak_key
from .limits import default_body_limit
from .monitor import MIN_QUERIES, THRESHOLD, TRUST_RATE, WINDOW
from .state import redis_address
from .watermark import ESCALATED_FRACTION, FRACTION, RECORDS

#: Who may read an operator route: anyone, holders of an admin key, or nobody (the route is absent).
Access = Literal["open", "admin", "off"]
#: Characters a key may hold: visible ASCII except the comma (the separator of DD_API_KEYS).
_KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {","}


def _derived_share(description: str) -> Any:
    """A setting in [0, 1) whose default (None) follows another setting, as ``description`` says."""
    return Field(None, ge=0, lt=1, description=description)


class ServerSettings(BaseSettings):
    """Everything ``deepdefense serve`` can be told; see ``docs/server.md``."""

    model_config = SettingsConfigDict(
        env_prefix="DD_", env_nested_delimiter="__", env_ignore_empty=True, extra="forbid", hide_input_in_errors=True
    )

    checkpoint: Annotated[list[str], NoDecode] = Field(
        ["lenet-mnist"],
        description="shipped checkpoint name or path to its metadata JSON; repeat the flag (or separate them by "
        "commas in DD_CHECKPOINT) to serve several models, each under its checkpoint's name, the first the default",
    )
    defense: DefenseName = Field("deepdefense", description="`none` serves the undefended victim, by name only")
    interpreter: str = Field("gradcam", description="attribution method: gradcam, gradinput, relevancecam")
    device: str = Field("auto", description="auto (CUDA when present), cpu or cuda[:N]")
    engine: dict[str, Any] = Field(default_factory=dict, description="keyword options passed to the defense")
    data_root: str | None = Field(None, description="data sets, for layer sensitivity not stored in the checkpoint")
    gate: Literal["auto", "none", "misinform"] = Field(
        "auto",
        description="misinform: queries the checkpoint's domain score flags as out of domain are answered from its "
        "misinformation model (Adaptive Misinformation), in front of any defense; auto: misinform when the "
        "checkpoint ships a domain score and a misinformation model, else none",
    )
    monitor: Literal["auto", "off", "on"] = Field(
        "auto",
        description="on: per API key, what its queries are (domain flags, near-duplicates across keys, PRADA's "
        "distances); a key whose queries look like extraction is escalated (needs API keys and the gate; state "
        "in budget_db or state); auto: on whenever API keys are configured and the gate is on",
    )
    monitor_action: Literal["misinform", "refuse"] = Field(
        "misinform", description="an escalated key's answers: all from the misinformation model, or 403 key_flagged"
    )
    monitor_window: int = Field(WINDOW, ge=1, description="queries per key the monitor looks at")
    monitor_min_queries: int = Field(MIN_QUERIES, ge=1, description="queries before a key can be escalated")
    monitor_threshold: float = Field(
        THRESHOLD, ge=0, lt=1, description="a window with more than this fraction flagged is escalated"
    )
    monitor_trust_rate: float | None = _derived_share(
        "a full window with at most this fraction flagged is in good standing: its flagged queries are answered by "
        f"the defense, not misinformed (at most monitor_threshold; default: half of it, {TRUST_RATE:g})"
    )

    watermark: Literal["auto", "off", "on"] = Field(
        "auto",
        description="on: per API key, a keyed-hash-chosen fraction of the answers carry another label, kept (with the "
        "query) in budget_db or state, so that `deepdefense ownership verify` can prove a copy; the fraction is the "
        "accuracy honest users lose (needs API keys); auto: on whenever API keys are configured",
    )
    watermark_fraction: float = Field(
        FRACTION, gt=0, le=0.1, description="the share of each key's queries whose answers carry the watermark"
    )
    watermark_escalated_fraction: float | None = _derived_share(
        "the share of the queries of a key the extraction monitor escalated whose answers carry the watermark (at "
        f"least watermark_fraction; default: the larger of it and {ESCALATED_FRACTION:g})"
    )
    watermark_records: int = Field(RECORDS, ge=1, description="watermarked queries kept per key (oldest dropped)")

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    allow_open: bool = Field(
        False,
        description="serve without API keys on an address other than loopback: anyone who reaches it may query, "
        "unmetered and unwatched (without this, such a server refuses to start)",
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")

    max_instances: int = Field(16, ge=1, description="instances per request")
    max_body_bytes: int | None = Field(
        None,
        ge=1024,
        description="request body size, enforced while reading; unset: derived from the model's input shape and "
        "max_instances (server/limits.py, default_body_limit)",
    )
    body_timeout_s: float = Field(30.0, gt=0, description="the whole body must arrive within this time, else 408")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection must deliver a request's headers within this time of connecting (or of their "
        "first byte, on a kept-alive connection), else it is closed",
    )
    max_connections: int = Field(
        1000, ge=1, description="open connections and requests in progress; beyond, requests are answered 503"
    )
    keep_alive_s: int = Field(
        20,
        ge=1,
        description="idle keep-alive connections are closed after this; longer "
        "than clients keep theirs (httpx: 5 s), so a client never "
        "reuses a connection the server is closing",
    )
    max_image_bytes: int = Field(2 << 20, ge=64, description="decoded size of one base64 image")
    max_image_pixels: int = Field(4_000_000, ge=1, description="declared width × height of one image")

    max_batch_size: int = Field(
        64, ge=1, description="instances per micro-batch (N): the engine optimises them together"
    )
    max_batch_wait_ms: float = Field(5.0, ge=0, description="longest wait for a micro-batch to fill (M)")
    model_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="model workers, each answering its own micro-batch with its own defense (the same weights); "
        "`deepdefense serve` gives each its share of torch's threads",
    )
    model_worker_kind: Literal["auto", "thread", "process"] = Field(
        "auto",
        description="what a model worker is: a thread of the server's process with a replica of the defense, or a "
        "process with its own copy (no GIL shared with the other workers and the event loop); auto: processes for "
        "the DeepDefense engine on a CPU, threads otherwise (docs/performance.md, 'Fourth round')",
    )
    queue_size: int = Field(256, ge=1, description="queued instances before answering 503")
    queue_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="the share of queue_size and of max_expected_latency_s that one API key's queued instances "
        "may take (beyond: 503 key_share), so that one key cannot fill the queue for the others",
    )
    max_expected_latency_s: float = Field(
        10.0,
        gt=0,
        description="503 when a new request's expected time to its "
        "answer (instances running and queued ahead, and its own, at the measured "
        "seconds per instance) exceeds this, unless the server is idle",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="end-to-end limit of one request before 504")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of 503 answers")
    warmup: bool = Field(True, description="send one query through the defense before reporting ready")

    api_keys: SecretStr | None = Field(None, description="comma-separated API keys (environment only)")
    api_keys_file: FilePath | None = Field(None, description="file with one API key per line")
    query_budget: int | None = Field(None, ge=1, description="queries per API key, kept in budget_db or state")
    budget_db: Path = Field(
        Path("deepdefense-budget.sqlite"),
        description="SQLite file of spent budgets and the monitor's state (when state is unset)",
    )
    state: str | None = Field(
        None,
        description="redis://[:password@]host:port/db (or rediss://): budgets and the monitor's state in Redis, "
        "shared by server replicas; unset: in budget_db (a password is better given in DD_STATE than as a flag)",
    )

    replicas: int | None = Field(
        None,
        ge=1,
        description="run the app as this many Ray Serve replicas behind Serve's HTTP proxy (pip install "
        "'deepdefense[cluster]'; docs/scaling.md); more than 1 with a budget or the monitor needs state; "
        "unset: one uvicorn process, no Ray",
    )
    ray_address: str | None = Field(
        None,
        description="with replicas: the Ray cluster to join (host:port, ray://…, or auto: the one started on "
        "this host); unset: a new local Ray instance",
    )
    max_ongoing_requests: int = Field(
        8,
        ge=1,
        description="with replicas: requests Serve sends to one replica at a time (its micro-batcher batches "
        "them); the rest wait in Serve's router for a free replica (docs/scaling.md)",
    )
    max_queued_requests: int = Field(
        64,
        ge=1,
        description="with replicas: requests that may wait in a gateway's router for a free replica; beyond, "
        "503 overloaded with Retry-After at once (docs/scaling.md)",
    )
    replica_cpus: float = Field(1.0, gt=0, description="with replicas: CPUs Ray reserves for each replica")

    admin_keys: SecretStr | None = Field(None, description="comma-separated operator keys (environment only)")
    admin_keys_file: FilePath | None = Field(None, description="file with one operator key per line")
    metrics_access: Access = Field(
        "open",
        description="/metrics: open (anyone gets the service's series; the gate's and the monitor's, and key ids, "
        "only with an operator key), admin (operator key only) or off",
    )
    docs_access: Access = Field("open", description="/docs, /redoc and /openapi.json: open, admin or off")
    playground: Literal["on", "off"] = Field(
        "on",
        description="GET /: a page to draw a digit or drop an image and see the answer, through /predict as any "
        "client (off: GET / is 404)",
    )

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _split_checkpoints(cls, value: Any) -> Any:
        """``DD_CHECKPOINT=lenet-mnist,lenet-fashionmnist`` (and one name given as a string) as a list."""
        return [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else value

    @field_validator("checkpoint")
    @classmethod
    def _checkpoints_exist(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one checkpoint")
        seen: dict[str, str] = {}
        for checkpoint in value:
            name = model_name(checkpoint)
            if name in seen:
                raise ValueError(
                    f"two checkpoints are named {name!r} ({seen[name]} and {checkpoint}): each model is served under "
                    "its checkpoint's name, so give each model a checkpoint of its own name"
                )
            seen[name] = checkpoint
        return value

    @field_validator("engine", mode="after")
    @classmethod
    def _decode_engine_values(cls, value: dict[str, Any]) -> dict[str, Any]:
        """``DD_ENGINE__STEPS=10`` arrives as the string "10": read such values as JSON when they parse."""
        return {key: json_or_text(v) for key, v in value.items()}

    @field_validator("state")
    @classmethod
    def _state_is_redis(cls, value: str | None) -> str | None:
        if value is not None:
            redis_address(value)  # its ValueError never repeats the URL, which may hold a password
        return value

    @model_validator(mode="after")
    def _check_keys(self) -> ServerSettings:
        keys, admin = self.keys(), self.admin_keys_list()
        if self.query_budget is not None and not keys:
            raise ValueError("query_budget needs API keys (DD_API_KEYS or DD_API_KEYS_FILE)")
        if self.monitor == "on" and not keys:
            raise ValueError("monitor 'on' needs API keys (DD_API_KEYS or DD_API_KEYS_FILE): it watches each key")
        if self.watermark == "on" and not keys:
            raise ValueError(
                "watermark 'on' needs API keys (DD_API_KEYS or DD_API_KEYS_FILE): it marks each key's answers"
            )
        if self.monitor == "on" and not any(self.gated(c) for c in self.checkpoint):
            raise ValueError(
                "monitor 'on' needs the gate (misinform, or auto with a checkpoint that ships it): it reads the gate's "
                "domain flags"
            )
        kept = self.query_budget is not None or self.monitoring() or self.watermarking()
        if (self.replicas or 1) > 1 and not self.state and kept:
            raise ValueError(
                "replicas > 1 with a query budget, the monitor or the watermark need state (a redis:// URL, "
                "DD_STATE or --state): the SQLite budget_db is a file of one machine, so replicas would not share "
                "budgets, windows and watermark records"
            )
        if self.monitor_min_queries > self.monitor_window:
            raise ValueError("monitor_min_queries cannot exceed monitor_window")
        if (
            self.watermark_escalated_fraction is not None
            and self.watermark_escalated_fraction < self.watermark_fraction
        ):
            raise ValueError("watermark_escalated_fraction cannot be below watermark_fraction")
        if self.monitor_trust_rate is not None and self.monitor_trust_rate > self.monitor_threshold:
            raise ValueError("monitor_trust_rate cannot exceed monitor_threshold (a trusted key is never escalated)")
        for route, access in (("metrics", self.metrics_access), ("docs", self.docs_access)):
            if access == "admin" and not admin:
                raise ValueError(f"{route}_access 'admin' needs operator keys (DD_ADMIN_KEYS or DD_ADMIN_KEYS_FILE)")
        for kind, found in (("API", keys), ("operator", admin)):
            if any(not set(k) <= _KEY_CHARS for k in found):  # the message never shows a key
                raise ValueError(f"an {kind} key holds a character other than visible ASCII (no spaces or commas)")
            if any(weak_key(k) for k in found):
                raise ValueError(f"an {kind} key is too weak: keys need {KEY_RULE}")
        if not keys and not self.allow_open and not loopback(self.host):
            raise ValueError(
                f"host {self.host} is not a loopback address and no API keys are configured: anyone who reaches it "
                "could query the model unmetered. Give keys (DD_API_KEYS_FILE, a file with one key per line, or "
                "DD_API_KEYS), or say that an open server is intended (--allow-open, DD_ALLOW_OPEN=true)"
            )
        return self

    def monitoring(self) -> bool:
        """Whether the extraction monitor runs: ``on``, or ``auto`` with API keys and a gated model."""
        gated = any(self.gated(c) for c in self.checkpoint)
        return self.monitor == "on" or (self.monitor == "auto" and bool(self.keys()) and gated)

    def watermarking(self) -> bool:
        """Whether the default model's answers are watermarked: ``on``, or ``auto`` with API keys."""
        return self.watermark == "on" or (self.watermark == "auto" and bool(self.keys()))

    def gated(self, checkpoint: str) -> bool:
        """Whether ``checkpoint``'s model has the misinformation gate: ``misinform``, or ``auto`` and it ships it."""
        return self.gate == "misinform" or (self.gate == "auto" and gate_available(checkpoint))

    def body_limit(self) -> int:
        """``max_body_bytes``, or the limit derived from the largest input shape of the checkpoints and
        ``max_instances``."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        shapes = [read_meta(resolve_checkpoint(c)).input_shape for c in self.checkpoint]
        return max(default_body_limit(tuple(shape), self.max_instances) for shape in shapes)  # type: ignore[arg-type]

    def keys(self) -> list[str]:
        """The configured API keys, from the environment variable and the key file together."""
        return _read_keys(self.api_keys, self.api_keys_file)

    def admin_keys_list(self) -> list[str]:
        """The operator keys that open ``/metrics`` and ``/docs`` when their access is ``admin``."""
        return _read_keys(self.admin_keys, self.admin_keys_file)


def model_name(checkpoint: str) -> str:
    """The name a checkpoint's model is served under: its metadata file's name without ``.json``."""
    return resolve_checkpoint(checkpoint).stem


def loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _read_keys(listed: SecretStr | None, file: Path | None) -> list[str]:
    """Keys of the comma-separated list and of the file: one per line, blank lines and comment lines (whose
    first visible character is ``#``) left out; a ``#`` inside a key is part of it."""
    keys = [k.strip() for k in listed.get_secret_value().split(",")] if listed else []
    if file is not None:
        keys += [line.strip() for line in file.read_text().splitlines() if not line.strip().startswith("#")]
    return [k for k in keys if k]
