"""Load and soak test of a running server, on loopback only (``deepdefense load``).

``clients`` concurrent clients send ``POST /predict`` in a loop for ``duration_s`` seconds (and at
most ``max_requests`` requests in all), each with its own seeded random images. A client that gets
503 waits ``Retry-After`` seconds (with a little seeded jitter) unless told to ignore it. The report
gives requests sent and served, every error class (``"503 overloaded"``, ``"504 timeout"``,
``"transport ReadTimeout"`` …), latency percentiles, throughput, and the server's resident memory
sampled once a second from ``/proc/<pid>/status`` with its model worker processes (start, peak, end, growth over
the second half).
Starting a server for the run is the launcher's job (``measure.launcher``, ``deepdefense load --serve``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from deepdefense.clients.latency import percentiles

#: Hard bounds, whatever the caller asks for: this is a test tool, not a traffic generator.
MAX_CLIENTS = 256
MAX_DURATION_S = 3600.0
MAX_REQUESTS = 1_000_000
_BODIES_PER_CLIENT = 4
_SAMPLE_EVERY_S = 1.0


@dataclass
class LoadConfig:
    url: str
    clients: int = 32
    duration_s: float = 120.0
    max_requests: int = 100_000
    instances: int = 1
    explain: bool = True
    timeout_s: float = 60.0
    honour_retry_after: bool = True
    seed: int = 0
    api_key: str | None = None
    server_pid: int | None = None
    progress_every_s: float = 0.0  # > 0: a progress line on stderr this often (:func:`progress_line`)

    def __post_init__(self) -> None:
        require_loopback(self.url)
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be in 1..{MAX_CLIENTS}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if not 1 <= self.max_requests <= MAX_REQUESTS:
            raise ValueError(f"max_requests must be in 1..{MAX_REQUESTS}")
        if self.instances < 1 or self.timeout_s <= 0:
            raise ValueError("instances must be at least 1 and the timeout positive")
        if self.progress_every_s < 0:
            raise ValueError("progress_every_s must be 0 (none) or positive")


@dataclass
class LoadReport:
    clients: int
    duration_s: float  # wall time of the load phase
    requests: int  # responses and transport errors, together
    served: int  # 200 answers
    throughput_rps: float  # served per second
    statuses: dict[str, int]
    errors: dict[str, int]  # "503 overloaded", "transport ReadTimeout", …
    latency_ms: dict[str, float]  # of served requests: p50, p95, p99, max
    latency_all_ms: dict[str, float]  # of every response, errors included
    retry_after_s: dict[str, float]  # of 503 answers: min, max; missing counts 503s without one
    rss_mb: dict[str, float] = field(default_factory=dict)  # start, quarters, end, peak, growth, second half
    pss_mb: dict[str, float] = field(default_factory=dict)  # start, end: the same processes' proportional set size
    server_metrics: dict[str, float] = field(default_factory=dict)
    shutdown: dict[str, Any] = field(default_factory=dict)  # exit code and seconds after SIGTERM

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_loopback(url: str) -> None:
    """Refuse any URL whose host is not a loopback address."""
    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        raise ValueError(f"cannot resolve the host of {url!r}") from None
    if not address.is_loopback:
        raise ValueError(f"load tests run against loopback only; {host!r} is {address}")


def rss_mb(pid: int, *, descendants: bool = False) -> float | None:
    """Resident memory of a process in MiB, from /proc (None when it cannot be read); with ``descendants``, its
    children's and theirs added (a server's model worker processes and their fork server)."""
    own = _proc_mib(pid, "status", "VmRSS:")
    if own is None or not descendants:
        return own
    return own + sum(_proc_mib(child, "status", "VmRSS:") or 0.0 for child in process_descendants(pid))


def pss_mb(pid: int) -> float | None:
    """The proportional set size of a process and its descendants in MiB (each page shared by n processes counted
    1/n in each: what they hold together, where a sum of RSS counts the pages that model worker processes share with
    their fork server once per process); None where /proc/<pid>/smaps_rollup cannot be read."""
    own = _proc_mib(pid, "smaps_rollup", "Pss:")
    if own is None:
        return None
    return own + sum(_proc_mib(child, "smaps_rollup", "Pss:") or 0.0 for child in process_descendants(pid))


def _proc_mib(pid: int, name: str, field: str) -> float | None:
    """The kB figure on the ``field`` line of /proc/<pid>/<name>, in MiB (None when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/{name}") as fh:
            return next((int(line.split()[1]) / 1024 for line in fh if line.startswith(field)), None)
    except OSError:
        return None


def process_descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc/<pid>/task/<tid>/children; none where that cannot be read)."""
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as fh:
                    children = [int(c) for c in fh.read().split()]
            except OSError:
                continue
            found += children
            stack += children
    return found


class _Run:
    """The shared state of one load run: the request allowance, the records, the RSS samples."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.left = config.max_requests
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.served_ms: list[float] = []
        self.all_ms: list[float] = []
        self.retry_after: list[float] = []
        self.missing_retry_after = 0
        self.rss: list[tuple[float, float]] = []
        self.pss: list[float] = []

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def run_load(config: LoadConfig) -> LoadReport:
    """Run the load described by ``config`` against a server that is already ready."""
    run = _Run(config)
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    limits = httpx.Limits(max_connections=config.clients, max_keepalive_connections=config.clients)
    async with httpx.AsyncClient(
        base_url=config.url, headers=headers, limits=limits, timeout=config.timeout_s
    ) as client:
        shape = await _input_shape(client)
        started = time.perf_counter()
        deadline = started + config.duration_s
        background = [asyncio.create_task(_sample_rss(run, started, deadline))]
        if config.progress_every_s > 0:
            background.append(asyncio.create_task(_report_progress(run, started, deadline)))
        await asyncio.gather(*(_client(run, client, i, shape, deadline) for i in range(config.clients)))
        elapsed = time.perf_counter() - started
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        _record_rss(run, started)
        server_metrics = await _server_metrics(client)
    served = len(run.served_ms)
    retry = {"min": min(run.retry_after), "max": max(run.retry_after)} if run.retry_after else {}
    return LoadReport(
        clients=config.clients,
        duration_s=round(elapsed, 2),
        requests=sum(run.statuses.values()) + sum(v for k, v in run.errors.items() if k.startswith("transport")),
        served=served,
        throughput_rps=round(served / elapsed, 2),
        statuses=dict(sorted(run.statuses.items())),
        errors=dict(sorted(run.errors.items())),
        latency_ms=_rounded(percentiles(run.served_ms)),
        latency_all_ms=_rounded(percentiles(run.all_ms)),
        retry_after_s=retry | {"missing": run.missing_retry_after},
        rss_mb=_rss_summary(run.rss),
        pss_mb=_rounded({"start": run.pss[0], "end": run.pss[-1]}) if run.pss else {},
        server_metrics=server_metrics,
    )


