"""The request id: taken from the client's ``X-Request-ID`` when it is a short token, generated otherwise;
sent back on every response (errors included) and written in the access log beside the error code.

A client's id is accepted only as 1–128 characters of ``[A-Za-z0-9._:-]`` (a UUID, a trace id), so what
reaches the log is never free text a client chose; anything else is replaced by a generated id, which the
response's header then carries.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
#: Where the request's id lives in its scope (``scope["state"]``), for the access log.
REQUEST_ID = "request_id"
_ACCEPTED = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(sent: str | None) -> str:
    """``sent`` when it is an acceptable id, a fresh uuid4 (32 hex digits) otherwise."""
    if sent is not None and _ACCEPTED.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


def request_id_of(request: Request) -> str:
    """The id :class:`RequestIdMiddleware` gave ``request``."""
    return request.scope["state"][REQUEST_ID]


class RequestIdMiddleware:
    """Outermost: names the request before anything can refuse it, so every response carries its id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(HEADER.lower().encode())
        rid = request_id(sent.decode("latin-1") if sent is not None else None)
        scope.setdefault("state", {})[REQUEST_ID] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)
