"""Waiting for a server to be ready: its ``/readyz`` polled until it answers 200, within a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

#: Longest wait for one ``/readyz`` answer; a server that takes longer is asked again until the deadline.
REQUEST_TIMEOUT_S = 5.0


class NotReady(RuntimeError):
    """The server stopped, or did not answer ``/readyz`` with 200, before the deadline; the message says which."""


def wait_ready(
    url: str,
    timeout_s: float,
    *,
    alive: Callable[[], bool] = lambda: True,
    poll_s: float = 0.2,
    what: str = "the server",
) -> None:
    """Return once ``url``/readyz answers 200; :class:`NotReady` when ``alive()`` turns False (the server's
    process or thread ended) or ``timeout_s`` passes. ``what`` names the server in the message."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not alive():
            raise NotReady(f"{what} at {url} stopped before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=REQUEST_TIMEOUT_S).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise NotReady(f"{what} at {url} did not answer /readyz with 200 within {timeout_s:g} s")
        time.sleep(poll_s)