async def _input_shape(client: httpx.AsyncClient) -> list[int]:
    r = await client.get("/v1/models")
    r.raise_for_status()
    return list(r.json()["models"][0]["input_shape"])


def _bodies(config: LoadConfig, index: int, shape: list[int]) -> list[bytes]:
    """A few request bodies for one client, from its own seeded generator."""
    rng = random.Random(config.seed * 100_003 + index)
    c, h, w = shape
    bodies = []
    for _ in range(_BODIES_PER_CLIENT):
        instances = [
            {"pixels": [[[round(rng.random(), 4) for _ in range(w)] for _ in range(h)] for _ in range(c)]}
            for _ in range(config.instances)
        ]
        bodies.append(json.dumps({"instances": instances, "explain": config.explain}).encode())
    return bodies


async def _client(run: _Run, client: httpx.AsyncClient, index: int, shape: list[int], deadline: float) -> None:
    config = run.config
    bodies = _bodies(config, index, shape)
    jitter = random.Random(config.seed * 7_919 + index)
    sent = 0
    while time.perf_counter() < deadline and run.take():
        body = bodies[sent % len(bodies)]
        sent += 1
        t0 = time.perf_counter()
        try:
            r = await client.post("/predict", content=body)
        except httpx.TransportError as err:
            run.errors[f"transport {type(err).__name__}"] += 1
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.perf_counter())))
            continue
        ms = 1000 * (time.perf_counter() - t0)
        run.all_ms.append(ms)
        run.statuses[str(r.status_code)] += 1
        if r.status_code == 200:
            run.served_ms.append(ms)
            continue
        run.errors[f"{r.status_code} {_error_code(r)}"] += 1
        if r.status_code == 503:
            wait = _retry_after(r)
            if wait is None:
                run.missing_retry_after += 1
                wait = 1.0
            else:
                run.retry_after.append(wait)
            if config.honour_retry_after:
                pause = wait * (1 + 0.25 * jitter.random())
                await asyncio.sleep(max(0.0, min(pause, deadline - time.perf_counter())))


