"""The HTTP API through FastAPI's TestClient, with defense ``none``: every route, every class of
bad input, and the one error shape."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from support.images import SHAPE, pixels, png_bomb
from support.numerics import PATH_ATOL, top1_margin
from support.servers import error_of, metric_value, serving
from support.settings import make_settings

from deepdefense.defense import NoDefense
from deepdefense.defense.engine import safe_answer
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.server.app import create_app
from deepdefense.server.images import ImageLimits, to_tensor
from deepdefense.server.schemas import Instance
from deepdefense.server.settings import ServerSettings

pytestmark = pytest.mark.usefixtures("no_server_env")


@pytest.fixture
def client(tmp_path: Path, defense: NoDefense) -> Iterator[TestClient]:
    with serving(
        create_app(
            make_settings(
                tmp_path, max_instances=4, max_image_bytes=20_000, max_image_pixels=250_000, max_body_bytes=200_000
            ),
            defense,
        )
    ) as c:
        yield c


def encode(img: Image.Image, fmt: str = "PNG", **options: int) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return base64.b64encode(buf.getvalue()).decode()


def noise(width: int, height: int) -> Image.Image:
    """Incompressible grey noise: its PNG is about width × height bytes."""
    values = torch.randint(0, 256, (height, width), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return Image.fromarray(values.numpy())


# -- the routes --------------------------------------------------------------------------------------


def test_probes_models_metrics_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = {"status": "ready", "model": "lenet-mnist", "defense": "none", "models": ["lenet-mnist"]}
    assert client.get("/readyz").json() == ready
    (model,) = client.get("/v1/models").json()["models"]
    assert model.pop("card")["expects"]["background"] == "dark"  # the card itself: tests/server/test_model_card.py
    assert len(model.pop("version")) == 12  # the weights' version: tests/server/test_server_oip.py
    assert model == {
        "name": "lenet-mnist",
        "arch": "lenet",
        "dataset": "mnist",
        "classes": [str(i) for i in range(10)],
        "input_shape": [1, 28, 28],
        "interpreter": "gradcam",
        "defense": {"name": "none", "settings": {}},
    }
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'dd_server_info{defense="none"' in metrics.text
    assert 'dd_http_requests_total{method="GET",route="/v1/models",status="200"} 1.0' in metrics.text
    assert client.get("/docs").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_docs_pages_load_nothing_from_another_host(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        urls = re.findall(r"""(?:src|href|url)\s*[=:(]\s*['"]?([^'")\s>]+)""", html)
        assert any(url.endswith(".js") for url in urls), (page, urls)
        assert not re.search(r"https?://|//[a-z0-9-]+\.", html), f"{page} names another host"
        for url in urls:
            assert url.startswith("/"), (page, url)
            r = client.get(url)
            assert r.status_code == 200 and len(r.content) > 0, (page, url)


def test_predict_pixels_keeps_the_victims_answers(client: TestClient, victim: torch.nn.Module) -> None:
    batch = [pixels(0), pixels(1)]
    r = client.post("/predict", json={"instances": [{"pixels": p} for p in batch], "explain": True})
    assert r.status_code == 200
    body = r.json()
    assert (body["model"], body["defense"]) == ("lenet-mnist", "none")
    expected = victim(torch.tensor(batch)).softmax(-1)  # not the server's code path: compared within PATH_ATOL
    assert top1_margin(expected).min() > 100 * PATH_ATOL, "a near-tie: the top-1 may differ by path"
    for pred, probs in zip(body["predictions"], expected, strict=True):
        assert pred["label"] == int(probs.argmax())
        torch.testing.assert_close(torch.tensor(pred["probabilities"]), probs, rtol=0, atol=PATH_ATOL)
        assert pred["attribution"]["method"] == "gradcam"
        assert pred["attribution"]["shape"] == [28, 28]
        assert torch.tensor(pred["attribution"]["values"]).shape == (28, 28)


def test_answers_carry_six_significant_digits(client: TestClient, victim: torch.nn.Module) -> None:
    batch = [pixels(4), pixels(5)]
    r = client.post("/predict", json={"instances": [{"pixels": p} for p in batch], "explain": True})
    expected = victim(torch.tensor(batch)).softmax(-1)
    for prediction, probs in zip(r.json()["predictions"], expected, strict=True):
        values = prediction["probabilities"] + [v for row in prediction["attribution"]["values"] for v in row]
        assert all(v == float(f"{v:.6g}") for v in values), "more than 6 significant digits"
        assert abs(sum(prediction["probabilities"]) - 1) < 1e-5
        torch.testing.assert_close(torch.tensor(prediction["probabilities"]), probs, rtol=1e-5, atol=PATH_ATOL)
    oip = client.post(
        "/v2/models/lenet-mnist/infer",
        json={"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": batch[0]}]},
    )
    for output in oip.json()["outputs"]:
        if output["datatype"] == "FP32":
            assert all(v == float(f"{v:.6g}") for v in output["data"]), output["name"]
    assert len(r.content) < 2 * 9_000, "about 9 KB an instance with its map"


