"""One JSON shape for every error: ``{"error": {"code", "message", "field"}}``; on the Open Inference
Protocol's routes (``/v2`` and below) the protocol's own, ``{"error": "<message>"}`` with the code and the
field beside it (:class:`ErrorJSONResponse` picks the shape from the path it answers, wherever the error
was raised, and records the code for the access log).

Messages are written here or taken from pydantic's error text (never its ``input``), so an error
never echoes weights, gradients, file paths, tensors or undefended outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from .requestid import HEADER as REQUEST_ID_HEADER
from .requestid import REQUEST_ID
from .schemas import PIXELS_SHAPE, ErrorDetail, ErrorResponse, ProtocolErrorResponse
from .shapes import reshape_hint

logger = logging.getLogger("deepdefense.server")

#: The message of an image value above 1 (most often an 8-bit value, 0–255).
ABOVE_ONE = "values must be in [0, 1] and this one is above 1; for 8-bit values (0–255), divide by 255"

#: pydantic error types renamed to this API's codes; others keep pydantic's name.
_CODES = {
    PIXELS_SHAPE: "invalid_shape",
    "json_invalid": "invalid_json",
    "finite_number": "not_finite",
    "greater_than_equal": "out_of_range",
    "less_than_equal": "out_of_range",
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "too_short": "empty",
    "value_error": "invalid_value",
}

_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}
#: The Open Inference Protocol's routes: ``/v2`` and every path below it.
PROTOCOL_PREFIX = "/v2"
#: Where an error response leaves its code in the request's scope (``scope["state"]``) for the access log.
ERROR_CODE = "error_code"


def is_protocol_path(path: str) -> bool:
    return path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/")


def protocol_message(detail: ErrorDetail) -> str:
    """The protocol's error string: the message, then the code and the field, e.g.
    ``"no such model; this server serves 'lenet-mnist' (model_not_found, field model_name)"``."""
    where = f", field {detail.field}" if detail.field else ""
    return f"{detail.message} ({detail.code}{where})"


class ErrorJSONResponse(JSONResponse):
    """An error in this API's shape, or in the protocol's on ``/v2`` routes; sending it records its code in
    the request's scope, where the access log reads it."""

    def __init__(self, status: int, detail: ErrorDetail, headers: Mapping[str, str] | None = None) -> None:
        self.detail = detail
        super().__init__(ErrorResponse(error=detail).model_dump(), status_code=status, headers=dict(headers or {}))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})[ERROR_CODE] = self.detail.code
        if is_protocol_path(scope.get("path", "")):
            d = self.detail
            self.body = self.render(
                ProtocolErrorResponse(error=protocol_message(d), code=d.code, field=d.field).model_dump()
            )
            self.headers["content-length"] = str(len(self.body))
        await super().__call__(scope, receive, send)


class ApiError(Exception):
    """An error answered as JSON with ``status``; raise it anywhere in a request. The data plane's refusals
    (below, from :class:`TooManyInstances` on) are its subclasses, each naming its status and code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


class TooManyInstances(ApiError):
    """413: a request carries more instances than ``max_instances``."""

    def __init__(self, limit: int, count: int, field: str) -> None:
        super().__init__(413, "too_many_instances", f"at most {limit} instances per request, got {count}", field=field)


class BudgetExhausted(ApiError):
    """429: the key's query budget does not cover the request (``queries``: None before the body is read)."""

    def __init__(self, left: int, queries: int | None) -> None:
        asked = "" if queries is None else f", {queries} asked"
        message = f"the query budget of this key is spent ({left} left{asked})"
        super().__init__(429, "budget_exhausted", message, field="Authorization")


class KeyFlagged(ApiError):
    """403: the extraction monitor escalated the key, and its requests are refused."""

    def __init__(self) -> None:
        super().__init__(403, "key_flagged", "this API key is suspended; contact the operator", field="Authorization")


class NotFlagged(ApiError):
    """404: the operator cleared a key that is not escalated."""

    def __init__(self) -> None:
        super().__init__(404, "not_flagged", "no escalated key has this id", field="key_id")


