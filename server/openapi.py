"""The OpenAPI schema as this server applies it: the generic request schema of ``schemas.py``
narrowed to the served models' names, their input shape (when they share one) and the configured limits, so
that clients, the documentation and schema-driven fuzzers see the arrays and sizes that are accepted."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from .schemas import PredictRequest


def install_served_openapi(
    app: FastAPI,
    *,
    shapes: dict[str, tuple[int, int, int]],
    max_instances: int,
    max_image_bytes: int,
) -> None:
    """Replace ``app.openapi`` by a cached schema with the served models' names (``shapes``: each one's input
    shape, the default first), the exact C×H×W pixel arrays when every model takes the same shape, exactly one
    of ``pixels`` and ``image_b64`` per instance, the instance and image size limits, and example requests the
    default model accepts (``/predict`` and the Open Inference Protocol's ``infer``)."""
    generate = app.openapi
    names, default = list(shapes), next(iter(shapes.values()))
    shared = default if len(set(shapes.values())) == 1 else None

    def served() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _add_request_schema(schema["components"]["schemas"])
            _narrow(schema["components"]["schemas"], names, default, shared, max_instances, max_image_bytes)
            _narrow_oip(schema["paths"], names, default)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = served  # type: ignore[method-assign]


def _add_request_schema(schemas: dict[str, Any]) -> None:
    """``PredictRequest`` and the models it uses as components: ``/predict`` reads its body itself (after the
    key is checked, ``server/routes/predict.py``) and refers to the component by hand."""
    request = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(request.pop("$defs", {}))
    schemas["PredictRequest"] = request


def _narrow(
    schemas: dict[str, Any],
    names: list[str],
    default: tuple[int, int, int],
    shared: tuple[int, int, int] | None,
    max_instances: int,
    max_image_bytes: int,
) -> None:
    """``shared``: the input shape of every model, None when they differ (the arrays' sizes then stay open)."""
    instance = schemas["Instance"]
    pixels = next(s for s in instance["properties"]["pixels"]["anyOf"] if s.get("type") == "array")
    level = pixels
    for size in shared or ():
        level.update(minItems=size, maxItems=size)
        level = level["items"]
    image = next(s for s in instance["properties"]["image_b64"]["anyOf"] if s.get("type") == "string")
    image["maxLength"] = 4 * (max_image_bytes // 3 + 1)
    # exactly one of the two, the other absent or null (pydantic's model validator, in schema terms)
    instance["oneOf"] = [
        {"required": ["pixels"], "properties": {"pixels": {"type": "array"}, "image_b64": {"type": "null"}}},
        {"required": ["image_b64"], "properties": {"image_b64": {"type": "string"}, "pixels": {"type": "null"}}},
    ]
    request = schemas["PredictRequest"]
    request["properties"]["instances"]["maxItems"] = max_instances
    model = next(s for s in request["properties"]["model"]["anyOf"] if s.get("type") == "string")
    model["enum"] = names
    c, h, w = default
    request["examples"] = [{"instances": [{"pixels": [[[0.5] * w] * h] * c}], "explain": True, "invert": False}]


def _narrow_oip(paths: dict[str, Any], names: list[str], shape: tuple[int, int, int]) -> None:
    """The Open Inference Protocol's routes: the served models' names as the values of their path
    parameter (others are 404), and an example infer request for one image of the default model's size."""
    for path, operations in paths.items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] == "model_name":
                    parameter["schema"] = {**parameter["schema"], "enum": names}
            if path.endswith("/infer") and "requestBody" in operation:
                # a copy: FastAPI puts the route's own openapi_extra dict into the schema, shared by every app
                operation["requestBody"] = copy.deepcopy(operation["requestBody"])
                c, h, w = shape
                image = {"name": "image", "shape": [1, c, h, w], "datatype": "FP32", "data": [0.5] * (c * h * w)}
                operation["requestBody"]["content"]["application/json"]["example"] = {"inputs": [image]}
