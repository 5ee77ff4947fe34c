"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from ..dependencies import DataPlaneDep
from ..schemas import ErrorResponse, HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="the process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ErrorResponse}},
    summary="every model loaded, layer sensitivity computed, warm-up query answered; the Redis state (if any) "
    "reachable",
)
async def readyz(data_plane: DataPlaneDep) -> ReadyResponse:
    default, *_ = models = await data_plane.ready()
    return ReadyResponse(model=default.model_name, defense=default.defense_name, models=[m.model_name for m in models])
