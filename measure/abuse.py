"""The server under abuse of the service itself (issue 29; docs/server.md, "Abuse of the service"), measured
against real servers on loopback: ``python -m deepdefense.measure.abuse [--defense none] [--out abuse.json]``.

* **Liveness under unauthenticated bodies**: three clients send 8 MiB JSON documents (1.7 million pixel
  values) without a key, back to back (one declares its length, two send it chunked); meanwhile
  ``/healthz`` is asked one request at a time: its p50 and p99.
* **A spent key's 16 images**: a key whose budget is spent sends 16 black 2000×2000 PNGs (4 kB each):
  the time to its 429, and how many images the server decoded (a counter around its decoder, so this
  server runs in this process).
* **A silent socket**: seconds until the server closes a connection that sends nothing (given up after 45 s).
* **One key saturating**: sixteen clients of one key keep 16-instance requests in flight; another key sends
  single requests one at a time: the share answered 200, and their latency.

The servers are ``deepdefense serve`` as a child process (``measure.launcher.spawn_serve``) with the given
defense and the defaults otherwise, except the spent key's server, in this process (same settings).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from deepdefense.clients.latency import percentiles
from deepdefense.measure.launcher import in_thread, spawn_serve

BODY_BYTES = 8 << 20
SILENT_LIMIT_S = 45.0


def black_png(width: int, height: int) -> str:
    """A valid, black, 8-bit grayscale PNG of width × height (base64): a few kB that decode to width × height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(bytes(height * (width + 1)), 9)  # each row: filter byte 0, then width zeros
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows)
    return base64.b64encode(png + chunk(b"IEND", b"")).decode()


def one_instance(seed: int) -> dict[str, Any]:
    value = (seed % 97) / 97
    return {"pixels": [[[value] * 28] * 28]}


def healthz_under_bodies(url: str, requests: int = 300) -> dict[str, Any]:
    stop = threading.Event()
    sent = [0]

    values = b"0.5, " * ((BODY_BYTES - 64) // 5)
    document = b'{"instances": [{"pixels": [[[' + values[:-2] + b"]]]}]}"  # valid JSON: 1.7 million values

    def flood(chunked: bool) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                body = (document[i : i + (1 << 20)] for i in range(0, len(document), 1 << 20)) if chunked else document
                with contextlib.suppress(httpx.TransportError):  # closed by the server before the body was sent
                    c.post("/predict", content=body, headers={"Content-Type": "application/json"})
                sent[0] += 1

    floods = [threading.Thread(target=flood, args=(chunked,), daemon=True) for chunked in (False, True, True)]
    for t in floods:
        t.start()
    time.sleep(1.0)
    latencies = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(requests):
            started = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
    stop.set()
    for t in floods:
        t.join(timeout=60)
    return {"healthz_s": percentiles(latencies), "bodies_sent": sent[0]}


def spent_key_images(settings_env: dict[str, str], repeats: int = 20) -> dict[str, Any]:
    from deepdefense.server import images
    from deepdefense.server.app import create_app
    from deepdefense.server.settings import ServerSettings

    decoded = [0]
    decode = images._image

    def counting(*args: Any) -> Any:
        decoded[0] += 1
        return decode(*args)

    images._image = counting  # type: ignore[assignment]
    key = settings_env["DD_API_KEYS"]
    body = {"instances": [{"image_b64": black_png(2000, 2000)} for _ in range(16)], "explain": False}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            overrides = {k.removeprefix("DD_").lower(): v for k, v in settings_env.items() if k.startswith("DD_")}
            overrides |= {"api_keys": key, "query_budget": 1, "budget_db": Path(tmp) / "budget.sqlite"}
            settings = ServerSettings(**overrides)
            with in_thread(create_app(settings), like_serve=True) as url, httpx.Client(base_url=url, timeout=60) as c:
                auth = {"Authorization": f"Bearer {key}"}
                assert c.post("/predict", json={"instances": [one_instance(0)]}, headers=auth).status_code == 200
                times, statuses = [], []
                for _ in range(repeats):
                    started = time.perf_counter()
                    statuses.append(c.post("/predict", json=body, headers=auth).status_code)
                    times.append(time.perf_counter() - started)
    finally:
        images._image = decode  # type: ignore[assignment]
    return {"statuses": sorted(set(statuses)), "refusal_s": percentiles(times), "images_decoded": decoded[0]}


def silent_socket(url: str) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(SILENT_LIMIT_S)
        started = time.perf_counter()
        try:
            closed = s.recv(1) == b""
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
        return {"closed": closed, "seconds": round(time.perf_counter() - started, 2)}


def saturation(url: str, saturating: str, other: str, requests: int = 30) -> dict[str, Any]:
    stop = threading.Event()
    statuses: list[int] = []

    def saturate(seed: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {saturating}"}) as c:
            while not stop.is_set():
                body = {"instances": [one_instance(seed + i) for i in range(16)], "explain": False}
                statuses.append(c.post("/predict", json=body).status_code)
                if statuses[-1] != 200:
                    time.sleep(0.005)

    answered, latencies = 0, []
    with ThreadPoolExecutor(16) as pool:
        for i in range(16):
            pool.submit(saturate, 100 * i)
        time.sleep(3.0)
        try:
            with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {other}"}) as c:
                for i in range(requests):
                    started = time.perf_counter()
                    r = c.post("/predict", json={"instances": [one_instance(i)], "explain": False})
                    if r.status_code == 200:
                        answered += 1
                        latencies.append(time.perf_counter() - started)
        finally:
            stop.set()
    return {
        "other_answered": f"{answered}/{requests}",
        "other_latency_s": percentiles(latencies) if latencies else None,
        "saturating_503": statuses.count(503),
        "saturating_200": statuses.count(200),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--defense", default="deepdefense", help="the served defense (default: deepdefense)")
    p.add_argument("--max-batch-size", type=int, default=None, help="the servers' DD_MAX_BATCH_SIZE (default: theirs)")
    p.add_argument("--queue-size", type=int, default=None, help="the servers' DD_QUEUE_SIZE (default: theirs)")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    saturating, other = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DD_")}
    with tempfile.TemporaryDirectory() as tmp:
        env |= {
            "DD_DEFENSE": args.defense,
            "DD_API_KEYS": f"{saturating},{other}",
            "DD_BUDGET_DB": str(Path(tmp) / "budget.sqlite"),
            "DD_LOG_LEVEL": "warning",
        }
        for name in ("max_batch_size", "queue_size"):
            if getattr(args, name) is not None:
                env[f"DD_{name.upper()}"] = str(getattr(args, name))
        report: dict[str, Any] = {"command": " ".join(["python -m deepdefense.measure.abuse", *(argv or sys.argv[1:])])}
        with spawn_serve(env) as (url, _, _):
            report["healthz_under_unauthenticated_8mib_bodies"] = healthz_under_bodies(url)
            report["silent_socket"] = silent_socket(url)
            report["one_key_saturating"] = saturation(url, saturating, other)
        report["spent_key_16_images"] = spent_key_images(env | {"DD_API_KEYS": other})
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
