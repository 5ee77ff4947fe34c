"""The app factory and the uvicorn entry point of ``deepdefense serve``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image

from deepdefense.common import __version__
from deepdefense.defense import Defense

from .access import OPERATOR, docs_router, mount_docs_assets
from .data_plane import DataPlane
from .errors import install_error_handlers
from .limits import BodySizeLimitMiddleware
from .metrics import MAIN, RequestMetricsMiddleware
from .openapi import install_served_openapi
from .protocol import header_deadline_protocol
from .requestid import RequestIdMiddleware
from .routes import admin, health, metrics, models, oip, playground, predict
from .runtime import Runtime, StartupError
from .settings import ServerSettings

logger = logging.getLogger("deepdefense.server")

#: Seconds ``serve`` keeps draining in-flight requests after SIGTERM/SIGINT, beyond the request timeout.
DRAIN_MARGIN_S = 5.0


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: Runtime = app.state.runtime
    await runtime.start()
    try:
        if app.state.wait_until_ready:  # a Ray Serve replica: no request before the model is ready
            await runtime.prepared()
            if runtime.phase == "failed":
                raise StartupError(f"could not prepare {runtime.failure}")
        yield
    finally:
        await runtime.stop()


def create_app(
    settings: ServerSettings | None = None,
    defense: Defense | None = None,
    *,
    replica: str = MAIN,
    wait_until_ready: bool = False,
) -> FastAPI:
    """A FastAPI app serving the checkpoints of ``settings.checkpoint``, the first through ``defense`` when given,
    each other through the defense the settings name (built in the background at start-up; ``/readyz`` tells
    when every model is ready). A checkpoint that fails verification raises ``models.checkpoint.CheckpointError``
    here. ``replica`` names this app in ``/metrics`` (``dd_server_info{replica}``): a Ray Serve replica id under
    ``server/cluster.py``, ``"main"`` for the one-process server. ``wait_until_ready``: the lifespan's
    start-up returns only once every model is ready, and raises :class:`StartupError` when preparing
    failed (a Ray Serve replica, which gets requests as soon as its start-up returns)."""
    settings = settings or ServerSettings()
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # Pillow's own decompression-bomb guard
    runtime = Runtime(settings, defense, replica=replica)
    docs_open = settings.docs_access == "open"
    app = FastAPI(
        title="DeepDefense inference server",
        version=__version__,
        summary="Predictions and attribution maps of a victim model, answered through a defense against "
        "model stealing (DeepDefense, Lee/Han/Lee IJCAI-22).",
        lifespan=_lifespan,
        docs_url=None,  # the pages are the docs router's, with their assets served here (server/access.py)
        redoc_url=None,
        openapi_url="/openapi.json" if docs_open else None,
    )
    app.state.runtime = runtime
    app.state.data_plane = DataPlane(runtime)  # what the routes call (server/data_plane.py)
    app.state.wait_until_ready = wait_until_ready
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.body_limit(), body_timeout=settings.body_timeout_s)
    app.add_middleware(RequestMetricsMiddleware, metrics=runtime.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response, refusals included, carries the id
    for router in (predict.router, oip.router, models.router, health.router):
        app.include_router(router)
    if settings.metrics_access != "off":
        app.include_router(metrics.router, dependencies=OPERATOR if settings.metrics_access == "admin" else None)
    if settings.monitoring():
        app.include_router(admin.router)
    if settings.docs_access != "off":
        app.include_router(docs_router(app, operator=settings.docs_access == "admin"))
        mount_docs_assets(app)
    if settings.playground == "on":
        app.include_router(playground.build_router())
    install_served_openapi(
        app,
        shapes={name: model.input_shape for name, model in runtime.models.items()},
        max_instances=settings.max_instances,
        max_image_bytes=settings.max_image_bytes,
    )
    return app


def uvicorn_config(app: FastAPI, settings: ServerSettings) -> uvicorn.Config:
    """How ``serve`` runs the app: no ``Server`` header; the app's own access log (route templates,
    no query strings) instead of uvicorn's; idle keep-alive connections kept longer than clients
    keep theirs (uvicorn's 5 s equals httpx's, and a client reusing a connection at the moment the
    server closes it gets a transport error); on SIGTERM/SIGINT new connections are refused while
    in-flight requests finish (for at most the request timeout plus a margin); a connection whose request
    headers do not arrive within ``header_timeout_s`` is closed (``server/protocol.py``), and beyond
    ``max_connections`` open connections or requests in progress requests are answered 503. The HTTP parser
    and event loop are named (h11, asyncio): uvicorn would otherwise switch to httptools and uvloop whenever
    they are installed, as ``ray[serve]`` (the ``cluster`` extra) installs them, and the server tested here
    is h11's."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=header_deadline_protocol(settings.header_timeout_s),
        limit_concurrency=settings.max_connections,
        loop="asyncio",
        log_level=settings.log_level,
        server_header=False,
        access_log=False,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.request_timeout_s + DRAIN_MARGIN_S,
    )


def serve(settings: ServerSettings, defense: Defense | None = None) -> None:
    """Run the app under uvicorn until SIGTERM/SIGINT; raise :class:`StartupError` when the model or
    its defense cannot be prepared (the server stops instead of answering 503 for ever)."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the model workers share the cores: each op on one of them runs on its share of torch's threads (an op split
    # over threads that another worker or the event loop keeps busy waits for the slowest one); process workers
    # are given the same share (server/workers.py)
    torch.set_num_threads(max(1, torch.get_num_threads() // settings.model_workers))
    app = create_app(settings, defense)
    server = uvicorn.Server(uvicorn_config(app, settings))
    runtime: Runtime = app.state.runtime

    def stop() -> None:
        server.should_exit = True

    runtime.on_failure = stop
    server.run()
    if runtime.phase == "failed":
        raise StartupError(f"could not prepare {runtime.failure}")
