"""The one launcher: a server on a free loopback port, ready when ``/readyz`` answers 200.

Two ways, for everything that needs a server it starts itself (the bench, ``deepdefense load --serve``,
``deepdefense eval --serve`` and the tests):

- :func:`in_thread` — an app under uvicorn in a daemon thread of this process (``served`` builds the
  app for one checkpoint and defense, ``like_serve`` configures uvicorn as ``deepdefense serve`` does);
- :func:`spawned` — a child process (``deepdefense serve`` by :func:`spawn_serve`, or any command that
  listens on the URL it is given), stopped with SIGTERM so that the report can say how it drained.

Every wait has a deadline; a server that dies before it is ready is reported at once.
"""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from deepdefense.common.readiness import wait_ready

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port nobody listens on now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# -- in this process ------------------------------------------------------------------------------------


@contextmanager
def in_thread(app: FastAPI, *, like_serve: bool = False, ready_timeout_s: float = 60.0) -> Iterator[str]:
    """``app`` under uvicorn in a daemon thread on a free loopback port; yields the base URL once ready.
    ``like_serve``: uvicorn configured as ``deepdefense serve`` configures it (``server.app.uvicorn_config``:
    keep-alive, graceful drain, no Server header) instead of uvicorn's defaults."""
    if like_serve:
        from deepdefense.server.app import uvicorn_config

        config = uvicorn_config(app, app.state.runtime.settings)
        config.log_level = "warning"
    else:
        config = uvicorn.Config(app, log_level="warning", access_log=False, http="h11", loop="asyncio")  # as serve
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://{LOOPBACK}:{sock.getsockname()[1]}"
    try:
        wait_ready(url, ready_timeout_s, alive=thread.is_alive, poll_s=0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def served(
    checkpoint: str | list[str],
    defense: str,
    interpreter: str,
    *,
    device: str = "cpu",
    engine: dict[str, Any] | None = None,
    data_root: str | None = None,
    gate: str = "none",
    ready_timeout_s: float = 600.0,
) -> Iterator[tuple[str, str]]:
    """A server for ``checkpoint`` (or several, one model each) behind ``defense`` (and the misinformation gate,
    with ``gate="misinform"``) in this process; yields (base URL, API key). The key is also the server's operator
    key, so the measurement that holds it reads the gate's and the monitor's series in ``/metrics``.
    Settings are explicit (a fresh random key, no query budget, a budget database in a temporary
    folder, no watermark), so the caller's ``DD_*`` environment cannot change them. The watermark, on by default
    with keys, would relabel a share of the answers chosen under secrets drawn afresh for every run, so no figure
    measured through it would repeat; the in-process arms of ``deepdefense eval`` have none either, and what it
    costs is measured on its own (``docs/results/ownership.md``)."""
    from deepdefense.server.app import create_app
    from deepdefense.server.settings import ServerSettings

    key = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="dd-served-") as tmp:
        model = {"checkpoint": checkpoint, "defense": defense, "interpreter": interpreter, "device": device}
        keys = {"api_keys": key, "api_keys_file": None, "admin_keys": key, "admin_keys_file": None}
        budget = {"query_budget": None, "budget_db": Path(tmp) / "budget.sqlite"}
        settings = ServerSettings(
            **model,
            engine=engine or {},
            data_root=data_root,
            gate=gate,
            **keys,
            **budget,
            watermark="off",
            log_level="warning",
        )
        with in_thread(create_app(settings), ready_timeout_s=ready_timeout_s) as url:
            yield url, key


# -- in a child process ---------------------------------------------------------------------------------


def serve_command(port: int) -> list[str]:
    """``deepdefense serve`` on loopback ``port``, run by this interpreter (configured by ``DD_*`` variables)."""
    return [sys.executable, "-m", "deepdefense.cli", "serve", "--host", LOOPBACK, "--port", str(port)]


@contextmanager
def spawned(
    command: Sequence[str],
    url: str,
    *,
    ready_timeout_s: float = 600.0,
    drain_timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    log: Any = None,
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """Start ``command`` (a server listening at ``url``), wait for ``/readyz``, yield the process and
    a dict that, after the block, holds the exit code and the seconds from SIGTERM to exit."""
    process = subprocess.Popen(list(command), env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    shutdown: dict[str, Any] = {}
    try:
        try:
            wait_ready(url, ready_timeout_s, alive=lambda: process.poll() is None)
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


@contextmanager
def spawn_serve(
    env: dict[str, str], *, log: Any = None, ready_timeout_s: float = 600.0
) -> Iterator[tuple[str, subprocess.Popen[bytes], dict[str, Any]]]:
    """``deepdefense serve`` as a child on a free loopback port; yields (base URL, process, shutdown)."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    with spawned(serve_command(port), url, env=env, log=log, ready_timeout_s=ready_timeout_s) as (process, shutdown):
        yield url, process, shutdown
