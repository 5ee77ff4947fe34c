"""``POST /predict``: validated instances in, the defense's answers out."""

from __future__ import annotations

import json
from functools import partial

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from deepdefense.defense import Answer

from ..dependencies import CallerDep, DataPlaneDep
from ..errors import body_validation_error
from ..images import instances_to_tensor
from ..limits import require_json
from ..precision import rounded
from ..schemas import Attribution, ErrorResponse, Prediction, PredictRequest, PredictResponse

router = APIRouter(tags=["predict"])

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 413, 415, 422, 429, 500, 503, 504)}

_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
}


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(require_json)],
    responses=_ERRORS,
    openapi_extra={"requestBody": _REQUEST_BODY},
)  # type: ignore[arg-type]
async def predict(caller: CallerDep, data_plane: DataPlaneDep, request: Request) -> PredictResponse:
    """Labels, probabilities and (with ``explain``) attribution maps, all from the defense of the model the body
    names (the default, the first served, when it names none)."""
    await data_plane.before_body(caller)  # 503 while nothing is ready, an escalated key, a spent budget
    body = await run_in_threadpool(_parse, await request.body())
    model = data_plane.ready_model(body.model, field="model")  # 503 before the instances are looked at
    data_plane.check_instances(len(body.instances), field="instances")
    await data_plane.check_budget(model, caller, len(body.instances))  # before any image is decoded
    x = await run_in_threadpool(
        partial(instances_to_tensor, invert=body.invert), body.instances, model.input_shape, model.image_limits
    )
    method, classes = model.interpreter_name, model.meta.classes
    return await data_plane.answer(
        model,
        caller,
        x,
        explain=body.explain,
        request=request,
        respond=lambda answers: PredictResponse(
            model=model.model_name,
            model_version=model.model_version,
            defense=model.defense_name,
            predictions=[_prediction(a, method, classes, body.explain) for a in answers],
        ),
    )


def _parse(body: bytes) -> PredictRequest:
    """The request body, validated off the event loop; the errors FastAPI would give for a declared body."""
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "ctx": {"error": err.msg}}]
        ) from None
    except (ValueError, RecursionError):  # not UTF-8, or nested deeper than the parser goes
        raise HTTPException(400, "There was an error parsing the body") from None
    try:
        return PredictRequest.model_validate(data)
    except ValidationError as err:
        raise body_validation_error(err) from None


def _prediction(answer: Answer, method: str, classes: list[str], explain: bool) -> Prediction:
    attribution = None
    if explain and answer.attribution is not None:
        h, w = answer.attribution.shape
        flat = rounded(answer.attribution)
        rows = [flat[i * w : (i + 1) * w] for i in range(h)]
        attribution = Attribution(method=method, shape=[h, w], values=rows)
    label = int(answer.label)
    return Prediction(
        label=label,
        class_name=classes[label],
        probabilities=rounded(answer.probabilities),
        attribution=attribution,
    )
