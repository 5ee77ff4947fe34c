"""Operator routes of the extraction monitor: which keys are escalated, and clearing one.

Routed only with ``monitor on``, and always behind an operator key (``DD_ADMIN_KEYS``)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ..access import OPERATOR
from ..dependencies import DataPlaneDep
from ..schemas import ErrorResponse, FlaggedKey, FlaggedKeysResponse

router = APIRouter(
    tags=["admin"], dependencies=OPERATOR, responses={status: {"model": ErrorResponse} for status in (401, 503)}
)


@router.get("/v1/admin/flags", response_model=FlaggedKeysResponse)
async def list_flags(data_plane: DataPlaneDep) -> FlaggedKeysResponse:
    """The keys the extraction monitor has escalated, oldest first."""
    keys = await data_plane.flagged_keys()
    return FlaggedKeysResponse(keys=[FlaggedKey.model_validate(k) for k in keys])


@router.delete("/v1/admin/flags/{key_id}", status_code=204, responses={404: {"model": ErrorResponse}})
async def clear_flag(key_id: str, data_plane: DataPlaneDep) -> Response:
    """Clear a key's escalation and its window: it is answered as any other key again."""
    await data_plane.clear_flag(key_id)
    return Response(status_code=204)
