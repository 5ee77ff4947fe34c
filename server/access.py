"""Operator routes — ``/metrics``, ``/docs``, ``/redoc``, ``/openapi.json`` — open to anyone, behind
an operator key (``admin``: ``Authorization: Bearer <key>`` with a key of ``DD_ADMIN_KEYS``), or
``off`` (not routed: 404). API keys do not open them; operator keys do not open ``/predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import fastapi_offline
from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from .dependencies import RuntimeDep
from .errors import ApiError

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="OperatorKey",
    description="operator key, when an operator route is configured 'admin'",
)


def require_operator(
    runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
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


#: Where the documentation pages' scripts, style sheet and icon are served from: Swagger UI and ReDoc as the
#: ``fastapi-offline`` package ships them (their licences: Apache 2.0 and MIT, in that package's LICENSE), so
#: that ``/docs`` and ``/redoc`` load nothing from another host.
DOCS_ASSETS = "/docs/assets"
_ASSETS = Path(fastapi_offline.__file__).parent / "static"


def docs_router(app: FastAPI, *, operator: bool) -> APIRouter:
    """``/openapi.json`` (only with ``operator``: open, the app serves it itself), ``/docs`` and ``/redoc``
    with their assets from this server (:data:`DOCS_ASSETS`, open: they are public code). With ``operator``
    the pages and the schema need an operator key; a browser does not send the key when the documentation
    page fetches the schema, so that mode is for tools (curl, schema checkers) and for browsers that add the
    header themselves."""
    router = APIRouter(include_in_schema=False)
    pages = APIRouter(dependencies=OPERATOR if operator else None, include_in_schema=False)

    if operator:

        @pages.get("/openapi.json")
        async def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

    @pages.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    @pages.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    router.include_router(pages)
    return router


def mount_docs_assets(app: FastAPI) -> None:
    """Serve the documentation pages' assets at :data:`DOCS_ASSETS`."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=_ASSETS), name="docs-assets")
