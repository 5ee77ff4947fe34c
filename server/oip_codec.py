"""The Open Inference Protocol's tensors (KServe v2; Triton speaks it too), decoded and encoded.

A request's body is JSON, or JSON followed by little-endian binary data (Triton's binary tensor data
extension, with ``Inference-Header-Content-Length``); its one input, ``image`` (FP32 or FP64, [B, C, H, W]),
becomes the (B, C, H, W) float32 batch the data plane answers, its values checked by the same rule as
``/predict``'s pixels (``schemas.Pixel``: finite, in [0, 1]) whether they came as JSON or as binary. The
answers become the outputs ``probabilities`` (FP32 [B, K]), ``label`` (INT64 [B]), ``class_name`` (BYTES [B])
and ``attribution`` (FP32 [B, H, W]), always as JSON. Every mistake is an :class:`ApiError` naming its field.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError
from torch import Tensor

from deepdefense.defense import Answer

from .errors import ApiError, body_validation_error
from .precision import rounded
from .schemas import InferInputTensor, InferOutputTensor, InferRequest, TensorData, TensorMetadata
from .shapes import reshape_hint

INPUT = "image"
OUTPUTS = ("probabilities", "label", "class_name", "attribution")
#: The request parameter that inverts the images (``/predict``'s ``invert``; ``schemas.INVERT_DESCRIPTION``).
INVERT = "invert"
#: Triton's binary tensor data extension: the JSON's length, binary data after it.
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
#: Where the image input's shape and data are in the body (error fields).
FIELD = "inputs[0]"
_DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
#: Tensor parameters of extensions this server does not have; refused rather than ignored.
_UNSUPPORTED = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification")
#: The rule of a tensor's elements (JSON ``data`` is validated by it as the body is), for binary data.
_ELEMENTS: TypeAdapter[list[float]] = TypeAdapter(TensorData)


# -- decoding ------------------------------------------------------------------------------------------------------


def split_body(body: bytes, header_length: int | None) -> tuple[InferRequest, bytes]:
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


def wanted_outputs(infer_request: InferRequest) -> list[str]:
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


def invert_option(infer_request: InferRequest) -> bool:
    """The request's ``parameters.invert`` (``/predict``'s ``invert``): a boolean, false when absent."""
    value = (infer_request.parameters or {}).get(INVERT, False)
    if type(value) is not bool:
        raise ApiError(422, "invalid_type", "invert must be true or false", field=f"parameters.{INVERT}")
    return value


def image_input(infer_request: InferRequest) -> InferInputTensor:
    """The request's one input, ``image``."""
    for i, tensor in enumerate(infer_request.inputs):
        if tensor.name != INPUT:
            raise ApiError(400, "unknown_input", f"the model has one input, {INPUT!r}", field=f"inputs[{i}].name")
    if len(infer_request.inputs) > 1:
        raise ApiError(400, "duplicate_input", f"give the input {INPUT!r} once", field="inputs[1].name")
    (tensor,) = infer_request.inputs
    _unsupported(tensor.parameters, f"{FIELD}.parameters")
    return tensor


def batch_size(tensor: InferInputTensor, shape: tuple[int, int, int]) -> int:
    """B of the ``image`` input, once its shape is [B, C, H, W] with (C, H, W) = ``shape`` and B ≥ 1 (422);
    the data plane checks B against the instance limit before :func:`decode_batch` reads the data."""
    dims = tensor.shape
    if len(dims) != 4 or tuple(dims[1:]) != shape:
        if len(dims) > 4 or max(dims, default=0) >= 10**9:
            message = f"expected shape [B, {', '.join(map(str, shape))}], got a shape of {len(dims)} dimensions"
        else:
            message = reshape_hint(list(dims), shape, batch=True)
        raise ApiError(422, "invalid_shape", message, field=f"{FIELD}.shape")
    if dims[0] == 0:
        raise ApiError(422, "empty", "the batch has no instances", field=f"{FIELD}.shape")
    return dims[0]


def decode_batch(tensor: InferInputTensor, binary: bytes) -> Tensor:
    """The (B, C, H, W) float32 batch of the ``image`` input (its shape checked by :func:`batch_size`): its
    elements as many as the shape says, from ``data`` or from the binary data, finite and in [0, 1]."""
    dims = tensor.shape
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
            raise ApiError(422, "missing_field", "give the data in 'data' or as binary data", field=f"{FIELD}.data")
        if len(tensor.data) != count:
            raise ApiError(
                422,
                "invalid_shape",
                f"shape {dims} has {count} elements, data has {len(tensor.data)}",
                field=f"{FIELD}.data",
            )
        x = torch.tensor(tensor.data, dtype=torch.float32)  # as /predict converts pixels
    else:
        param = f"{FIELD}.parameters.binary_data_size"
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
        try:
            _ELEMENTS.validate_python(values.tolist())
        except ValidationError as err:  # located as a bad element of JSON data is: inputs[0].data[i]
            raise body_validation_error(err, "inputs", 0, "data") from None
        x = torch.from_numpy(values.astype(np.float32))  # a copy, writable
    return x.reshape(dims)


# -- encoding ------------------------------------------------------------------------------------------------------


def tensor_metadata(shape: tuple[int, int, int], num_classes: int) -> tuple[list[TensorMetadata], list[TensorMetadata]]:
    """The model's input and outputs, the batch dimension first (-1)."""
    c, h, w = shape
    outputs = [
        TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, num_classes]),
        TensorMetadata(name="label", datatype="INT64", shape=[-1]),
        TensorMetadata(name="class_name", datatype="BYTES", shape=[-1]),
        TensorMetadata(name="attribution", datatype="FP32", shape=[-1, h, w]),
    ]
    return [TensorMetadata(name=INPUT, datatype="FP32", shape=[-1, c, h, w])], outputs


def encode_output(name: str, answers: list[Answer], method: str, classes: list[str]) -> InferOutputTensor:
    """The output ``name`` of the answers (``method``: the interpreter of the maps; ``classes``: the names)."""
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
