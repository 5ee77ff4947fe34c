"""Cluster mode's gateway: the small ASGI app that Ray Serve's proxy sends every request to, and that hands
each request whole to a replica of the real app (docs/scaling.md, "Faults").

Why it exists: when a replica's process dies with requests inside, Serve's proxy answers those requests
with a plain-text 500, and the budget they spent stays spent. Between the proxy and the replicas, the
gateway sees the replica's death as an exception of the call, and answers it the way this server answers
everything it cannot serve now: 503 ``replica_lost`` as JSON with ``Retry-After``, after releasing the
request's budget hold (``server/budget.py``, "Holds"), so the client can retry without paying twice.

What travels to a replica (:class:`Forwarded`) is the request as bytes: method, path, query, headers (with
the gateway's hold id in place of any a client sent) and the body, read here under the same body limits
as the app's (413, 415, 408 before anything is forwarded). A replica runs it through its app with
:func:`call_app` and sends back status, headers and body; nothing of the app changes.

Ray stays out of this module: cluster.py passes the call to the replicas and the exception classes that
mean "the replica died" and "Serve's queue is full".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .budget import HOLD_HEADER, RedisLedger, new_hold
from .errors import error_response
from .limits import BodySizeLimitMiddleware
from .state import STATE_ERRORS

logger = logging.getLogger("deepdefense.server")

_HOLD = HOLD_HEADER.encode()


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request, as the gateway sends it to a replica."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class Returned:
    """The replica app's response, as it goes back to the gateway."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def call_app(app: ASGIApp, request: Forwarded) -> Returned:
    """Run ``request`` through the ASGI ``app`` (inside a replica) and collect its whole response. The app
    sees the body once, then a disconnect only after it has answered (it never thinks the client left)."""
    answered = asyncio.Event()
    body_sent = False
    status, headers, chunks = 500, [], []

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": None,
        "server": None,
    }
    try:
        await app(scope, receive, send)
    finally:
        answered.set()
    return Returned(status, headers, b"".join(chunks))


class Gateway:
    """The gateway's ASGI app (wrapped by :func:`gateway_app` in the body limits).

    ``replica(request)`` sends a request to a replica and returns its :class:`Returned`; it raises one of
    ``lost`` when the replica died with the request, one of ``overloaded`` when Serve refuses to queue more.
    ``ledger``: the Redis budgets (None without a budget), to release the hold of a request whose replica
    died. ``retry_after_s``: the Retry-After of the 503s."""

    def __init__(
        self,
        replica: Callable[[Forwarded], Awaitable[Returned]],
        *,
        lost: tuple[type[BaseException], ...],
        overloaded: tuple[type[BaseException], ...],
        ledger: RedisLedger | None,
        retry_after_s: int,
    ) -> None:
        self._replica, self._lost, self._overloaded = replica, lost, overloaded
        self._ledger, self._retry_after = ledger, {"Retry-After": str(retry_after_s)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # no websockets in this API
            return
        body = await _read_body(receive)
        if body is None:  # the client left before its body arrived
            return
        hold = new_hold()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != _HOLD] + [(_HOLD, hold.encode())]
        forwarded = Forwarded(scope["method"], scope["path"], scope.get("query_string", b""), headers, body)
        try:
            returned = await self._replica(forwarded)
        except self._overloaded:
            response = error_response(503, "overloaded", "the server is busy; retry later", headers=self._retry_after)
        except self._lost:
            refunded = await self._release(hold)
            logger.warning("a replica stopped with a request inside: 503 replica_lost, %d queries refunded", refunded)
            response = error_response(
                503,
                "replica_lost",
                "the replica answering this request stopped before it answered; nothing was charged; retry",
                headers=self._retry_after,
            )
        except Exception:  # the call itself failed (a bug): nothing was answered, so nothing is charged
            await self._release(hold)
            logger.exception("forwarding a request to a replica failed")
            response = error_response(500, "internal_error", "the request could not be forwarded; nothing was charged")
        else:
            response = Response(content=returned.body, status_code=returned.status)
            response.raw_headers = returned.headers
        await response(scope, receive, send)

    async def _release(self, hold: str) -> int:
        """Refund what the hold still holds; 0 without a budget, or when Redis is lost (it then expires charged)."""
        if self._ledger is None:
            return 0
        try:
            return await run_in_threadpool(self._ledger.release, hold)
        except STATE_ERRORS as err:
            logger.warning("could not release a hold (%s): it expires charged", type(err).__name__)
            return 0

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._ledger is not None:
                    self._ledger.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body (already limited and replayed by :class:`BodySizeLimitMiddleware`); None on a disconnect."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def gateway_app(gateway: Gateway, *, max_body_bytes: int, body_timeout_s: float) -> ASGIApp:
    """``gateway`` behind the app's own body limits, so that nothing over them is read whole or forwarded."""
    return BodySizeLimitMiddleware(gateway, max_bytes=max_body_bytes, body_timeout=body_timeout_s)