def test_predict_without_explanation_has_no_attribution(client: TestClient) -> None:
    r = client.post("/predict", json={"instances": [{"pixels": pixels()}], "explain": False})
    assert r.status_code == 200
    assert set(r.json()["predictions"][0]) == {"label", "class_name", "probabilities"}


# What server/images.py documents for a 1-channel model: any PNG/JPEG is converted to 8-bit grayscale ("L":
# ITU-R 601-2 luma), resized to 28×28 with PIL's bilinear filter when its size differs, and scaled by 1/255.
LIMITS = ImageLimits(max_bytes=20_000, max_pixels=250_000)  # the client fixture's limits
JPEG_QUALITY = 90


def decoded(image_b64: str) -> torch.Tensor:
    """The tensor the server decodes from one ``image_b64`` instance, by the server's own function."""
    return to_tensor(Instance(image_b64=image_b64), "instances[0].image_b64", SHAPE, LIMITS)


def as_tensor(img: Image.Image) -> torch.Tensor:
    """An 8-bit grayscale PIL image as a (1, 28, 28) tensor in [0, 1]."""
    assert img.mode == "L" and img.size == (28, 28)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).unsqueeze(0)


def random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    channels = {"L": 1, "RGB": 3}[mode]
    values = torch.randint(0, 256, (height, width, channels), generator=torch.Generator().manual_seed(seed))
    img = Image.fromarray(values.to(torch.uint8).squeeze(-1).numpy())  # (H, W) → "L", (H, W, 3) → "RGB"
    assert img.mode == mode
    return img