class ModelNotFound(ApiError):
    """404: the request names a model this server does not serve."""

    def __init__(self, served: list[str], field: str) -> None:
        names = ", ".join(repr(n) for n in served)
        super().__init__(404, "model_not_found", f"no such model; this server serves {names}", field=field)


class ModelNotReady(ApiError):
    """503: the model is still loading, or failed to load."""

    def __init__(self, model: str, why: str, retry_after: int) -> None:
        headers = {"Retry-After": str(retry_after)}
        super().__init__(503, "not_ready", f"the model {model} {why}", headers=headers)


class StateUnavailable(ApiError):
    """503: the budgets' and the monitor's state (Redis) cannot be reached; nothing unmetered is answered."""

    def __init__(self, retry_after: int) -> None:
        message = "the server cannot reach its budget and monitor state; retry later"
        super().__init__(503, "state_unavailable", message, headers={"Retry-After": str(retry_after)})


class Busy(ApiError):
    """503: the micro-batcher cannot take the request now (``reason``: its code, e.g. ``queue_full``)."""

    def __init__(self, reason: str, retry_after: int) -> None:
        headers = {"Retry-After": str(retry_after)}
        super().__init__(503, reason, "the server is busy; retry later", headers=headers)


class AnswerTimeout(ApiError):
    """504: the request was not answered within ``request_timeout_s``."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(504, "timeout", f"not answered within {timeout_s:g} s")


class ClientClosedRequest(ApiError):
    """499 (logged and counted, never received): the client went away before its answer was ready."""

    def __init__(self) -> None:
        super().__init__(499, "client_closed_request", "the client closed the connection")


class AnswerFailed(ApiError):
    """500: the defense could not answer a query of the request (fail closed: nothing of it is sent)."""

    def __init__(self) -> None:
        message = "the defense could not answer this query; nothing of it is sent and the request is not charged"
        super().__init__(500, "defense_failed", message)


def error_response(
    status: int, code: str, message: str, *, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return ErrorJSONResponse(status, ErrorDetail(code=code, message=message, field=field), headers)


def field_path(loc: Sequence[int | str]) -> str:
    """``("body", "instances", 0, "pixels", 2)`` → ``"instances[0].pixels[2]"``."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def body_validation_error(err: ValidationError, *within: int | str) -> RequestValidationError:
    """pydantic's errors of a body validated by hand, located under ``body`` as FastAPI locates its own
    (``within``: where in the body the validated value lies, for a part of it validated on its own)."""
    return RequestValidationError([{**e, "loc": ("body", *within, *e["loc"])} for e in err.errors(include_url=False)])


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first: Mapping[str, Any] = errors[0] if errors else {"type": "invalid", "loc": ("body",), "msg": "invalid request"}
    kind = str(first.get("type", "invalid"))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "malformed")
        return error_response(400, "invalid_json", f"body is not valid JSON: {detail}", field="body")
    message = _teaching(request, first) or str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    code = _CODES.get(kind, "invalid_type" if kind.endswith("_type") else kind)
    return error_response(422, code, message, field=field_path(first.get("loc", ())))


def _teaching(request: Request, error: Mapping[str, Any]) -> str | None:
    """A message that says what to do, for the commonest mistakes with image values; None for the others."""
    kind, loc = error.get("type"), error.get("loc", ())
    if kind == PIXELS_SHAPE:
        return reshape_hint(list(error["ctx"]["shape"]), request.app.state.runtime.default.input_shape, batch=False)
    if kind == "less_than_equal" and ("pixels" in loc or "data" in loc):
        return ABOVE_ONE
    return None


def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, field=exc.field, headers=exc.headers)


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    field = "body" if exc.status_code == 400 else None  # a body that cannot be read at all, as for invalid_json
    return error_response(exc.status_code, code, str(exc.detail), field=field, headers=exc.headers)


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    rid = request.scope.get("state", {}).get(REQUEST_ID)
    logger.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, rid)
    # answered outside every middleware (Starlette's outermost one), so the id is set here
    headers = {REQUEST_ID_HEADER: rid} if rid else None
    return error_response(500, "internal_error", "internal error; the request was not answered", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
