"""Request and response bodies of the HTTP API; the field names are a public contract."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

#: One pixel value: a finite number in [0, 1]; lists stop at their first bad element.
Pixel = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=1.0)]
Row = Annotated[list[Pixel], Field(fail_fast=True)]
Plane = Annotated[list[Row], Field(fail_fast=True)]
Pixels = Annotated[list[Plane], Field(fail_fast=True)]


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
    explain: StrictBool = Field(True, description="also return an attribution map per instance")


class Attribution(BaseModel):
    method: str = Field(description="the interpreter that produced the map")
    shape: list[int] = Field(description="[h, w]")
    values: list[list[float]]


class Prediction(BaseModel):
    label: int
    probabilities: list[float]
    attribution: Attribution | None = Field(None, description="absent when explain is false")


class PredictResponse(BaseModel):
    model: str
    defense: str
    predictions: list[Prediction]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str
    defense: str


class DefenseInfo(BaseModel):
    name: str
    settings: dict[str, Any] = Field(description="the defense's public settings")


class ModelInfo(BaseModel):
    name: str
    arch: str
    dataset: str
    classes: list[str]
    input_shape: list[int] = Field(description="[C, H, W]")
    interpreter: str
    defense: DefenseInfo


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. 'invalid_shape'")
    message: str
    field: str | None = Field(None, description="the offending field, e.g. 'instances[0].pixels'")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FlaggedKey(BaseModel):
    key_id: str = Field(description="the key's id (12 hex digits of its sha256), as in the metrics")
    queries: int = Field(description="queries the key has sent while watched")
    flagged: int = Field(description="of those, flagged as out of domain by the gate's domain score")
    escalated_at: float = Field(description="unix time of the escalation")
    escalated_after: int = Field(description="queries the key had sent when it was escalated")


class FlaggedKeysResponse(BaseModel):
    keys: list[FlaggedKey]
