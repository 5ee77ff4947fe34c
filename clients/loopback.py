"""A ``deepdefense serve`` app under uvicorn in a background thread on a free loopback port, for the
evaluation harness's ``--serve`` mode: the same app, micro-batcher and ``Defense.answer`` as a
deployed server, reached over real HTTP."""

from __future__ import annotations

import secrets
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def served(checkpoint: str, defense: str, interpreter: str, *, device: str = "cpu", engine: dict[str, Any] | None = None,
           data_root: str | None = None, ready_timeout: float = 600.0) -> Iterator[tuple[str, str]]:
    """Start a server for ``checkpoint`` behind ``defense``; yield (base URL, API key) once ``/readyz``
    answers, stop it on exit. Settings are explicit (a fresh random key, no query budget, a budget
    database in a temporary folder), so the caller's ``DD_*`` environment cannot change them."""
    import uvicorn

    from server.app import create_app
    from server.settings import ServerSettings

    key = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="dd-eval-server-") as tmp:
        settings = ServerSettings(checkpoint=checkpoint, defense=defense, interpreter=interpreter, device=device,
                                  engine=engine or {}, data_root=data_root, api_keys=key, api_keys_file=None,
                                  query_budget=None, budget_db=Path(tmp) / "budget.sqlite", log_level="warning")
        config = uvicorn.Config(create_app(settings), log_level="warning", access_log=False)
        with uvicorn_thread(config, ready_timeout) as url:
            yield url, key


@contextmanager
def uvicorn_thread(config: Any, ready_timeout: float = 60.0) -> Iterator[str]:
    """uvicorn with ``config`` (a ``uvicorn.Config``) in a daemon thread on a free loopback port; yields the
    base URL once ``/readyz`` answers 200 and stops the server on exit."""
    import uvicorn

    from server.loadtest import wait_ready

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_ready(url, thread.is_alive, ready_timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
