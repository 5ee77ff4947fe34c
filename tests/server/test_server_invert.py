"""The ``invert`` request option (``/predict``'s ``invert``, the Open Inference Protocol's ``parameters.invert``):
what reaches the model is 1 − v of what was sent (pixels, or an image once decoded and resized), only when
asked for; bad values are 422 with the field named; the OpenAPI schema documents it."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from support.images import SHAPE, pixels
from support.servers import error_of, serving
from support.settings import make_settings

from deepdefense.defense import NoDefense
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.server.app import create_app
from deepdefense.server.images import ImageLimits, inverted, to_tensor
from deepdefense.server.schemas import Instance

pytestmark = pytest.mark.usefixtures("no_server_env")


class RecordingDefense(NoDefense):
    """The undefended victim, keeping the last batch it was asked about."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, create_interpreter("gradcam", model, SHAPE))
        self.seen: torch.Tensor | None = None

    def answer(self, x: torch.Tensor, *, explain: bool = True) -> list:
        self.seen = x.detach().cpu().clone()
        return super().answer(x, explain=explain)


@pytest.fixture
def recording(victim: torch.nn.Module) -> RecordingDefense:
    return RecordingDefense(victim)


@pytest.fixture
def client(tmp_path: Path, recording: RecordingDefense) -> Iterator[TestClient]:
    with serving(create_app(make_settings(tmp_path), recording)) as c:
        yield c


def ink_on_paper(size: int = 200) -> str:
    """A black digit-like stroke on a white 200×200 PNG (base64), as a pen on paper makes it."""
    img = Image.new("L", (size, size), 255)
    ImageDraw.Draw(img).line([(70, 40), (130, 40), (90, 160)], fill=0, width=18)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decoded(image_b64: str) -> torch.Tensor:
    return to_tensor(Instance(image_b64=image_b64), "instances[0].image_b64", SHAPE, ImageLimits(1 << 21, 1 << 22))


def test_pixels_are_inverted_only_when_asked(client: TestClient, recording: RecordingDefense) -> None:
    sent = torch.tensor(pixels(3))
    for invert, expected in ((True, 1.0 - sent), (False, sent), (None, sent)):
        body: dict = {"instances": [{"pixels": sent.tolist()}], "explain": False}
        if invert is not None:
            body["invert"] = invert
        assert client.post("/predict", json=body).status_code == 200
        assert recording.seen is not None
        torch.testing.assert_close(recording.seen[0], expected, rtol=0, atol=1e-7)


def test_an_image_is_inverted_after_it_is_decoded_and_resized(client: TestClient, recording: RecordingDefense) -> None:
    image = ink_on_paper()
    as_sent = decoded(image)
    assert float(as_sent[:, 0, 0]) == 1.0, "the paper is white once decoded"
    r = client.post("/predict", json={"instances": [{"image_b64": image}], "explain": True, "invert": True})
    assert r.status_code == 200
    assert recording.seen is not None
    # exact: 1 − x is one correctly rounded IEEE operation per pixel, on any CPU
    assert torch.equal(recording.seen[0], inverted(as_sent))
    assert float(recording.seen[0, :, 0, 0]) == 0.0, "the paper is black once inverted, as MNIST's background"
    assert recording.seen.max() == 1.0 and np.isclose(float(recording.seen.min()), 0.0)


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, [True], "true"])
def test_invert_takes_only_true_or_false(client: TestClient, bad: object) -> None:
    r = client.post("/predict", json={"instances": [{"pixels": pixels()}], "invert": bad})
    assert r.status_code == 422
    error = error_of(r)
    assert error["field"] == "invert"
    assert error["code"] == "invalid_type"


def infer_body(data: torch.Tensor, parameters: dict | None) -> dict:
    image = {"name": "image", "shape": [1, *SHAPE], "datatype": "FP32", "data": data.flatten().tolist()}
    body: dict = {"inputs": [image]}
    if parameters is not None:
        body["parameters"] = parameters
    return body


def test_the_open_inference_protocol_inverts_with_parameters_invert(
    client: TestClient, recording: RecordingDefense
) -> None:
    sent = torch.tensor(pixels(4))
    for parameters, expected in (({"invert": True}, 1.0 - sent), ({"invert": False}, sent), (None, sent)):
        r = client.post("/v2/models/lenet-mnist/infer", json=infer_body(sent, parameters))
        assert r.status_code == 200, r.text
        assert recording.seen is not None
        torch.testing.assert_close(recording.seen[0], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bad", ["yes", 1, 0.5])
def test_the_open_inference_protocol_refuses_a_non_boolean_invert(client: TestClient, bad: object) -> None:
    r = client.post("/v2/models/lenet-mnist/infer", json=infer_body(torch.tensor(pixels()), {"invert": bad}))
    assert r.status_code == 422
    assert error_of(r) | {"message": ""} == {"code": "invalid_type", "message": "", "field": "parameters.invert"}


def test_the_openapi_schema_documents_invert(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    invert = schema["components"]["schemas"]["PredictRequest"]["properties"]["invert"]
    assert invert["type"] == "boolean" and invert["default"] is False
    assert "1 − v" in invert["description"] and "never inverts on its own" in invert["description"]
    infer = schema["paths"]["/v2/models/{model_name}/infer"]["post"]["requestBody"]["content"]["application/json"]
    assert "'invert'" in infer["schema"]["properties"]["parameters"]["description"]
