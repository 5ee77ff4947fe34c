"""The Open Inference Protocol (KServe v2 REST; Triton speaks it too) next to ``POST /predict``.

``POST /v2/models/{name}/infer`` answers through the same data plane as ``/predict`` (``server/data_plane.py``:
keys, the extraction monitor, budgets, the micro-batcher, timeouts, refunds) with the same limits and the
protocol's error shape (``{"error": "<message>"}``, with the code and the field beside it; ``server/errors.py``);
its tensors are decoded and encoded by ``server/oip_codec.py``.
The model has one input, ``image`` (FP32 or FP64, [B, C, H, W], values in [0, 1]), and four outputs:
``probabilities`` (FP32 [B, K]), ``label`` (INT64 [B]), ``class_name`` (BYTES [B], the label's name) and
``attribution`` (FP32 [B, H, W], computed only when asked for or when no outputs are listed). Its version is
the first 12 hex digits of the weights' sha256; ``GET /v2/models/{name}/config`` answers Triton's model
configuration (what ``tritonclient``'s ``get_model_config`` reads). The data come as JSON (flat in row-major
order, or nested) or, with ``Inference-Header-Content-Length``, as little-endian binary after the JSON
(Triton's binary tensor data extension, what ``tritonclient`` sends by default); outputs always come as
JSON. The request's ``parameters.invert`` (a boolean, as ``/predict``'s ``invert``) turns every value v of
the images into 1 − v before the model sees them.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from deepdefense.common import __version__

from .. import oip_codec as codec
from ..dependencies import CallerDep, DataPlaneDep
from ..errors import ApiError
from ..images import inverted
from ..requestid import request_id_of
from ..schemas import (
    ConfigTensor,
    InferRequest,
    InferResponse,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    ProtocolErrorResponse,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
)

router = APIRouter(tags=["open inference protocol (KServe v2)"])

PLATFORM = "pytorch"
#: Triton's type names of the configuration, by the protocol's.
_CONFIG_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}
INFER_PATH = "/v2/models/{model_name}/infer"
#: Content types of an infer body: JSON; none (``tritonclient.http`` sends none) or octet-stream
#: (``tritonclient.http.aio``), also for binary data.
_CONTENT_TYPES = ("", "application/json", "application/octet-stream")

#: 422 never comes from a model route (its one parameter is any string), but FastAPI would document
#: its own validation error body for it otherwise.
_MODEL_ERRORS = {status: {"model": ProtocolErrorResponse} for status in (401, 404, 422, 503)}
_INFER_ERRORS = {
    status: {"model": ProtocolErrorResponse} for status in (400, 401, 403, 404, 413, 415, 422, 429, 500, 503, 504)
}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` substituted for their ``$ref``s (the request body is declared by hand,
    outside the OpenAPI components; the models do not refer to themselves)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {"schema": _inline(InferRequest.model_json_schema())}},
}


def require_infer_body(request: Request) -> None:
    """Dependency: an infer body is JSON, declared as such, as octet-stream, or not declared."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() not in _CONTENT_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the body as application/json (or application/octet-stream with binary data)",
            field="Content-Type",
        )


# -- server and model metadata, health ---------------------------------------------------------------------------


@router.get("/v2", response_model=ServerMetadata, responses={401: {"model": ProtocolErrorResponse}})
async def server_metadata(caller: CallerDep) -> ServerMetadata:
    return ServerMetadata(name="deepdefense", version=__version__, extensions=codec.EXTENSIONS)


@router.get("/v2/health/live", response_model=ServerLive, summary="the process is alive")
async def server_live() -> ServerLive:
    return ServerLive()


@router.get(
    "/v2/health/ready",
    response_model=ServerReady,
    responses={503: {"model": ProtocolErrorResponse}},
    summary="every model loaded, layer sensitivity computed, warm-up query answered; the Redis state (if any) "
    "reachable",
)
async def server_ready(data_plane: DataPlaneDep) -> ServerReady:
    await data_plane.ready()
    return ServerReady()


@router.get("/v2/models/{model_name}", response_model=ModelMetadata, responses=_MODEL_ERRORS)
async def model_metadata(model_name: str, data_plane: DataPlaneDep, caller: CallerDep) -> ModelMetadata:
    model = data_plane.ready_model(model_name, field="model_name")
    inputs, outputs = codec.tensor_metadata(model.input_shape, model.meta.num_classes)
    return ModelMetadata(
        name=model.model_name,
        versions=[model.model_version],
        platform=PLATFORM,
        inputs=inputs,
        outputs=outputs,
        classes=model.meta.classes,
    )


@router.get("/v2/models/{model_name}/config", response_model=ModelConfig, responses=_MODEL_ERRORS)
async def model_config(model_name: str, data_plane: DataPlaneDep, caller: CallerDep) -> ModelConfig:
    """Triton's model configuration (``tritonclient``'s ``get_model_config``): the tensors without the batch
    dimension, and the most instances a request may carry."""
    model = data_plane.ready_model(model_name, field="model_name")
    inputs, outputs = codec.tensor_metadata(model.input_shape, model.meta.num_classes)

    def config(tensors: list[TensorMetadata]) -> list[ConfigTensor]:
        return [
            ConfigTensor(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.shape[1:] or [1]) for t in tensors
        ]

    return ModelConfig(
        name=model.model_name,
        platform=PLATFORM,
        max_batch_size=model.settings.max_instances,
        input=config(inputs),
        output=config(outputs),
    )


@router.get("/v2/models/{model_name}/ready", response_model=ModelReady, responses=_MODEL_ERRORS)
async def model_ready(model_name: str, data_plane: DataPlaneDep, caller: CallerDep) -> ModelReady:
    return ModelReady(name=data_plane.ready_model(model_name, field="model_name").model_name)


# -- inference ---------------------------------------------------------------------------------------------------


@router.post(
    INFER_PATH,
    response_model=InferResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(require_infer_body)],
    responses=_INFER_ERRORS,
    openapi_extra={"requestBody": _REQUEST_BODY},
)  # type: ignore[arg-type]
async def infer(
    model_name: str,
    caller: CallerDep,
    data_plane: DataPlaneDep,
    request: Request,
    inference_header_content_length: Annotated[
        int | None, Header(ge=0, description="binary data: the length of the JSON, the binary data follow it")
    ] = None,
) -> InferResponse:
    """Probabilities, labels and (when asked for) attribution maps of a batch of images, from the defense of the
    model the path names."""
    model = data_plane.ready_model(model_name, field="model_name")
    await data_plane.before_body(caller, model)  # the key's escalation and budget, before its body is read
    body = await request.body()
    infer_request, binary = await run_in_threadpool(codec.split_body, body, inference_header_content_length)
    wanted = codec.wanted_outputs(infer_request)
    invert = codec.invert_option(infer_request)
    tensor = codec.image_input(infer_request)
    data_plane.check_instances(codec.batch_size(tensor, model.input_shape), field=f"{codec.FIELD}.shape")
    x = await run_in_threadpool(codec.decode_batch, tensor, binary)
    if invert:
        x = inverted(x)
    method, classes = model.interpreter_name, model.meta.classes
    return await data_plane.answer(
        model,
        caller,
        x,
        explain="attribution" in wanted,
        request=request,
        respond=lambda answers: InferResponse(
            model_name=model.model_name,
            model_version=model.model_version,
            id=infer_request.id if infer_request.id is not None else request_id_of(request),
            parameters={"defense": model.defense_name},
            outputs=[codec.encode_output(name, answers, method, classes) for name in wanted],
        ),
    )