def _error_code(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "not-json"


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return float(r.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def progress_line(run: _Run, elapsed: float) -> str:
    """``load: 30/120 s, 412 requests, 400 served (13.3/s), errors: 503 overloaded × 12``."""
    requests = run.config.max_requests - run.left
    served = len(run.served_ms)
    errors = ", ".join(f"{k} × {v}" for k, v in sorted(run.errors.items())) or "none"
    return (
        f"load: {elapsed:.0f}/{run.config.duration_s:g} s, {requests} requests, {served} served "
        f"({served / max(elapsed, 1e-9):.1f}/s), errors: {errors}"
    )


async def _report_progress(run: _Run, started: float, deadline: float) -> None:
    """A :func:`progress_line` on stderr every ``progress_every_s`` until the deadline."""
    every = run.config.progress_every_s
    while time.perf_counter() + every < deadline:
        await asyncio.sleep(every)
        print(progress_line(run, time.perf_counter() - started), file=sys.stderr, flush=True)


async def _sample_rss(run: _Run, started: float, deadline: float) -> None:
    while time.perf_counter() < deadline:
        _record_rss(run, started)
        await asyncio.sleep(_SAMPLE_EVERY_S)


def _record_rss(run: _Run, started: float) -> None:
    if run.config.server_pid is not None and (mb := rss_mb(run.config.server_pid, descendants=True)) is not None:
        run.rss.append((time.perf_counter() - started, mb))
        if (pss := pss_mb(run.config.server_pid)) is not None:
            run.pss.append(pss)


def _rss_summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    """Start, the values at a quarter, half and three quarters of the run, end, peak and growth."""
    if not samples:
        return {}
    values = [mb for _, mb in samples]

    def at(fraction: float) -> float:
        return next(mb for t, mb in samples if t >= fraction * samples[-1][0])

    return _rounded(
        {
            "start": values[0],
            "at_25%": at(0.25),
            "at_50%": at(0.5),
            "at_75%": at(0.75),
            "end": values[-1],
            "peak": max(values),
            "growth": values[-1] - values[0],
            "growth_second_half": values[-1] - at(0.5),
            "samples": len(values),
        }
    )


async def _server_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """A few counters from /metrics, when it is open to this client, summed over the served models."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = await client.get("/metrics")
    except httpx.TransportError:
        return {}
    if r.status_code != 200:
        return {}
    wanted = {
        "dd_answers_total",
        "dd_defense_fallbacks_total",
        "dd_defense_failures_total",
        "dd_dropped_instances_total",
        "dd_rejected_requests_total",
        "dd_instance_cost_seconds",
    }
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name in wanted:
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("defense", "model"))
                name = f"{s.name}{{{label}}}" if label else s.name
                found[name] = found.get(name, 0.0) + s.value
    return found


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in values.items()}