def smooth_digit() -> Image.Image:
    """A smooth 28×28 grey blob on a gradient: an image JPEG encodes with little loss (unlike noise)."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    values = 0.8 * np.exp(-((yy - 12) ** 2 / 40 + (xx - 15) ** 2 / 18)) + 0.15 * xx / 27
    return Image.fromarray(np.round(values * 255).astype(np.uint8))


def test_a_colour_image_is_decoded_to_its_luma() -> None:
    rgb = random_image("RGB", 28, 28, seed=5)
    x = decoded(encode(rgb))
    r, g, b = (torch.from_numpy(np.asarray(rgb, dtype=np.float64)[..., c]) for c in range(3))
    luma = (0.299 * r + 0.587 * g + 0.114 * b) / 255  # ITU-R 601-2, PIL's documented "L" conversion
    # the server holds whole grey levels (8-bit "L"): the documented luma rounded to the nearest level, where PIL's
    # fixed-point coefficients add at most 0.003 of a level
    assert x.shape == SHAPE and x.dtype == torch.float32
    torch.testing.assert_close(x[0].double(), luma, rtol=0, atol=0.51 / 255)
    # identity is the property: the colour PNG and the PNG of its own "L" conversion are the same pixels
    assert torch.equal(x, decoded(encode(rgb.convert("L")))), "a colour image must decode to its grayscale conversion"


def test_a_resized_image_is_pils_bilinear_resize() -> None:
    big = random_image("L", 56, 70, seed=6)
    # identity is the property: the same documented PIL call on the same pixels (a different filter or size fails)
    expected = as_tensor(big.resize((28, 28), Image.Resampling.BILINEAR))
    assert torch.equal(decoded(encode(big)), expected), "not PIL's bilinear resize to 28×28"
    assert not torch.equal(expected, as_tensor(big.resize((28, 28), Image.Resampling.NEAREST)))  # the filter shows
    # independent of PIL's resize: a constant colour stays constant, at its luma 0.299·200 + 0.587·30 + 0.114·90 ≈ 88
    flat = decoded(encode(Image.new("RGB", (56, 70), (200, 30, 90))))
    assert torch.equal(flat, torch.full(SHAPE, 88 / 255)), "a constant colour resized is its luma, exactly"


def test_a_jpeg_decodes_close_to_its_source() -> None:
    source = smooth_digit()
    x = decoded(encode(source, "JPEG", quality=JPEG_QUALITY))
    error = (x - as_tensor(source)).abs()
    # JPEG is lossy: measured max 3 and mean 0.44 grey levels at quality 90 for this smooth image (6 and 0.7 at
    # Pillow's default 75); 8 and 2 levels leave room for other libjpeg builds, while a wrong decode (other
    # channel, no 1/255 scaling, inverted, shifted) is off by tens of levels
    assert float(error.max()) <= 8 / 255 and float(error.mean()) <= 2 / 255, (
        f"max {error.max():.4f}, mean {error.mean():.4f}"
    )


def test_image_answers_are_the_victims_on_the_decoded_pixels(client: TestClient, victim: torch.nn.Module) -> None:
    """Over HTTP (defense ``none``): each image's answer is the victim's on the tensor the documented conversion
    gives, computed here without the server's code (luma / PIL resize / PIL's JPEG decode)."""
    rgb, big, source = random_image("RGB", 28, 28, seed=5), random_image("L", 56, 70, seed=6), smooth_digit()
    jpeg = encode(source, "JPEG", quality=JPEG_QUALITY)
    with Image.open(io.BytesIO(base64.b64decode(jpeg))) as img:
        jpeg_pixels = as_tensor(img.convert("L"))
    cases = [  # (instance, the tensor the server should answer on)
        (encode(rgb), as_tensor(rgb.convert("L"))),
        (encode(rgb.convert("L")), as_tensor(rgb.convert("L"))),
        (encode(big), as_tensor(big.resize((28, 28), Image.Resampling.BILINEAR))),
        (jpeg, jpeg_pixels),
    ]
    r = client.post("/predict", json={"instances": [{"image_b64": i} for i, _ in cases], "explain": True})
    assert r.status_code == 200
    predictions = r.json()["predictions"]
    x = torch.stack([t for _, t in cases])
    expected = victim(x).softmax(-1)  # four images here, one batch in the server: compared within PATH_ATOL
    assert top1_margin(expected).min() > 100 * PATH_ATOL, "a near-tie: the top-1 may differ by path"
    maps = create_interpreter("gradcam", victim, SHAPE).explain({}, x, expected.argmax(1)).attribution.detach()
    for pred, probs, heat in zip(predictions, expected, maps, strict=True):
        assert pred["label"] == int(probs.argmax())
        torch.testing.assert_close(torch.tensor(pred["probabilities"]), probs, rtol=0, atol=PATH_ATOL)
        torch.testing.assert_close(torch.tensor(pred["attribution"]["values"]), heat, rtol=0, atol=PATH_ATOL)
    # the colour PNG and its grayscale PNG are the same pixels: the same answer, up to the row they sit in
    first, second = (torch.tensor(p["probabilities"]) for p in predictions[:2])
    torch.testing.assert_close(first, second, rtol=0, atol=PATH_ATOL)
    # the JPEG is answered on its lossy pixels, and keeps its source's label (a clear top-1, far above the loss)
    own = victim(as_tensor(source).unsqueeze(0)).softmax(-1)
    assert top1_margin(own).min() > 0.05 and predictions[3]["label"] == int(own.argmax())


def test_not_ready_answers_503(tmp_path: Path, defense: NoDefense) -> None:
    app = create_app(make_settings(tmp_path, warmup=False), defense)
    runtime = app.state.runtime.default
    with TestClient(app) as client:
        runtime.phase = "starting"  # as while the model loads and layer sensitivity is computed
        for r in (client.get("/readyz"), client.post("/predict", json={"instances": [{"pixels": pixels()}]})):
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert error_of(r)["code"] == "not_ready"
        assert client.get("/healthz").status_code == 200


# -- bad inputs --------------------------------------------------------------------------------------

BAD_JSON_BODIES = [
    pytest.param(
        {"instances": [{"pixels": pixels(shape=(1, 27, 28))}]},
        422,
        "invalid_shape",
        "instances[0].pixels",
        id="wrong-height",
    ),
    pytest.param(
        {"instances": [{"pixels": pixels(shape=(3, 28, 28))}]},
        422,
        "wrong_channels",
        "instances[0].pixels",
        id="wrong-channels",
    ),
    pytest.param(
        {"instances": [{"pixels": [[[0.5] * 28] * 27 + [[0.5] * 27]]}]},
        422,
        "invalid_shape",
        "instances[0].pixels",
        id="ragged",
    ),
    pytest.param(
        {"instances": [{"pixels": [[[0.5, 1.5]]]}]}, 422, "out_of_range", "instances[0].pixels[0][0][1]", id="above-one"
    ),
    pytest.param(
        {"instances": [{"pixels": [[[-0.1]]]}]}, 422, "out_of_range", "instances[0].pixels[0][0][0]", id="below-zero"
    ),
    pytest.param(
        {"instances": [{"pixels": [[["0.5"]]]}]}, 422, "invalid_type", "instances[0].pixels[0][0][0]", id="string-pixel"
    ),
    pytest.param(
        {"instances": [{"pixels": [[0.5]]}]}, 422, "invalid_shape", "instances[0].pixels", id="two-dimensional"
    ),
    pytest.param({"instances": [{}]}, 422, "invalid_value", "instances[0]", id="neither-field"),
    pytest.param(
        {"instances": [{"pixels": pixels(), "image_b64": "AA=="}]},
        422,
        "invalid_value",
        "instances[0]",
        id="both-fields",
    ),
    pytest.param(
        {"instances": [{"pixels": pixels(), "label": 3}]},
        422,
        "unknown_field",
        "instances[0].label",
        id="unknown-field",
    ),
    pytest.param({"instances": []}, 422, "empty", "instances", id="no-instances"),
    pytest.param({}, 422, "missing_field", "instances", id="missing-instances"),
    pytest.param(
        {"instances": [{"pixels": pixels()}], "explain": "yes"}, 422, "invalid_type", "explain", id="explain-not-bool"
    ),
    pytest.param(
        {"instances": [{"pixels": pixels()}] * 5}, 413, "too_many_instances", "instances", id="too-many-instances"
    ),
    pytest.param(
        {"instances": [{"image_b64": "not base64!"}]}, 422, "invalid_base64", "instances[0].image_b64", id="bad-base64"
    ),
    pytest.param(
        {"instances": [{"image_b64": base64.b64encode(b"GIF89a" + bytes(64)).decode()}]},
        422,
        "undecodable_image",
        "instances[0].image_b64",
        id="not-png-or-jpeg",
    ),
    pytest.param(
        {"instances": [{"image_b64": encode(Image.new("L", (28, 28)))[:60]}]},
        422,
        "undecodable_image",
        "instances[0].image_b64",
        id="truncated-png",
    ),
    pytest.param(
        {"instances": [{"pixels": pixels()}, {"image_b64": encode(noise(150, 150))}]},
        413,
        "image_too_large",
        "instances[1].image_b64",
        id="oversized-image",
    ),
    pytest.param(
        {"instances": [{"image_b64": encode(Image.new("L", (600, 600)))}]},
        413,
        "too_many_pixels",
        "instances[0].image_b64",
        id="too-many-pixels",
    ),
    pytest.param(
        {"instances": [{"image_b64": png_bomb(600, 600)}]},
        413,
        "too_many_pixels",
        "instances[0].image_b64",
        id="declared-size-checked-before-decoding",
    ),
    pytest.param(
        {"instances": [{"image_b64": png_bomb(200_000, 200_000)}]},
        413,
        "too_many_pixels",
        "instances[0].image_b64",
        id="decompression-bomb",
    ),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("body", "status", "code", "field"), BAD_JSON_BODIES)
def test_bad_input_names_the_field(client: TestClient, body: dict, status: int, code: str, field: str) -> None:
    r = client.post("/predict", json=body)
    assert r.status_code == status
    assert error_of(r) | {"message": ""} == {"code": code, "field": field, "message": ""}


# -- the commonest mistakes get a 422 that says what to do -----------------------------------------------------


def test_8_bit_values_are_told_to_divide_by_255(client: TestClient) -> None:
    r = client.post("/predict", json={"instances": [{"pixels": [[[255.0] * 28] * 28]}]})
    assert r.status_code == 422 and error_of(r)["code"] == "out_of_range"
    assert "divide by 255" in error_of(r)["message"] and "[0, 1]" in error_of(r)["message"]


def test_an_image_without_its_channel_dimension_is_told_how_to_add_it(client: TestClient) -> None:
    r = client.post("/predict", json={"instances": [{"pixels": [[0.5] * 28] * 28}]})
    assert r.status_code == 422
    error = error_of(r)
    assert (error["code"], error["field"]) == ("invalid_shape", "instances[0].pixels")
    assert error["message"].startswith("pixels must have shape [1, 28, 28] (C×H×W), got [28, 28]")
    assert "channel dimension is missing" in error["message"] and "x.reshape(1, 28, 28)" in error["message"]


def test_a_flat_list_is_told_how_to_reshape(client: TestClient) -> None:
    r = client.post("/predict", json={"instances": [{"pixels": [0.5] * 784}]})
    assert r.status_code == 422
    error = error_of(r)
    assert (error["code"], error["field"]) == ("invalid_shape", "instances[0].pixels")
    assert "got [784]: a flat list of 784 values" in error["message"]
    assert "x.reshape(1, 28, 28)" in error["message"]
    batched = client.post("/predict", json={"instances": [{"pixels": [pixels()]}]})  # [1, 1, 28, 28]
    assert "send each image as its own instance" in error_of(batched)["message"]


def test_a_data_url_is_accepted_as_its_base64(client: TestClient) -> None:
    png = encode(smooth_digit())
    plain = client.post("/predict", json={"instances": [{"image_b64": png}], "explain": False})
    url = client.post("/predict", json={"instances": [{"image_b64": "data:image/png;base64," + png}], "explain": False})
    assert plain.status_code == url.status_code == 200 and url.json() == plain.json()
    r = client.post("/predict", json={"instances": [{"image_b64": "data:text/plain," + png}]})
    assert r.status_code == 422 and "data:image/<type>;base64," in error_of(r)["message"]


def test_black_ink_on_a_transparent_png_is_not_blank(client: TestClient) -> None:
    ink = Image.new("RGBA", (28, 28), (0, 0, 0, 0))
    for i in range(6, 22):
        ink.putpixel((14, i), (0, 0, 0, 255))
    x = decoded(encode(ink))
    assert x.min() == 0.0 and x.max() == 1.0, "the ink shows, on white (docs/server.md: then use invert)"
    r = client.post("/predict", json={"instances": [{"image_b64": encode(ink)}], "invert": True, "explain": False})
    assert r.status_code == 200


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_tokens_are_rejected(client: TestClient, token: str) -> None:
    row = ", ".join(["0.5"] * 27 + [token])
    raw = '{"instances": [{"pixels": [[' + ", ".join([f"[{row}]"] * 28) + "]]}]}"
    r = client.post("/predict", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert error_of(r) | {"message": ""} == {
        "code": "not_finite",
        "field": "instances[0].pixels[0][0][27]",
        "message": "",
    }


def test_malformed_json(client: TestClient) -> None:
    r = client.post("/predict", content=b'{"instances": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type(client: TestClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/predict", content=json.dumps({"instances": [{"pixels": pixels()}]}), headers=headers)
    assert r.status_code == 415
    assert error_of(r) | {"message": ""} == {"code": "unsupported_media_type", "field": "Content-Type", "message": ""}


def test_body_too_large_by_content_length(client: TestClient) -> None:
    r = client.post("/predict", content=b"x" * 200_001, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"


def test_body_too_large_without_content_length(client: TestClient) -> None:
    """A chunked body declares no length: the limit holds while the chunks are read."""

    def chunks() -> Iterator[bytes]:
        yield b'{"instances": ['
        for _ in range(100):
            yield b"[" + b"0.5, " * 1000 + b"0.5],"

    r = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and error_of(r)["field"] == "body"


def test_unknown_route_and_method(client: TestClient) -> None:
    assert error_of(client.get("/nope"))["code"] == "not_found"
    assert error_of(client.get("/predict"))["code"] == "method_not_allowed"


def test_every_response_carries_a_request_id_and_the_access_log_has_it(
    tmp_path: Path, defense: NoDefense, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(tmp_path, api_keys="request-id-key-0123"), defense)

    async def boom() -> None:
        raise RuntimeError("nobody expected this")

    app.add_api_route("/boom", boom)
    key = {"Authorization": "Bearer request-id-key-0123"}
    body = {"instances": [{"pixels": pixels()}]}
    with serving(app, raise_server_exceptions=False) as client, caplog.at_level("INFO", "deepdefense.access"):
        sent = client.post("/predict", json=body, headers=key | {"X-Request-ID": "trace-0123:abc.DEF_9"})
        assert sent.status_code == 200 and sent.headers["X-Request-ID"] == "trace-0123:abc.DEF_9"
        answers = {
            "generated": client.post("/predict", json=body, headers=key),
            "not a token": client.post("/predict", json=body, headers=key | {"X-Request-ID": "a b\nFAKE 200"}),
            "too long": client.post("/predict", json=body, headers=key | {"X-Request-ID": "x" * 129}),
        }
        for why, r in answers.items():
            assert r.status_code == 200 and len(r.headers["X-Request-ID"]) == 32, why
            int(r.headers["X-Request-ID"], 16)
        assert len({r.headers["X-Request-ID"] for r in answers.values()}) == 3
        refusals = {
            "unauthorized": client.post("/predict", json=body),
            "out_of_range": client.post(
                "/predict", json={"instances": [{"pixels": torch.full(SHAPE, 2.0).tolist()}]}, headers=key
            ),
            "not_found": client.get("/nope", headers={"X-Request-ID": "nope-1"}),
            "model_not_found": client.get("/v2/models/other", headers=key),
            "body_too_large": client.post("/predict", content=b"x" * 10**7, headers=key),
            "internal_error": client.get("/boom"),
        }
    assert refusals["not_found"].headers["X-Request-ID"] == "nope-1"
    lines = [record.getMessage() for record in caplog.records if record.name == "deepdefense.access"]
    assert any(line.startswith("POST /predict 200 ") and line.endswith(" id=trace-0123:abc.DEF_9") for line in lines)
    assert not any("FAKE" in line for line in lines)
    for code, r in refusals.items():
        rid = r.headers["X-Request-ID"]
        assert error_of(r)["code"] == code
        if code != "internal_error":  # answered outside the middlewares, after the access log's line
            assert sum(line.endswith(f" id={rid} error={code}") for line in lines) == 1, (code, lines)


class _Exploding(NoDefense):
    """Fails on all-white queries with a message full of things that must not reach the client."""

    def answer(self, x: torch.Tensor, *, explain: bool = True) -> list:
        if bool((x == 1).all()):
            raise RuntimeError(f"/secret/path/weights.safetensors {self.model.net.features.conv1.weight}")
        return super().answer(x, explain=explain)


def test_internal_errors_are_generic(tmp_path: Path, victim: torch.nn.Module) -> None:
    exploding = _Exploding(victim, create_interpreter("gradcam", victim, SHAPE))
    with serving(create_app(make_settings(tmp_path), exploding), raise_server_exceptions=False) as client:
        r = client.post("/predict", json={"instances": [{"pixels": torch.ones(SHAPE).tolist()}]})
        assert r.status_code == 500
        assert error_of(r)["code"] == "defense_failed"
        assert "secret" not in r.text and "tensor" not in r.text
        assert client.post("/predict", json={"instances": [{"pixels": pixels()}]}).status_code == 200


# -- configuration -------------------------------------------------------------------------------------


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DD_DEFENSE", "dd-s")
    monkeypatch.setenv("DD_ENGINE__STEPS", "7")
    monkeypatch.setenv("DD_ENGINE__LR", "0.05")
    monkeypatch.setenv("DD_MAX_INSTANCES", "3")
    s = ServerSettings()
    assert (s.defense, s.engine, s.max_instances) == ("dd-s", {"steps": 7, "lr": 0.05}, 3)
    monkeypatch.setenv("DD_ENGINE", '{"steps": 2}')
    monkeypatch.delenv("DD_ENGINE__STEPS")
    monkeypatch.delenv("DD_ENGINE__LR")
    assert ServerSettings().engine == {"steps": 2}


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"defense": "nope"}, "defense"),
        ({"checkpoint": "no-such-checkpoint"}, "not found"),
        ({"query_budget": 5}, "needs API keys"),
        ({"max_instances": 0}, "max_instances"),
    ],
)
def test_bad_settings_are_refused(overrides: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ServerSettings(**overrides)


def test_serve_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepdefense.server.app
    from deepdefense.cli import build_parser, main

    seen: list[ServerSettings] = []
    monkeypatch.setattr(deepdefense.server.app, "serve", seen.append)
    monkeypatch.setenv("DD_PORT", "9000")
    monkeypatch.setenv("DD_DEFENSE", "dd-i")
    monkeypatch.setenv("DD_ENGINE", '{"steps": 10, "lr": 0.02}')
    assert main(["serve", "--defense", "none", "--set", "steps=3", "--queue-size", "5", "--no-warmup"]) == 0
    (s,) = seen
    assert (s.defense, s.port, s.queue_size, s.checkpoint, s.warmup) == ("none", 9000, 5, ["lenet-mnist"], False)
    assert s.engine == {"steps": 3, "lr": 0.02}  # --set overrides the keys it names, DD_ENGINE keeps the others
    serve_parser = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    assert not [a for a in serve_parser._actions if "key" in " ".join(a.option_strings)]


def test_serve_flags_are_the_settings_with_their_defaults() -> None:
    """Every setting but the keys is a flag, and its help shows the setting's own default and description."""
    from deepdefense.cli import build_parser
    from deepdefense.commands.serve import ENVIRONMENT_ONLY

    serve_parser = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    helps = {a.dest: a.help or "" for a in serve_parser._actions}
    for name, field in ServerSettings.model_fields.items():
        if name in ENVIRONMENT_ONLY:
            assert name not in helps
        elif name != "engine":  # the dict of defense options is --set KEY=VALUE
            default = field.get_default(call_default_factory=True)
            shown = "none" if default is None else ",".join(default) if isinstance(default, list) else default
            assert f"default: {shown};" in helps[name], name
            assert f"env DD_{name.upper()}" in helps[name] and (field.description or "") in helps[name], name


