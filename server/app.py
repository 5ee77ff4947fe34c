"""The app factory and the uvicorn entry point of ``deepdefense serve``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from PIL import Image

from deepdefense import __version__
from defense import Defense

from .errors import install_error_handlers
from .limits import BodySizeLimitMiddleware
from .metrics import RequestMetricsMiddleware
from .routes import health, metrics, models, predict
from .runtime import Runtime
from .settings import ServerSettings


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: Runtime = app.state.runtime
    await runtime.start()
    try:
        yield
    finally:
        await runtime.stop()


def create_app(settings: ServerSettings | None = None, defense: Defense | None = None) -> FastAPI:
    """A FastAPI app serving ``settings.checkpoint`` through ``defense``, or through the defense the
    settings name (built in the background at start-up; ``/readyz`` tells when it is done)."""
    settings = settings or ServerSettings()
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # Pillow's own decompression-bomb guard
    runtime = Runtime(settings, defense)
    app = FastAPI(
        title="DeepDefense inference server",
        version=__version__,
        summary="Predictions and attribution maps of a victim model, answered through a defense against "
                "model stealing (DeepDefense, Lee/Han/Lee IJCAI-22).",
        lifespan=_lifespan,
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=runtime.metrics)
    for router in (predict.router, models.router, health.router, metrics.router):
        app.include_router(router)
    return app


def serve(settings: ServerSettings) -> None:
    """Run the app under uvicorn until interrupted."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
