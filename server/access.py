"""Operator routes — ``/metrics``, ``/docs``, ``/redoc``, ``/openapi.json`` — open to anyone, behind
an operator key (``admin``: ``Authorization: Bearer <key>`` with a key of ``DD_ADMIN_KEYS``), or
``off`` (not routed: 404). API keys do not open them; operator keys do not open ``/predict``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .dependencies import RuntimeDep
from .errors import ApiError

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="OperatorKey",
    description="operator key, when an operator route is configured 'admin'",
)


def require_operator(
    runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """401 unless ``Authorization: Bearer <operator key>``; keys are compared in constant time."""
    if credentials is None or runtime.admin_keys.identify(credentials.credentials) is None:
        raise ApiError(
            401,
            "unauthorized",
            "an operator key is required (Authorization: Bearer <key>)",
            field="Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )


OPERATOR = [Depends(require_operator)]


def docs_router(app: FastAPI) -> APIRouter:
    """``/openapi.json``, ``/docs`` and ``/redoc`` behind an operator key. A browser does not send
    the key when the documentation page fetches the schema, so this mode is for tools (curl, schema
    checkers) and for browsers that add the header themselves."""
    router = APIRouter(dependencies=OPERATOR, include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    return router
