"""One JSON shape for every error: ``{"error": {"code", "message", "field"}}``.

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

from .schemas import ErrorDetail, ErrorResponse

logger = logging.getLogger("deepdefense.server")

#: pydantic error types renamed to this API's codes; others keep pydantic's name.
_CODES = {
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


class ApiError(Exception):
    """An error answered as JSON with ``status``; raise it anywhere in a request."""

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


def error_response(
    status: int, code: str, message: str, *, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message, field=field))
    return JSONResponse(body.model_dump(), status_code=status, headers=dict(headers or {}))


def field_path(loc: Sequence[int | str]) -> str:
    """``("body", "instances", 0, "pixels", 2)`` → ``"instances[0].pixels[2]"``."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def body_validation_error(err: ValidationError) -> RequestValidationError:
    """pydantic's errors of a body validated by hand, located under ``body`` as FastAPI locates its own."""
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False)])


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first: Mapping[str, Any] = errors[0] if errors else {"type": "invalid", "loc": ("body",), "msg": "invalid request"}
    kind = str(first.get("type", "invalid"))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "malformed")
        return error_response(400, "invalid_json", f"body is not valid JSON: {detail}", field="body")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    code = _CODES.get(kind, "invalid_type" if kind.endswith("_type") else kind)
    return error_response(422, code, message, field=field_path(first.get("loc", ())))


def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, field=exc.field, headers=exc.headers)


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    field = "body" if exc.status_code == 400 else None  # a body that cannot be read at all, as for invalid_json
    return error_response(exc.status_code, code, str(exc.detail), field=field, headers=exc.headers)


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error; the request was not answered")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
