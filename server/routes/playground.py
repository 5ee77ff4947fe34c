"""The playground (``GET /``): a page to draw a digit or drop an image and see the label, the probabilities and
the attribution map, served from files in ``server/playground/`` (package data; nothing is fetched from
elsewhere). The page calls ``/v1/models`` (a picker lists the served models when there are several) and ``/predict``
(with the picked model's name) as any client does, with the API key a user types in;
it holds no secret itself and is open. ``--playground off`` (``DD_PLAYGROUND=off``) leaves these routes out:
``GET /`` is then 404 ``not_found`` like any unknown route."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from ..errors import ApiError

#: The page's own files and their media types; nothing else is served from the folder.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
#: The page runs only its own script and style and talks only to this server.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def asset(name: str) -> bytes:
    """One of the page's files, read from the installed package."""
    return resources.files("deepdefense.server").joinpath("playground", name).read_bytes()


def build_router() -> APIRouter:
    """The playground's routes, with its files read once (a missing one stops the app from being built)."""
    files = {name: asset(name) for name in ASSETS}
    router = APIRouter(tags=["playground"])

    def respond(name: str) -> Response:
        return Response(files[name], media_type=ASSETS[name], headers=HEADERS)

    @router.get("/", include_in_schema=False)
    async def page() -> Response:
        return respond("index.html")

    @router.get("/playground/{name}", include_in_schema=False)
    async def playground_file(name: str) -> Response:
        if name not in files or name == "index.html":
            raise ApiError(404, "not_found", "Not Found")
        return respond(name)

    return router
