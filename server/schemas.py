"""Request and response bodies of the HTTP API; the field names are a public contract."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

#: One pixel value: a finite number in [0, 1]; lists stop at their first bad element.
Pixel = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=1.0)]
Row = Annotated[list[Pixel], Field(fail_fast=True)]
Plane = Annotated[list[Row], Field(fail_fast=True)]
#: The error type of ``pixels`` nested other than three lists deep; its ``ctx["shape"]`` is the shape sent, which
#: ``server/errors.py`` turns into a message saying how to reshape it (``server/shapes.py``).
PIXELS_SHAPE = "pixels_shape"


def _nested_three_deep(value: Any) -> Any:
    """``pixels`` as sent, once its nesting (followed along first elements) is three lists deep (C×H×W)."""
    shape: list[int] = []
    item = value
    while isinstance(item, list) and len(shape) < 8:
        shape.append(len(item))
        item = item[0] if item else None
    if shape and len(shape) != 3 and isinstance(item, int | float):  # other mistakes: the list validators' errors
        raise PydanticCustomError(PIXELS_SHAPE, "pixels must be C×H×W, nested three lists deep", {"shape": shape})
    return value


Pixels = Annotated[list[Plane], Field(fail_fast=True), BeforeValidator(_nested_three_deep)]


#: What the ``invert`` request option does (``/predict``'s ``invert``, the Open Inference Protocol's
#: ``parameters.invert``); the model card and the OpenAPI schema say the same.
INVERT_DESCRIPTION = (
    "true: every instance's values v (pixels, or an image once decoded, converted and resized) become 1 − v before "
    "the model sees them, so dark strokes on a light background (ink on paper) reach a model that expects light "
    "strokes on a dark background as it expects them; false (the default): values are used as sent. The server "
    "never inverts on its own."
)


VERSION_DESCRIPTION = (
    "the served weights' version: 12 hex digits derived from their sha256 (the checkpoint's metadata), new whenever "
    "the weights change; not the weights file's own digest, which no answer carries"
)


class Instance(BaseModel):
    """One query: a C×H×W array of floats in [0, 1] at the model's input size, or a PNG/JPEG image."""

    model_config = ConfigDict(extra="forbid")

    pixels: Pixels | None = Field(None, description="C×H×W floats in [0, 1] at the model's input size")
    image_b64: StrictStr | None = Field(None, description="base64 of a PNG or JPEG image")

    @model_validator(mode="after")
    def _exactly_one(self) -> Instance:
        if (self.pixels is None) == (self.image_b64 is None):
            raise ValueError("give exactly one of 'pixels' and 'image_b64'")
        return self


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"instances": [{"pixels": [[[0.0, 0.5], [1.0, 0.25]]]}], "explain": True}]},
    )

    instances: list[Instance] = Field(min_length=1, description="queries, up to the server's maximum")
    model: StrictStr | None = Field(
        None, description="the served model to ask, by name (GET /v1/models lists them); absent: the first"
    )
    explain: StrictBool = Field(True, description="also return an attribution map per instance")
    invert: StrictBool = Field(False, description=INVERT_DESCRIPTION)


class Attribution(BaseModel):
    method: str = Field(description="the interpreter that produced the map")
    shape: list[int] = Field(description="[h, w]")
    values: list[list[float]]


class Prediction(BaseModel):
    label: int
    class_name: str = Field(description="the label's class name, e.g. '7' or 'Sneaker'")
    probabilities: list[float]
    attribution: Attribution | None = Field(None, description="absent when explain is false")


class PredictResponse(BaseModel):
    model: str
    model_version: str = Field(description=VERSION_DESCRIPTION)
    defense: str
    predictions: list[Prediction]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str = Field(description="the default model (the first served)")
    defense: str = Field(description="the default model's defense")
    models: list[str] = Field(description="every served model, by name, the default first")


class DefenseInfo(BaseModel):
    name: str
    settings: dict[str, Any] = Field(description="the defense's public settings")