class _FailClosed(NoDefense):
    """Every answer is the documented safe answer (the victim's, put through ``safe_answer``), marked as a fallback,
    after a reported optimisation time. Only the counting is tested here; the real engine's fallbacks over HTTP are
    tests/server/test_fail_closed.py's."""

    name = "fake-dd"

    def answer(self, x: torch.Tensor, *, explain: bool = True) -> list:
        answers = super().answer(x, explain=True)
        for a in answers:
            a.probabilities, a.attribution = safe_answer(a.probabilities, a.attribution, top_k=1)
            a.attribution = a.attribution if explain else None
            a.fallback, a.stats = True, {"optimisation_seconds": 0.02}
        return answers


def test_fallbacks_and_optimisation_time_are_counted(tmp_path: Path, victim: torch.nn.Module) -> None:
    fail_closed = _FailClosed(victim, create_interpreter("gradcam", victim, SHAPE))
    with serving(create_app(make_settings(tmp_path, warmup=False), fail_closed)) as client:
        r = client.post("/predict", json={"instances": [{"pixels": pixels(0)}, {"pixels": pixels(1)}]})
        assert r.status_code == 200 and r.json()["defense"] == "fake-dd"
        metrics = client.get("/metrics").text
    assert metric_value(metrics, 'dd_defense_fallbacks_total{defense="fake-dd",model="lenet-mnist"}') == 2
    assert metric_value(metrics, 'dd_defense_optimisation_seconds_count{defense="fake-dd",model="lenet-mnist"}') == 2
    assert metric_value(metrics, 'dd_answers_total{defense="fake-dd",model="lenet-mnist"}') == 2


def test_a_defense_that_cannot_be_built_never_becomes_ready(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, interpreter="no-such-interpreter"))) as client:
        deadline = time.monotonic() + 30
        while client.app.state.runtime.phase == "starting":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = client.get("/readyz")
        assert r.status_code == 503 and "failed" in error_of(r)["message"]
        assert "no-such-interpreter" not in r.text
        assert client.get("/healthz").status_code == 200
