"""Load and soak test of a running server, on loopback only (``deepdefense load``).

``clients`` concurrent clients send ``POST /predict`` in a loop for ``duration_s`` seconds (and at
most ``max_requests`` requests in all), each with its own seeded random images. A client that gets
503 waits ``Retry-After`` seconds (with a little seeded jitter) unless told to ignore it. The report
gives requests sent and served, every error class (``"503 overloaded"``, ``"504 timeout"``,
``"transport ReadTimeout"`` …), latency percentiles, throughput, and the server's resident memory
sampled once a second from ``/proc/<pid>/status`` (start, peak, end, growth over the second half).
With ``serve_command`` the server is started here on a free loopback port and stopped with SIGTERM
at the end, so the report also says how long it took to drain and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

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


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and max by the nearest-rank method; empty when there are no values."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": ordered[-1]}


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB, from /proc (None when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


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
    async with httpx.AsyncClient(base_url=config.url, headers=headers, limits=limits,
                                 timeout=config.timeout_s) as client:
        shape = await _input_shape(client)
        started = time.perf_counter()
        deadline = started + config.duration_s
        sampler = asyncio.create_task(_sample_rss(run, started, deadline))
        await asyncio.gather(*(_client(run, client, i, shape, deadline) for i in range(config.clients)))
        elapsed = time.perf_counter() - started
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        _record_rss(run, started)
        server_metrics = await _server_metrics(client)
    served = len(run.served_ms)
    retry = {"min": min(run.retry_after), "max": max(run.retry_after)} if run.retry_after else {}
    return LoadReport(
        clients=config.clients, duration_s=round(elapsed, 2), requests=sum(run.statuses.values()) + sum(
            v for k, v in run.errors.items() if k.startswith("transport")), served=served,
        throughput_rps=round(served / elapsed, 2), statuses=dict(sorted(run.statuses.items())),
        errors=dict(sorted(run.errors.items())), latency_ms=_rounded(percentiles(run.served_ms)),
        latency_all_ms=_rounded(percentiles(run.all_ms)), retry_after_s=retry | {"missing": run.missing_retry_after},
        rss_mb=_rss_summary(run.rss), server_metrics=server_metrics)


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
        instances = [{"pixels": [[[round(rng.random(), 4) for _ in range(w)] for _ in range(h)] for _ in range(c)]}
                     for _ in range(config.instances)]
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


async def _sample_rss(run: _Run, started: float, deadline: float) -> None:
    while time.perf_counter() < deadline:
        _record_rss(run, started)
        await asyncio.sleep(_SAMPLE_EVERY_S)


def _record_rss(run: _Run, started: float) -> None:
    if run.config.server_pid is not None and (mb := rss_mb(run.config.server_pid)) is not None:
        run.rss.append((time.perf_counter() - started, mb))


def _rss_summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    """Start, the values at a quarter, half and three quarters of the run, end, peak and growth."""
    if not samples:
        return {}
    values = [mb for _, mb in samples]

    def at(fraction: float) -> float:
        return next(mb for t, mb in samples if t >= fraction * samples[-1][0])

    return _rounded({"start": values[0], "at_25%": at(0.25), "at_50%": at(0.5), "at_75%": at(0.75),
                     "end": values[-1], "peak": max(values), "growth": values[-1] - values[0],
                     "growth_second_half": values[-1] - at(0.5), "samples": len(values)})


async def _server_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """A few counters from /metrics, when it is open to this client."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = await client.get("/metrics")
    except httpx.TransportError:
        return {}
    if r.status_code != 200:
        return {}
    wanted = {"dd_answers_total", "dd_defense_fallbacks_total", "dd_defense_failures_total",
              "dd_dropped_instances_total", "dd_rejected_requests_total", "dd_instance_cost_seconds"}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name in wanted:
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "defense")
                found[f"{s.name}{{{label}}}" if label else s.name] = s.value
    return found


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in values.items()}


# -- a server started for the run --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, alive: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> None:
    """Return once ``url``/readyz answers 200; RuntimeError if ``alive()`` turns False or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not alive():
            raise RuntimeError(f"the server at {url} stopped before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} was not ready after {timeout_s:g} s")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(poll_s)


@contextmanager
def spawned_server(command: Sequence[str], url: str, *, ready_timeout_s: float = 600.0,
                   drain_timeout_s: float = 120.0, env: dict[str, str] | None = None,
                   log: Any = None) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """Start ``command`` (a server listening at ``url``), wait for ``/readyz``, yield the process and
    a dict that, after the block, holds the exit code and the seconds from SIGTERM to exit."""
    process = subprocess.Popen(list(command), env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    shutdown: dict[str, Any] = {}
    try:
        try:
            wait_ready(url, lambda: process.poll() is None, ready_timeout_s, poll_s=0.2)
        except RuntimeError:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was ready") from None
            raise
        yield process, shutdown
    finally:
        if process.poll() is None:
            t0 = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(drain_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            shutdown.update(exit_code=process.returncode, seconds_after_sigterm=round(time.monotonic() - t0, 2))


# -- the command line ------------------------------------------------------------------------------------


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (loopback only)")
    p.add_argument("--serve", action="store_true",
                   help="start 'deepdefense serve' (configured by DD_* variables) on a free loopback port, run the "
                        "load against it, then stop it with SIGTERM; --url is ignored")
    p.add_argument("--clients", type=int, default=32, help=f"concurrent clients (at most {MAX_CLIENTS})")
    p.add_argument("--duration", type=float, default=120.0, help=f"seconds of load (at most {MAX_DURATION_S:g})")
    p.add_argument("--max-requests", type=int, default=100_000, help=f"requests in all (at most {MAX_REQUESTS})")
    p.add_argument("--instances", type=int, default=1, help="instances per request")
    p.add_argument("--no-explain", dest="explain", action="store_false", help="ask for predictions only")
    p.add_argument("--timeout", type=float, default=60.0, help="client-side seconds per request")
    p.add_argument("--ignore-retry-after", dest="honour_retry_after", action="store_false",
                   help="retry a 503 at once instead of after its Retry-After")
    p.add_argument("--server-pid", type=int, default=None, help="sample this process's resident memory")
    p.add_argument("--api-key-file", default=None,
                   help="file holding the API key (first non-comment line); default: $DD_CLIENT_API_KEY")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the report to this JSON file")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``deepdefense load``: the report as a dict."""
    from clients.oracle import read_api_key

    def config(url: str, pid: int | None) -> LoadConfig:
        return LoadConfig(url=url, clients=args.clients, duration_s=args.duration, max_requests=args.max_requests,
                          instances=args.instances, explain=args.explain, timeout_s=args.timeout,
                          honour_retry_after=args.honour_retry_after, seed=args.seed,
                          api_key=read_api_key(args.api_key_file), server_pid=pid)

    if not args.serve:
        return asyncio.run(run_load(config(args.url, args.server_pid))).as_dict()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "deepdefense.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with spawned_server(command, url, env=dict(os.environ), log=sys.stderr) as (process, shutdown):
        report = asyncio.run(run_load(config(url, process.pid)))
    report.shutdown = shutdown
    return report.as_dict()
