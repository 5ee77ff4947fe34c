"""uvicorn in a thread on a free loopback port, for the tests that talk real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from clients.loopback import uvicorn_thread


@contextmanager
def loopback(app: FastAPI) -> Iterator[str]:
    """uvicorn in a thread on a free loopback port; yields the base URL once /readyz answers."""
    with uvicorn_thread(uvicorn.Config(app, log_level="warning")) as url:
        yield url