class ExpectedInput(BaseModel):
    """What the model was trained on, so what an input should look like to be read as the model reads its own."""

    subject: str = Field(description="what one input shows, e.g. 'one handwritten digit, 0 to 9'")
    shape: list[int] = Field(description="[C, H, W] of the model's input; images of any size are resized to it")
    colour: Literal["grayscale", "RGB"] | None = Field(description="the channels, None for another channel count")
    value_range: list[float] = Field(description="[low, high] of every value the model sees: [0, 1]")
    background: Literal["dark", "light", "any"] = Field(
        description="dark: light content on a dark background; light: the reverse; any: natural photos"
    )
    polarity: str = Field(description="which values are background and which are content")
    appearance: str = Field(description="how the training images were made: size, centring, margins")
    normalisation: dict[str, list[float]] = Field(
        description="'mean' and 'std' per channel, applied inside the model: send values in [0, 1], not normalised"
    )


class InvertOption(BaseModel):
    """The request option that turns a light background into a dark one; the server never guesses it."""

    predict: str = Field(description="how to ask for it on POST /predict")
    open_inference_protocol: str = Field(description="how to ask for it on POST /v2/models/{name}/infer")
    default: bool = Field(description="what happens when it is absent: false, the values are used as sent")
    effect: str
    when: str = Field(description="when to set it for this model")


class Preprocessing(BaseModel):
    """What the server does to an input before the model sees it (server/images.py), step by step."""

    image_b64: list[str] = Field(description="the steps for a base64 PNG or JPEG, in order")
    pixels: list[str] = Field(description="the steps for a C×H×W array of values")
    invert: InvertOption


class ModelCard(BaseModel):
    """What the model expects, what the server does to an input, and what the model is not meant for."""

    summary: str
    trained_on: str = Field(description="the data set the model learnt from")
    test_accuracy: float = Field(description="percent of the data set's test split read correctly (undefended)")
    expects: ExpectedInput
    preprocessing: Preprocessing
    not_meant_for: list[str] = Field(description="inputs the model was not trained for; it answers them anyway")
    answers: list[str] = Field(description="what every answer is, and is not, whatever the input")


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description=VERSION_DESCRIPTION)
    arch: str
    dataset: str
    classes: list[str]
    input_shape: list[int] = Field(description="[C, H, W]")
    interpreter: str
    defense: DefenseInfo
    card: ModelCard | None = Field(
        description="the model card; None for a checkpoint whose data set nobody described (models/data.py, or "
        "the checkpoint's extra['card'])"
    )


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. 'invalid_shape'")
    message: str
    field: str | None = Field(None, description="the offending field, e.g. 'instances[0].pixels'")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ProtocolErrorResponse(BaseModel):
    """An error on the Open Inference Protocol's routes: the protocol's ``{"error": "<message>"}`` (what
    ``tritonclient`` reads), with this API's code and field beside it."""

    error: str = Field(description="what was wrong and what to do, then the code and the field in parentheses")
    code: str = Field(description="machine-readable reason, e.g. 'invalid_shape' (as ErrorDetail.code)")
    field: str | None = Field(None, description="the offending field, e.g. 'inputs[0].shape'")


class FlaggedKey(BaseModel):
    key_id: str = Field(description="the key's id (12 hex digits of its HMAC under the server's secret), as in metrics")
    queries: int = Field(description="queries the key has sent while watched")
    flagged: int = Field(description="of those, flagged as out of domain by the gate's domain score")
    duplicates: int = Field(
        description="of those, near-duplicates of the key's own earlier queries or of an escalated key's"
    )
    spread: float | None = Field(
        description="PRADA's W of the key's nearest-earlier-query distances (low: queries grown from earlier ones)"
    )
    reason: Literal["domain", "duplicates", "taint", "spread"] = Field(
        description="what escalated the key: its domain flags, its near-duplicates, near-duplicates of an escalated "
        "key's queries, or the distances between its queries"
    )
    escalated_at: float = Field(description="unix time of the escalation")
    escalated_after: int = Field(description="queries the key had sent when it was escalated")


