"""The HTTP API through FastAPI's TestClient, with defense ``none``: every route, every class of
bad input, and the one error shape."""

from __future__ import annotations

import base64
import io
import json
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
from support.servers import error_of, serving
from support.settings import make_settings

from defense import NoDefense
from defense.interpreters import create_interpreter
from server.app import create_app
from server.settings import ServerSettings

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


def encode(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def noise(width: int, height: int) -> Image.Image:
    """Incompressible grey noise: its PNG is about width × height bytes."""
    values = torch.randint(0, 256, (height, width), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return Image.fromarray(values.numpy())


# -- the routes --------------------------------------------------------------------------------------


def test_probes_models_metrics_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model": "lenet-mnist", "defense": "none"}
    (model,) = client.get("/v1/models").json()["models"]
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


def test_predict_without_explanation_has_no_attribution(client: TestClient) -> None:
    r = client.post("/predict", json={"instances": [{"pixels": pixels()}], "explain": False})
    assert r.status_code == 200
    assert set(r.json()["predictions"][0]) == {"label", "probabilities"}


def test_images_are_converted_to_the_models_channels_and_size(client: TestClient, victim: torch.nn.Module) -> None:
    gray = Image.fromarray((torch.rand(28, 28, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    colour_big = Image.new("RGB", (56, 70), (200, 30, 90))
    instances = [{"image_b64": encode(gray)}, {"image_b64": encode(colour_big)}, {"image_b64": encode(gray, "JPEG")}]
    r = client.post("/predict", json={"instances": instances})
    assert r.status_code == 200
    labels = [p["label"] for p in r.json()["predictions"]]
    x = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255).view(1, 1, 28, 28)
    probs = victim(x).softmax(-1)  # one image here, three in the server's batch: compared by a clear top-1
    assert top1_margin(probs).min() > 100 * PATH_ATOL, "a near-tie: the top-1 may differ by path"
    assert labels[0] == int(probs.argmax())
    assert len(labels) == 3


def test_not_ready_answers_503(tmp_path: Path, defense: NoDefense) -> None:
    app = create_app(make_settings(tmp_path, warmup=False), defense)
    runtime = app.state.runtime
    with TestClient(app) as client:
        runtime.state = "starting"  # as while the model loads and layer sensitivity is computed
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
        {"instances": [{"pixels": [[0.5]]}]}, 422, "invalid_type", "instances[0].pixels[0][0]", id="two-dimensional"
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
    import server.app
    from deepdefense.cli import build_parser, main

    seen: list[ServerSettings] = []
    monkeypatch.setattr(server.app, "serve", seen.append)
    monkeypatch.setenv("DD_PORT", "9000")
    monkeypatch.setenv("DD_DEFENSE", "dd-i")
    monkeypatch.setenv("DD_ENGINE", '{"steps": 10, "lr": 0.02}')
    assert main(["serve", "--defense", "none", "--set", "steps=3", "--queue-size", "5", "--no-warmup"]) == 0
    (s,) = seen
    assert (s.defense, s.port, s.queue_size, s.checkpoint, s.warmup) == ("none", 9000, 5, "lenet-mnist", False)
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
            assert f"default: {'none' if default is None else default};" in helps[name], name
            assert f"env DD_{name.upper()}" in helps[name] and (field.description or "") in helps[name], name


class _FailClosed(NoDefense):
    """Every answer is the documented safe answer, after a reported optimisation time."""

    name = "fake-dd"

    def answer(self, x: torch.Tensor, *, explain: bool = True) -> list:
        answers = super().answer(x, explain=explain)
        for a in answers:
            a.fallback, a.stats = True, {"optimisation_seconds": 0.02}
        return answers


def test_fallbacks_and_optimisation_time_are_counted(tmp_path: Path, victim: torch.nn.Module) -> None:
    fail_closed = _FailClosed(victim, create_interpreter("gradcam", victim, SHAPE))
    with serving(create_app(make_settings(tmp_path, warmup=False), fail_closed)) as client:
        r = client.post("/predict", json={"instances": [{"pixels": pixels(0)}, {"pixels": pixels(1)}]})
        assert r.status_code == 200 and r.json()["defense"] == "fake-dd"
        metrics = client.get("/metrics").text
    assert 'dd_defense_fallbacks_total{defense="fake-dd"} 2.0' in metrics
    assert 'dd_defense_optimisation_seconds_count{defense="fake-dd"} 2.0' in metrics
    assert 'dd_answers_total{defense="fake-dd"} 2.0' in metrics


def test_a_defense_that_cannot_be_built_never_becomes_ready(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, interpreter="no-such-interpreter"))) as client:
        deadline = time.monotonic() + 30
        while client.app.state.runtime.state == "starting":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = client.get("/readyz")
        assert r.status_code == 503 and "failed" in error_of(r)["message"]
        assert "no-such-interpreter" not in r.text
        assert client.get("/healthz").status_code == 200
