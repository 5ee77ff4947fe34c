"""The Open Inference Protocol (KServe v2 REST; Triton speaks it too) next to ``POST /predict``.

``POST /v2/models/{name}/infer`` answers through the same path as ``/predict`` (:func:`answer_instances`:
keys, the extraction monitor, budgets, the micro-batcher, timeouts, refunds) with the same limits and the
protocol's error shape (``{"error": "<message>"}``, with the code and the field beside it; ``server/errors.py``).
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

import numpy as np
import torch
from fastapi import APIRouter, Depends, Header, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from common import __version__
from defense import Answer

from ..dependencies import CallerDep, RuntimeDep
from ..errors import ABOVE_ONE, ApiError, body_validation_error
from ..images import inverted
from ..precision import rounded
from ..requestid import request_id_of
from ..runtime import ModelRuntime, Runtime
from ..schemas import (
    ConfigTensor,
    InferInputTensor,
    InferOutputTensor,
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
from ..shapes import reshape_hint
from .predict import answer_instances, before_body

router = APIRouter(tags=["open inference protocol (KServe v2)"])

PLATFORM = "pytorch"
INPUT = "image"
OUTPUTS = ("probabilities", "label", "class_name", "attribution")
#: Triton's type names of the configuration, by the protocol's.
_CONFIG_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}
INFER_PATH = "/v2/models/{model_name}/infer"
#: The request parameter that inverts the images (``/predict``'s ``invert``; ``schemas.INVERT_DESCRIPTION``).
INVERT = "invert"
#: Triton's binary tensor data extension: the JSON's length, binary data after it.
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
_DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
#: Tensor parameters of extensions this server does not have; refused rather than ignored.
_UNSUPPORTED = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification")
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
    return ServerMetadata(name="deepdefense", version=__version__, extensions=EXTENSIONS)


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
async def server_ready(runtime: RuntimeDep) -> ServerReady:
    runtime.check_ready()
    await run_in_threadpool(runtime.check_state)
    return ServerReady()


@router.get("/v2/models/{model_name}", response_model=ModelMetadata, responses=_MODEL_ERRORS)
async def model_metadata(model_name: str, runtime: RuntimeDep, caller: CallerDep) -> ModelMetadata:
    model = _ready_model(runtime, model_name)
    inputs, outputs = _tensors(model)
    return ModelMetadata(
        name=model.model_name,
        versions=[model.model_version],
        platform=PLATFORM,
        inputs=inputs,
        outputs=outputs,
        classes=model.meta.classes,
    )


def _ready_model(runtime: Runtime, model_name: str) -> ModelRuntime:
    """The model the path names (404 ``model_not_found`` naming the served ones), once it is ready (503)."""
    model = runtime.model(model_name, field="model_name")
    model.ready_batcher()
    return model


@router.get("/v2/models/{model_name}/config", response_model=ModelConfig, responses=_MODEL_ERRORS)
async def model_config(model_name: str, runtime: RuntimeDep, caller: CallerDep) -> ModelConfig:
    """Triton's model configuration (``tritonclient``'s ``get_model_config``): the tensors without the batch
    dimension, and the most instances a request may carry."""
    model = _ready_model(runtime, model_name)
    inputs, outputs = _tensors(model)

    def config(tensors: list[TensorMetadata]) -> list[ConfigTensor]:
        return [
            ConfigTensor(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.shape[1:] or [1]) for t in tensors
        ]

    return ModelConfig(
        name=model.model_name,
        platform=PLATFORM,
        max_batch_size=runtime.settings.max_instances,
        input=config(inputs),
        output=config(outputs),
    )


def _tensors(model: ModelRuntime) -> tuple[list[TensorMetadata], list[TensorMetadata]]:
    """The model's input and outputs, the batch dimension first (-1)."""
    c, h, w = model.input_shape
    outputs = [
        TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, model.meta.num_classes]),
        TensorMetadata(name="label", datatype="INT64", shape=[-1]),
        TensorMetadata(name="class_name", datatype="BYTES", shape=[-1]),
        TensorMetadata(name="attribution", datatype="FP32", shape=[-1, h, w]),
    ]
    return [TensorMetadata(name=INPUT, datatype="FP32", shape=[-1, c, h, w])], outputs


