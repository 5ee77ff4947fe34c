"""Request limits that hold before any parsing: body size and encoding (a middleware) and content
type (a dependency)."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response


class BodySizeLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, counting the bytes as they arrive.

    A declared ``Content-Length`` over the limit is refused before reading; otherwise the body is
    read chunk by chunk, stopping as soon as the count passes the limit, so a missing or false
    ``Content-Length`` (or chunked transfer) cannot get past it. An accepted body is then replayed
    to the app. A body declared compressed (``Content-Encoding`` other than ``identity``) is refused
    with 415 unread: the server inflates nothing, so a gzip bomb costs it only the bytes sent.
    The whole body must arrive within ``body_timeout`` seconds (408 otherwise), so a client that
    trickles its body (slowloris) cannot hold a connection and a request for ever.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if headers.get(b"content-encoding", b"identity").strip().lower() not in (b"", b"identity"):
            response = error_response(
                415,
                "unsupported_encoding",
                "send the body uncompressed (no Content-Encoding)",
                field="Content-Encoding",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        deadline = time.monotonic() + self.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                response = error_response(
                    408,
                    "body_timeout",
                    f"the body did not arrive within {self.body_timeout:g} s",
                    field="body",
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            "body_too_large",
            f"request body exceeds {self.max_bytes} bytes",
            field="body",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def require_json(request: Request) -> None:
    """Dependency: the body must be declared as ``application/json``."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json", field="Content-Type")