class FlaggedKeysResponse(BaseModel):
    keys: list[FlaggedKey]


# -- the Open Inference Protocol (KServe v2 REST, as Triton speaks it) ---------------------------------------------

#: Nesting accepted in a tensor's ``data``: flat, or nested as deep as the image input's shape [B, C, H, W].
MAX_DATA_DEPTH = 4


def _flatten(value: Any) -> Any:
    """Nested lists → one flat list in row-major order (the protocol allows both); anything else as it is,
    for the list validator to judge. Iterative, so a hostile nesting cannot exhaust the stack."""
    if not isinstance(value, list) or not any(isinstance(v, list) for v in value):
        return value
    flat: list[Any] = []
    stack = [iter(value)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= MAX_DATA_DEPTH:
                    raise ValueError(f"data must be flat or nested at most {MAX_DATA_DEPTH} deep")
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


#: A tensor's elements: floats in [0, 1] (the rules of ``pixels``), flat in row-major order or nested;
#: error locations count the flattened elements.
TensorData = Annotated[
    list[Pixel],
    Field(fail_fast=True),
    BeforeValidator(_flatten),
    WithJsonSchema(
        {
            "type": "array",
            "description": "the elements in row-major order, flat (or nested), floats in [0, 1]",
            "items": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "array"}]},
        }
    ),
]
#: ``parameters`` of a request, a tensor or an output: names to booleans, numbers or strings.
Parameters = dict[str, StrictBool | StrictInt | StrictFloat | StrictStr]
Dim = Annotated[int, Field(strict=True, ge=0)]


class InferInputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(description="the input's name: 'image'")
    shape: list[Dim] = Field(description="[B, C, H, W], C×H×W the model's input size")
    datatype: Literal["FP32", "FP64"]
    parameters: Parameters | None = Field(
        None, description="'binary_data_size': the data follow the JSON as little-endian binary (Triton's extension)"
    )
    data: TensorData | None = Field(None, description="absent when the data come as binary")


class InferRequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(description="'probabilities', 'label' or 'attribution'")
    parameters: Parameters | None = Field(None, description="'binary_data' is accepted; outputs always come as JSON")


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = Field(None, description="echoed in the response")
    parameters: Parameters | None = Field(None, description="'invert' (a boolean): " + INVERT_DESCRIPTION)
    inputs: list[InferInputTensor] = Field(min_length=1, description="one input, 'image'")
    outputs: list[InferRequestedOutput] | None = Field(
        None, description="the outputs to return (all when absent); maps are computed only for 'attribution'"
    )


class InferOutputTensor(BaseModel):
    name: str
    datatype: Literal["FP32", "INT64", "BYTES"]
    shape: list[int]
    parameters: dict[str, str] | None = Field(None, description="'method': the interpreter of an attribution")
    data: list[StrictInt] | list[float] | list[str] = Field(description="the elements in row-major order")


class InferResponse(BaseModel):
    model_name: str
    model_version: str = Field(description=VERSION_DESCRIPTION)
    id: str = Field(description="the request's id, or the X-Request-ID of the response when the request has none")
    parameters: dict[str, str] = Field(description="'defense': the defense that answered")
    outputs: list[InferOutputTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size (the batch)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the one version served: " + VERSION_DESCRIPTION)
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    classes: list[str] = Field(description="the class names, by label (the 'class_name' output's values)")


class ConfigTensor(BaseModel):
    """A tensor of Triton's model configuration; ``dims`` without the batch dimension."""

    name: str
    data_type: str = Field(description="Triton's type name, e.g. 'TYPE_FP32'")
    dims: list[int]


class ModelConfig(BaseModel):
    """What ``tritonclient``'s ``get_model_config`` reads: Triton's model configuration, as JSON."""

    name: str
    platform: str
    max_batch_size: int = Field(description="the most instances one request may carry (the server's limit)")
    input: list[ConfigTensor]
    output: list[ConfigTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool = True


class ServerReady(BaseModel):
    ready: bool = True


class ModelReady(BaseModel):
    name: str
    ready: bool = True
