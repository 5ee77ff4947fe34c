"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from ..dependencies import RuntimeDep
from ..schemas import ErrorResponse, HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="the process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ErrorResponse}},
    summary="model loaded, layer sensitivity computed, warm-up query answered",
)
async def readyz(runtime: RuntimeDep) -> ReadyResponse:
    runtime.ready_batcher()
    return ReadyResponse(model=runtime.model_name, defense=runtime.defense_name)
