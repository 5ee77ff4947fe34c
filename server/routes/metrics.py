"""Prometheus exposition of the app's own registries: the service's series to whoever may read
``/metrics``, and the gate's and the monitor's (misinformed answers, escalated keys, key ids) only to
an operator key, since they would tell a thief which of his answers were misinformed and when his key
was escalated. The operator key is optional here (``Authorization: Bearer <operator key>``), so the route
declares no security requirement; ``metrics_access admin`` makes it required (``server/app.py``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..dependencies import RuntimeDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(runtime: RuntimeDep, request: Request) -> Response:
    body = generate_latest(runtime.metrics.registry)
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and runtime.admin_keys.identify(credentials.strip()) is not None:
        body += generate_latest(runtime.metrics.operator_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
