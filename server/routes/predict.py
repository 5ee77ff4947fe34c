"""``POST /predict``: validated instances in, the defense's answers out."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from defense import Answer

from ..auth import Caller
from ..batcher import QueueFull, RequestTimeout
from ..dependencies import CallerDep, RuntimeDep
from ..errors import ApiError
from ..images import instances_to_tensor
from ..limits import require_json
from ..runtime import Runtime
from ..schemas import Attribution, ErrorResponse, Prediction, PredictRequest, PredictResponse

router = APIRouter(tags=["predict"])

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 415, 422, 429, 503, 504)}


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
             dependencies=[Depends(require_json)], responses=_ERRORS)  # type: ignore[arg-type]
async def predict(body: PredictRequest, caller: CallerDep, runtime: RuntimeDep) -> PredictResponse:
    """Labels, probabilities and (with ``explain``) attribution maps, all from the defense."""
    batcher = runtime.ready_batcher()
    limit = runtime.settings.max_instances
    if len(body.instances) > limit:
        raise ApiError(413, "too_many_instances", f"at most {limit} instances per request, got {len(body.instances)}",
                       field="instances")
    x = await run_in_threadpool(instances_to_tensor, body.instances, runtime.input_shape, runtime.image_limits)
    await run_in_threadpool(_spend, runtime, caller, len(x))
    try:
        answers = await batcher.submit(x, explain=body.explain)
    except QueueFull:
        if runtime.ledger is not None:
            await run_in_threadpool(runtime.ledger.refund, caller.key_id, len(x))
        raise ApiError(503, "queue_full", "the server is busy; retry later",
                       headers={"Retry-After": str(runtime.settings.retry_after_s)}) from None
    except RequestTimeout:
        raise ApiError(504, "timeout", f"not answered within {runtime.settings.request_timeout_s:g} s") from None
    method = runtime.interpreter_name
    return PredictResponse(model=runtime.model_name, defense=runtime.defense_name,
                           predictions=[_prediction(a, method) for a in answers])


def _spend(runtime: Runtime, caller: Caller, queries: int) -> None:
    """Count the caller's queries and spend them from its budget (429 when it does not cover them)."""
    if runtime.ledger is not None and runtime.ledger.spend(caller.key_id, queries) is None:
        left = runtime.ledger.remaining(caller.key_id)
        raise ApiError(429, "budget_exhausted", f"the query budget of this key is spent ({left} left, {queries} asked)",
                       field="Authorization")
    runtime.metrics.key_queries.labels(caller.key_id).inc(queries)


def _prediction(answer: Answer, method: str) -> Prediction:
    attribution = None
    if answer.attribution is not None:
        values = answer.attribution.detach().cpu()
        attribution = Attribution(method=method, shape=list(values.shape), values=values.tolist())
    return Prediction(label=answer.label, probabilities=answer.probabilities.detach().cpu().tolist(),
                      attribution=attribution)
