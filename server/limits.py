"""Request limits that hold before any parsing: body size, time and encoding (a middleware that counts
the body as the app reads it) and content type (a dependency)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response

#: Characters of one pixel value in a JSON body at most, as clients write floats ("0.12345678901234568, ").
PIXEL_CHARS = 24
#: An image instance may be as large as this many times the model's input pixels, uncompressed 8-bit RGB
#: (room for PNG and JPEG at sizes other than the model's, and for the playground's 280×280 pad).
IMAGE_HEADROOM = 64
#: Room for the JSON around the instances.
ENVELOPE_BYTES = 64 << 10


def default_body_limit(shape: tuple[int, int, int], max_instances: int) -> int:
    """The default ``max_body_bytes``: ``max_instances`` times the larger of an instance as pixels (C×H×W
    values of :data:`PIXEL_CHARS`) and as the base64 of an image of :data:`IMAGE_HEADROOM` × H×W RGB pixels,
    plus :data:`ENVELOPE_BYTES`. For lenet-mnist (1×28×28, 16 instances) 3,276,800 bytes."""
    c, h, w = shape
    pixels = c * h * w * PIXEL_CHARS
    image = 4 * math.ceil(IMAGE_HEADROOM * h * w * 3 / 3)
    return max_instances * max(pixels, image) + ENVELOPE_BYTES


class BodyRefused(ApiError):
    """The body broke a limit while the app was reading it (413 too large, 408 too slow)."""


class BodySizeLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, counting the bytes as they arrive, and bodies that take
    longer than ``body_timeout`` seconds (from the request's start) with 408.

    Nothing of the body is read here: the app reads it when it wants it — ``/predict`` and ``infer`` only
    after the key, its budget and its escalation are checked — so an unauthenticated or refused request
    costs the server its headers, not its body. A declared ``Content-Length`` over the limit is refused at
    once; otherwise the app's reads are counted and cut off (:class:`BodyRefused`, answered by the app's
    error handler, or here when the app is a plain ASGI app) as soon as the count passes the limit, so a
    missing or false ``Content-Length`` (or chunked transfer) cannot get past it. A body declared compressed
    (``Content-Encoding`` other than ``identity``) is refused with 415 unread: the server inflates nothing.
    A response that starts before the body was read to its end says ``Connection: close``, so the unread
    rest is never waited for.
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
            await error_response(**self._too_large())(scope, receive, send)
            return
        size, done, started = 0, declared in (b"", b"0") and b"transfer-encoding" not in headers, False
        deadline = time.monotonic() + self.body_timeout

        async def limited() -> Message:
            nonlocal size, done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                raise BodyRefused(
                    408,
                    "body_timeout",
                    f"the body did not arrive within {self.body_timeout:g} s",
                    field="body",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.disconnect":
                return message
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                raise BodyRefused(**self._too_large())
            done = not message.get("more_body", False)
            return message

        async def closing(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                sent = message.get("headers", [])
                if not done and all(name.lower() != b"connection" for name, _ in sent):
                    # the rest of the body stays unread: the connection cannot be used again
                    message = {**message, "headers": [*sent, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited, closing)
        except BodyRefused as refused:  # a plain ASGI app (the cluster's gateway) let it through
            if started:
                raise
            response = error_response(
                refused.status, refused.code, refused.message, field=refused.field, headers=refused.headers
            )
            await response(scope, receive, send)

    def _too_large(self) -> dict[str, Any]:
        return {
            "status": 413,
            "code": "body_too_large",
            "message": f"request body exceeds {self.max_bytes} bytes",
            "field": "body",
            "headers": {"Connection": "close"},
        }


def require_json(request: Request) -> None:
    """Dependency: the body must be declared as ``application/json``."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json", field="Content-Type")
