"""Operator routes of the extraction monitor: which keys are escalated, and clearing one.

Routed only with ``monitor on``, and always behind an operator key (``DD_ADMIN_KEYS``)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from ..access import OPERATOR
from ..dependencies import RuntimeDep
from ..errors import ApiError
from ..monitor import ExtractionMonitor
from ..runtime import Runtime
from ..schemas import ErrorResponse, FlaggedKey, FlaggedKeysResponse
from ..state import state_reachable

router = APIRouter(
    tags=["admin"], dependencies=OPERATOR, responses={status: {"model": ErrorResponse} for status in (401, 503)}
)


def _monitor(runtime: Runtime) -> ExtractionMonitor:
    assert runtime.monitor is not None  # the router is included only with the monitor on
    return runtime.monitor


@router.get("/v1/admin/flags", response_model=FlaggedKeysResponse)
async def list_flags(runtime: RuntimeDep) -> FlaggedKeysResponse:
    """The keys the extraction monitor has escalated, oldest first."""
    with state_reachable(runtime.settings.retry_after_s):
        keys = await run_in_threadpool(_monitor(runtime).flagged_keys)
    return FlaggedKeysResponse(keys=[FlaggedKey.model_validate(k) for k in keys])


@router.delete("/v1/admin/flags/{key_id}", status_code=204, responses={404: {"model": ErrorResponse}})
async def clear_flag(key_id: str, runtime: RuntimeDep) -> Response:
    """Clear a key's escalation and its window: it is answered as any other key again."""
    monitor = _monitor(runtime)
    with state_reachable(runtime.settings.retry_after_s):
        if not await run_in_threadpool(monitor.clear, key_id):
            raise ApiError(404, "not_flagged", "no escalated key has this id", field="key_id")
        runtime.metrics.flagged_keys.set(await run_in_threadpool(monitor.count_flagged))
    return Response(status_code=204)
