"""Prometheus exposition of the app's own registries: the service's series to whoever may read
``/metrics``, and the gate's and the monitor's (misinformed answers, escalated keys, key ids) only to
an operator key, since they would tell a thief which of his answers were misinformed and when his key
was escalated."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..access import bearer
from ..dependencies import RuntimeDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(
    runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Response:
    body = generate_latest(runtime.metrics.registry)
    if credentials is not None and runtime.admin_keys.identify(credentials.credentials) is not None:
        body += generate_latest(runtime.metrics.operator_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