@router.get("/v2/models/{model_name}/ready", response_model=ModelReady, responses=_MODEL_ERRORS)
async def model_ready(model_name: str, runtime: RuntimeDep, caller: CallerDep) -> ModelReady:
    return ModelReady(name=_ready_model(runtime, model_name).model_name)


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
    runtime: RuntimeDep,
    request: Request,
    inference_header_content_length: Annotated[
        int | None, Header(ge=0, description="binary data: the length of the JSON, the binary data follow it")
    ] = None,
) -> InferResponse:
    """Probabilities, labels and (when asked for) attribution maps of a batch of images, from the defense of the
    model the path names."""
    model = _ready_model(runtime, model_name)
    await before_body(runtime, caller, model)  # the key's escalation and budget, before its body is read
    body = await request.body()
    infer_request, binary = await run_in_threadpool(_parse, body, inference_header_content_length)
    wanted = _wanted_outputs(infer_request)
    invert = _invert(infer_request)
    x = await run_in_threadpool(
        _to_batch, _image_input(infer_request), binary, model.input_shape, runtime.settings.max_instances
    )
    if invert:
        x = inverted(x)
    method, classes = model.interpreter_name, model.meta.classes
    return await answer_instances(
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
            outputs=[_output(name, answers, method, classes) for name in wanted],
        ),
    )


def _parse(body: bytes, header_length: int | None) -> tuple[InferRequest, bytes]:
    """The request's JSON (400/422 as for any body) and the binary data after it."""
    if header_length is None:
        head, binary = body, b""
    elif header_length > len(body):
        raise ApiError(
            400,
            "invalid_header",
            f"the body has only {len(body)} bytes, fewer than {HEADER_LENGTH}",
            field=HEADER_LENGTH,
        )
    else:
        head, binary = body[:header_length], body[header_length:]
    try:
        return InferRequest.model_validate_json(head), binary
    except ValidationError as err:
        raise body_validation_error(err) from None


def _unsupported(parameters: dict[str, Any] | None, field: str) -> None:
    for name in _UNSUPPORTED:
        if parameters is not None and name in parameters:
            raise ApiError(400, "unsupported_parameter", f"this server does not support {name!r}", field=field)


def _wanted_outputs(infer_request: InferRequest) -> list[str]:
    """The outputs to return, in the order asked (all of them when none are listed)."""
    if not infer_request.outputs:
        return list(OUTPUTS)
    wanted: list[str] = []
    for i, output in enumerate(infer_request.outputs):
        if output.name not in OUTPUTS:
            raise ApiError(400, "unknown_output", f"the outputs are {', '.join(OUTPUTS)}", field=f"outputs[{i}].name")
        if output.name in wanted:
            raise ApiError(400, "duplicate_output", "each output may be asked for once", field=f"outputs[{i}].name")
        _unsupported(output.parameters, f"outputs[{i}].parameters")
        wanted.append(output.name)
    return wanted


def _invert(infer_request: InferRequest) -> bool:
    """The request's ``parameters.invert`` (``/predict``'s ``invert``): a boolean, false when absent."""
    value = (infer_request.parameters or {}).get(INVERT, False)
    if type(value) is not bool:
        raise ApiError(422, "invalid_type", "invert must be true or false", field=f"parameters.{INVERT}")
    return value


def _image_input(infer_request: InferRequest) -> InferInputTensor:
    for i, tensor in enumerate(infer_request.inputs):
        if tensor.name != INPUT:
            raise ApiError(400, "unknown_input", f"the model has one input, {INPUT!r}", field=f"inputs[{i}].name")
    if len(infer_request.inputs) > 1:
        raise ApiError(400, "duplicate_input", f"give the input {INPUT!r} once", field="inputs[1].name")
    (tensor,) = infer_request.inputs
    _unsupported(tensor.parameters, "inputs[0].parameters")
    return tensor


def _to_batch(tensor: InferInputTensor, binary: bytes, shape: tuple[int, int, int], limit: int) -> Tensor:
    """The (B, C, H, W) float32 batch of the ``image`` input: its shape must be [B, C, H, W] with 1 ≤ B ≤
    ``limit`` (413 above), its elements as many as the shape says, finite and in [0, 1]."""
    field = "inputs[0]"
    dims = tensor.shape
    if len(dims) != 4 or tuple(dims[1:]) != shape:
        if len(dims) > 4 or max(dims, default=0) >= 10**9:
            message = f"expected shape [B, {', '.join(map(str, shape))}], got a shape of {len(dims)} dimensions"
        else:
            message = reshape_hint(list(dims), shape, batch=True)
        raise ApiError(422, "invalid_shape", message, field=f"{field}.shape")
    if dims[0] == 0:
        raise ApiError(422, "empty", "the batch has no instances", field=f"{field}.shape")
    if dims[0] > limit:
        raise ApiError(
            413, "too_many_instances", f"at most {limit} instances per request, got {dims[0]}", field=f"{field}.shape"
        )
    count = int(np.prod(dims))
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if binary:
            raise ApiError(
                400,
                "invalid_binary_data",
                f"{len(binary)} bytes follow the JSON, but no input has parameters.binary_data_size",
                field="body",
            )
        if tensor.data is None:
            raise ApiError(422, "missing_field", "give the data in 'data' or as binary data", field=f"{field}.data")
        if len(tensor.data) != count:
            raise ApiError(
                422,
                "invalid_shape",
                f"shape {dims} has {count} elements, data has {len(tensor.data)}",
                field=f"{field}.data",
            )
        x = torch.tensor(tensor.data, dtype=torch.float32)  # as /predict converts pixels
    else:
        param = f"{field}.parameters.binary_data_size"
        if type(size) is not int or size < 0:
            raise ApiError(422, "invalid_value", "binary_data_size must be a byte count", field=param)
        if tensor.data is not None:
            raise ApiError(422, "invalid_value", "give the data in 'data' or as binary data, not both", field=param)
        if size != len(binary):
            raise ApiError(
                400,
                "invalid_binary_data",
                f"binary_data_size is {size}, but {len(binary)} bytes follow the JSON",
                field=param,
            )
        dtype = _DTYPES[tensor.datatype]
        if size != count * dtype.itemsize:
            raise ApiError(
                422,
                "invalid_shape",
                f"shape {dims} of {tensor.datatype} takes {count * dtype.itemsize} bytes, got {size}",
                field=param,
            )
        values = np.frombuffer(binary, dtype=dtype)
        _check_values(values, f"{field}.data")
        x = torch.from_numpy(values.astype(np.float32))  # a copy, writable
    return x.reshape(dims)


def _check_values(values: np.ndarray, field: str) -> None:
    """The rules of ``pixels`` for binary data: finite and in [0, 1]; 422 names the first bad element."""
    bad = ~(np.isfinite(values) & (values >= 0) & (values <= 1))
    if not bad.any():
        return
    i = int(np.argmax(bad))
    if not np.isfinite(values[i]):
        code, message = "not_finite", "Input should be a finite number"
    elif values[i] < 0:
        code, message = "out_of_range", "Input should be greater than or equal to 0"
    else:
        code, message = "out_of_range", ABOVE_ONE
    raise ApiError(422, code, message, field=f"{field}[{i}]")


def _output(name: str, answers: list[Answer], method: str, classes: list[str]) -> InferOutputTensor:
    if name == "label":
        return InferOutputTensor(
            name=name, datatype="INT64", shape=[len(answers)], data=[int(a.label) for a in answers]
        )
    if name == "class_name":
        return InferOutputTensor(
            name=name, datatype="BYTES", shape=[len(answers)], data=[classes[int(a.label)] for a in answers]
        )
    if name == "probabilities":
        values = torch.stack([a.probabilities.detach().cpu() for a in answers])
        parameters = None
    else:
        maps = [a.attribution for a in answers]
        if any(m is None for m in maps):
            raise RuntimeError("an answer has no attribution map although one was asked for")
        values = torch.stack([m.detach().cpu() for m in maps])  # type: ignore[union-attr]
        parameters = {"method": method}
    return InferOutputTensor(
        name=name,
        datatype="FP32",
        shape=list(values.shape),
        parameters=parameters,
        data=rounded(values),
    )
