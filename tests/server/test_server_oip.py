"""The Open Inference Protocol (KServe v2) next to ``/predict``, through FastAPI's TestClient with defense
``none``: metadata and health, an infer round trip that answers what ``/predict`` answers, JSON (flat or
nested, FP32 or FP64) and binary data, output selection (maps only when asked for), every class of bad
input, keys and budgets; and the real Triton client (``tritonclient.http``) against a server on loopback."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from support.fakes import GatedDefense
from support.images import pixels
from support.servers import bearer, error_of, key_id_of, metric_value, serving, wait_until
from support.settings import make_settings

from deepdefense.defense import NoDefense
from deepdefense.measure.launcher import in_thread
from deepdefense.models.checkpoint import SHIPPED_DIR, read_meta
from deepdefense.models.data import load_split
from deepdefense.server.app import create_app

pytestmark = pytest.mark.usefixtures("no_server_env")

MODEL = "lenet-mnist"
INFER = f"/v2/models/{MODEL}/infer"
KEY = "oip-key-0123456789abcdef"
ATOL = 1e-5  # /predict and infer run the same code on the same tensors: equal in practice, compared within this


@pytest.fixture
def client(tmp_path: Path, defense: NoDefense) -> Iterator[TestClient]:
    with serving(create_app(make_settings(tmp_path, max_instances=4), defense)) as c:
        yield c


def image_input(images: list[Any], datatype: str = "FP32", nested: bool = False) -> dict[str, Any]:
    """The ``image`` input of a batch of C×H×W nested lists, its data flat (or as given, ``nested``)."""
    x = torch.tensor(images, dtype=torch.float64)
    data = images if nested else x.reshape(-1).tolist()
    return {"name": "image", "shape": list(x.shape), "datatype": datatype, "data": data}


def infer_body(images: list[Any], outputs: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [image_input(images)], **extra}
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def by_name(response: Any) -> dict[str, dict[str, Any]]:
    return {output["name"]: output for output in response.json()["outputs"]}


def binary_body(x: np.ndarray, datatype: str = "FP32", **header: Any) -> tuple[bytes, dict[str, str]]:
    """A body in Triton's binary tensor data extension: JSON, then the tensor's little-endian bytes."""
    raw = x.astype({"FP32": "<f4", "FP64": "<f8"}[datatype]).tobytes()
    tensor = {
        "name": "image",
        "shape": list(x.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw)},
    }
    head = json.dumps({"inputs": [tensor], **header}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


# -- metadata and health -------------------------------------------------------------------------------------------


def test_health_and_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    server = client.get("/v2").json()
    assert server["name"] == "deepdefense" and server["extensions"] == ["binary_tensor_data"]
    assert client.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    sha256 = read_meta(SHIPPED_DIR / f"{MODEL}.json").sha256
    version = hashlib.sha256(b"deepdefense model version\0" + sha256.encode()).hexdigest()[:12]
    assert client.get(f"/v2/models/{MODEL}").json() == {
        "name": MODEL,
        "versions": [version],
        "platform": "pytorch",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "class_name", "datatype": "BYTES", "shape": [-1]},
            {"name": "attribution", "datatype": "FP32", "shape": [-1, 28, 28]},
        ],
        "classes": [str(digit) for digit in range(10)],
    }
    assert client.get(f"/v2/models/{MODEL}/config").json() == {
        "name": MODEL,
        "platform": "pytorch",
        "max_batch_size": 4,
        "input": [{"name": "image", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}],
        "output": [
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]},
            {"name": "label", "data_type": "TYPE_INT64", "dims": [1]},
            {"name": "class_name", "data_type": "TYPE_STRING", "dims": [1]},
            {"name": "attribution", "data_type": "TYPE_FP32", "dims": [28, 28]},
        ],
    }
    info = client.get(f"/v1/models/{MODEL}").json()
    assert info == client.get("/v1/models").json()["models"][0]
    assert info["version"] == version and sha256[:12] not in json.dumps(info)  # not the weights file's digest
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model_name}/ready",
        "/v2/models/{model_name}/config",
        "/v1/models/{model_name}",
        INFER.replace(MODEL, "{model_name}"),
    } <= set(paths)


def test_an_unknown_model_is_404(client: TestClient) -> None:
    for r in (
        client.get("/v2/models/resnet-imagenet"),
        client.get("/v2/models/resnet-imagenet/ready"),
        client.get("/v2/models/resnet-imagenet/config"),
        client.post("/v2/models/resnet-imagenet/infer", json=infer_body([pixels()])),
        client.get("/v1/models/resnet-imagenet"),
    ):
        assert r.status_code == 404
        error = error_of(r)
        assert (error["code"], error["field"]) == ("model_not_found", "model_name")
        assert MODEL in error["message"]


def test_while_starting_readiness_and_infer_answer_503(tmp_path: Path, gated: GatedDefense) -> None:
    app = create_app(make_settings(tmp_path, retry_after_s=3), gated)
    gated.gate.clear()  # the warm-up waits at the gate
    with TestClient(app) as client:
        try:
            assert gated.entered.wait(10)
            starting = {
                "error": "the model lenet-mnist is still loading (not_ready)",
                "code": "not_ready",
                "field": None,
            }
            for r in (
                client.get("/v2/health/ready"),
                client.get(f"/v2/models/{MODEL}/ready"),
                client.get(f"/v2/models/{MODEL}"),
                client.get(f"/v2/models/{MODEL}/config"),
                client.post(INFER, json=infer_body([pixels()])),
            ):
                assert r.status_code == 503 and r.headers["Retry-After"] == "3" and r.json() == starting
            assert client.get("/v2/health/live").status_code == 200
            gated.gate.set()
            wait_until(lambda: client.get("/v2/health/ready").status_code == 200)
            assert client.post(INFER, json=infer_body([pixels()])).status_code == 200
        finally:
            gated.gate.set()


# -- infer -----------------------------------------------------------------------------------------------------------


def test_infer_answers_what_predict_answers(client: TestClient) -> None:
    images = [pixels(0), pixels(1)]
    predicted = client.post("/predict", json={"instances": [{"pixels": p} for p in images], "explain": True})
    assert predicted.status_code == 200
    r = client.post(INFER, json=infer_body(images, id="request-7"))
    assert r.status_code == 200
    body = r.json()
    assert (body["model_name"], body["id"], body["parameters"]) == (MODEL, "request-7", {"defense": "none"})
    assert body["model_version"] == predicted.json()["model_version"]
    assert [o["name"] for o in body["outputs"]] == ["probabilities", "label", "class_name", "attribution"]
    outputs = by_name(r)
    predictions = predicted.json()["predictions"]
    assert outputs["label"] == {
        "name": "label",
        "datatype": "INT64",
        "shape": [2],
        "data": [p["label"] for p in predictions],
    }
    assert outputs["class_name"] == {
        "name": "class_name",
        "datatype": "BYTES",
        "shape": [2],
        "data": [p["class_name"] for p in predictions],
    }
    assert [p["class_name"] for p in predictions] == [str(p["label"]) for p in predictions]  # MNIST's classes
    probs = outputs["probabilities"]
    assert (probs["datatype"], probs["shape"]) == ("FP32", [2, 10])
    expected = torch.tensor([p["probabilities"] for p in predictions])
    torch.testing.assert_close(torch.tensor(probs["data"]).reshape(2, 10), expected, rtol=0, atol=ATOL)
    maps = outputs["attribution"]
    assert (maps["datatype"], maps["shape"], maps["parameters"]) == ("FP32", [2, 28, 28], {"method": "gradcam"})
    expected_maps = torch.tensor([p["attribution"]["values"] for p in predictions])
    torch.testing.assert_close(torch.tensor(maps["data"]).reshape(2, 28, 28), expected_maps, rtol=0, atol=ATOL)


def test_nested_fp64_and_binary_data_give_the_same_answer(client: TestClient) -> None:
    images = [pixels(2), pixels(3)]
    flat = client.post(INFER, json=infer_body(images, outputs=["probabilities"])).json()["outputs"]
    nested = {"inputs": [image_input(images, "FP64", nested=True)], "outputs": [{"name": "probabilities"}]}
    assert client.post(INFER, json=nested).json()["outputs"] == flat
    x = np.asarray(images)
    for datatype in ("FP32", "FP64"):
        body, headers = binary_body(
            x, datatype, outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}]
        )
        # tritonclient.http sends no Content-Type, its asyncio client application/octet-stream
        for content_type in ({}, {"Content-Type": "application/octet-stream"}):
            r = client.post(INFER, content=body, headers=headers | content_type)
            assert r.status_code == 200, r.text
            torch.testing.assert_close(
                torch.tensor(r.json()["outputs"][0]["data"]), torch.tensor(flat[0]["data"]), rtol=0, atol=ATOL
            )


def test_maps_are_computed_only_when_asked_for(tmp_path: Path, gated: GatedDefense) -> None:
    with serving(create_app(make_settings(tmp_path), gated)) as client:
        for outputs, explain in (
            (["label"], False),
            (["probabilities", "label"], False),
            (["attribution", "label"], True),
            (None, True),
        ):
            r = client.post(INFER, json=infer_body([pixels()], outputs=outputs))
            assert r.status_code == 200
            assert [o["name"] for o in r.json()["outputs"]] == (
                outputs or ["probabilities", "label", "class_name", "attribution"]
            )
            assert gated.batches[-1] == (1, explain), outputs


# -- refusals --------------------------------------------------------------------------------------------------------


def refused(response: Any, status: int, code: str, field: str | None) -> None:
    assert response.status_code == status, response.text
    error = error_of(response)
    assert (error["code"], error["field"]) == (code, field)


@pytest.mark.parametrize("value", [1.5, -0.5])
def test_json_and_binary_data_are_held_to_one_pixel_rule(client: TestClient, value: float) -> None:
    """The image input's values meet the rule of ``pixels`` whether they come as JSON or as binary data: the same
    refusal, message included, naming the same element."""
    x = np.full((1, 1, 28, 28), 0.5)
    x[0, 0, 3, 4] = value
    as_json = client.post(INFER, json=infer_body(x.tolist()))
    body, headers = binary_body(x)
    as_binary = client.post(INFER, content=body, headers=headers)
    refused(as_json, 422, "out_of_range", "inputs[0].data[88]")
    assert as_binary.json() == as_json.json()


def test_bad_inputs_are_refused(client: TestClient) -> None:
    one = pixels()
    refused(client.post(INFER, json=infer_body([pixels(shape=(1, 27, 28))])), 422, "invalid_shape", "inputs[0].shape")
    refused(client.post(INFER, json=infer_body([pixels(shape=(3, 28, 28))])), 422, "invalid_shape", "inputs[0].shape")
    short = infer_body([one])
    short["inputs"][0]["data"] = short["inputs"][0]["data"][:-1]
    refused(client.post(INFER, json=short), 422, "invalid_shape", "inputs[0].data")
    bright = infer_body([one])
    bright["inputs"][0]["data"][5] = 1.5
    refused(client.post(INFER, json=bright), 422, "out_of_range", "inputs[0].data[5]")
    bright["inputs"][0]["data"][5] = -0.1
    refused(client.post(INFER, json=bright), 422, "out_of_range", "inputs[0].data[5]")
    body, headers = binary_body(np.full((1, 1, 28, 28), np.nan))
    refused(client.post(INFER, content=body, headers=headers), 422, "not_finite", "inputs[0].data[0]")
    body, headers = binary_body(np.full((1, 1, 28, 28), 2.0))
    refused(client.post(INFER, content=body, headers=headers), 422, "out_of_range", "inputs[0].data[0]")
    refused(client.post(INFER, json=infer_body([one] * 5)), 413, "too_many_instances", "inputs[0].shape")
    empty = infer_body([one])
    empty["inputs"][0] |= {"shape": [0, 1, 28, 28], "data": []}
    refused(client.post(INFER, json=empty), 422, "empty", "inputs[0].shape")
    deep = infer_body([one])
    deep["inputs"][0]["data"] = [[[[[0.5]]]]]
    refused(client.post(INFER, json=deep), 422, "invalid_value", "inputs[0].data")
    uint8 = infer_body([one])
    uint8["inputs"][0]["datatype"] = "UINT8"
    refused(client.post(INFER, json=uint8), 422, "literal_error", "inputs[0].datatype")
    renamed = infer_body([one])
    renamed["inputs"][0]["name"] = "input__0"
    refused(client.post(INFER, json=renamed), 400, "unknown_input", "inputs[0].name")
    twice = infer_body([one])
    twice["inputs"] *= 2
    refused(client.post(INFER, json=twice), 400, "duplicate_input", "inputs[1].name")
    refused(client.post(INFER, json=infer_body([one], outputs=["logits"])), 400, "unknown_output", "outputs[0].name")
    refused(
        client.post(INFER, json=infer_body([one], outputs=["label", "label"])),
        400,
        "duplicate_output",
        "outputs[1].name",
    )
    refused(client.post(INFER, json={"inputs": []}), 422, "empty", "inputs")
    refused(client.post(INFER, json=infer_body([one], extra=1)), 422, "unknown_field", "extra")
    refused(
        client.post(INFER, content=b'{"inputs": [', headers={"Content-Type": "application/json"}),
        400,
        "invalid_json",
        "body",
    )
    refused(
        client.post(INFER, content=b"{}", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
        "Content-Type",
    )
    body, headers = binary_body(np.zeros((1, 1, 28, 28)))
    refused(
        client.post(INFER, content=body[:-4], headers=headers),
        400,
        "invalid_binary_data",
        "inputs[0].parameters.binary_data_size",
    )
    refused(
        client.post(INFER, content=body, headers={"Inference-Header-Content-Length": str(len(body) + 1)}),
        400,
        "invalid_header",
        "Inference-Header-Content-Length",
    )


def test_the_commonest_mistakes_are_told_what_to_do(client: TestClient) -> None:
    def message(body: Any, **kwargs: Any) -> str:
        r = client.post(INFER, json=body, **kwargs) if "content" not in kwargs else client.post(INFER, **kwargs)
        assert r.status_code == 422, r.text
        return error_of(r)["message"]

    no_batch = infer_body([pixels()])
    no_batch["inputs"][0]["shape"] = [1, 28, 28]
    assert "add the batch dimension: shape [1, 1, 28, 28]" in message(no_batch)
    no_channel = infer_body([pixels()])
    no_channel["inputs"][0]["shape"] = [2, 28, 28]
    no_channel["inputs"][0]["data"] *= 2
    assert "add the channel dimension: shape [2, 1, 28, 28]" in message(no_channel)
    flat = infer_body([pixels()])
    flat["inputs"][0]["shape"] = [784]
    assert "say shape [1, 1, 28, 28]" in message(flat)
    eight_bit = infer_body([pixels()])
    eight_bit["inputs"][0]["data"] = [255.0] * 784
    assert "divide by 255" in message(eight_bit)
    body, headers = binary_body(np.full((1, 1, 28, 28), 255.0))
    assert "divide by 255" in message(None, content=body, headers=headers)


# -- keys, budgets ---------------------------------------------------------------------------------------------------


def test_keys_are_required_and_budgets_are_charged_per_instance(tmp_path: Path, defense: NoDefense) -> None:
    operator = "operator-key-for-metrics"
    app = create_app(make_settings(tmp_path, api_keys=KEY, admin_keys=operator, query_budget=3), defense)
    ledger = app.state.runtime.default.ledger
    with serving(app) as client:
        for r in (
            client.post(INFER, json=infer_body([pixels()])),
            client.post(INFER, json=infer_body([pixels()]), headers=bearer("wrong-key")),
            client.get(f"/v2/models/{MODEL}"),
            client.get(f"/v2/models/{MODEL}/ready"),
            client.get("/v2"),
        ):
            refused(r, 401, "unauthorized", "Authorization")
        assert client.get("/v2/health/live").status_code == 200 and client.get("/v2/health/ready").status_code == 200
        assert client.get(f"/v2/models/{MODEL}", headers=bearer(KEY)).status_code == 200
        assert ledger.remaining(key_id_of(app, KEY)) == 3
        assert client.post(INFER, json=infer_body([pixels(0), pixels(1)]), headers=bearer(KEY)).status_code == 200
        assert ledger.remaining(key_id_of(app, KEY)) == 1  # two instances, two queries
        r = client.post(INFER, json=infer_body([pixels(0), pixels(1)]), headers=bearer(KEY))
        refused(r, 429, "budget_exhausted", "Authorization")
        bad = infer_body([pixels(shape=(1, 28, 27))])
        assert client.post(INFER, json=bad, headers=bearer(KEY)).status_code == 422
        assert ledger.remaining(key_id_of(app, KEY)) == 1  # refusals spend nothing
        assert (
            client.post(INFER, json=infer_body([pixels()], outputs=["label"]), headers=bearer(KEY)).status_code == 200
        )
        assert ledger.remaining(key_id_of(app, KEY)) == 0
        metrics = client.get("/metrics", headers=bearer(operator)).text  # per-key series: operators only
    assert metric_value(metrics, f'dd_key_queries_total{{key="{key_id_of(app, KEY)}",model="lenet-mnist"}}') == 3
    assert 'dd_http_requests_total{method="POST",route="/v2/models/{model_name}/infer",status="200"} 2.0' in metrics


def test_an_error_while_building_the_answer_is_refunded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, defense: NoDefense
) -> None:
    import deepdefense.server.oip_codec as codec

    app = create_app(make_settings(tmp_path, api_keys=KEY, query_budget=2), defense)
    with serving(app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(codec, "encode_output", lambda *args: 1 / 0)
        r = client.post(INFER, json=infer_body([pixels(0), pixels(1)]), headers=bearer(KEY))
        assert r.status_code == 500 and error_of(r)["code"] == "internal_error"
        assert app.state.runtime.default.ledger.remaining(key_id_of(app, KEY)) == 2  # computed, but nothing was sent
        monkeypatch.undo()
        assert client.post(INFER, json=infer_body([pixels(0), pixels(1)]), headers=bearer(KEY)).status_code == 200


# -- the Triton client -----------------------------------------------------------------------------------------------


def test_the_triton_client_gets_predicts_label(tmp_path: Path, defense: NoDefense, data_root: Path) -> None:
    http = pytest.importorskip("tritonclient.http")
    utils = pytest.importorskip("tritonclient.utils")
    images, _ = load_split("mnist", str(data_root), "test")[:3]
    with in_thread(create_app(make_settings(tmp_path, api_keys=KEY), defense)) as url:
        predicted = httpx.post(
            f"{url}/predict", json={"instances": [{"pixels": x.tolist()} for x in images]}, headers=bearer(KEY)
        ).json()["predictions"]
        client = http.InferenceServerClient(url=url.removeprefix("http://"))
        try:
            headers = bearer(KEY)
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready(MODEL, headers=headers)
            assert client.get_server_metadata(headers=headers)["extensions"] == ["binary_tensor_data"]
            metadata = client.get_model_metadata(MODEL, headers=headers)
            assert metadata["inputs"][0]["shape"] == [-1, 1, 28, 28]
            (version,) = metadata["versions"]
            config = client.get_model_config(MODEL, headers=bearer(KEY))
            assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}]
            for i, prediction in enumerate(predicted):
                for binary in (True, False):  # binary tensor data (the client's default), and JSON
                    image = http.InferInput("image", [1, 1, 28, 28], "FP32")
                    image.set_data_from_numpy(images[i : i + 1].numpy(), binary_data=binary)
                    outputs = [http.InferRequestedOutput(name) for name in ("probabilities", "label", "class_name")]
                    # a fresh dict each time: the client writes Inference-Header-Content-Length into it
                    result = client.infer(MODEL, [image], outputs=outputs, headers=bearer(KEY))
                    assert result.as_numpy("label").tolist() == [prediction["label"]]
                    assert result.as_numpy("class_name").tolist() == [prediction["class_name"]]
                    assert result.get_response()["model_version"] == version
                    assert result.as_numpy("attribution") is None
                    probabilities = result.as_numpy("probabilities")
                    assert probabilities.shape == (1, 10) and probabilities.dtype == np.float32
                    np.testing.assert_allclose(probabilities[0], prediction["probabilities"], rtol=0, atol=ATOL)
            # refusals come in the protocol's error shape, a string the client hands over as the exception's message
            for refuse in (
                lambda: client.infer("resnet-imagenet", [image], headers=bearer(KEY)),
                lambda: client.get_model_config("resnet-imagenet", headers=bearer(KEY)),
            ):
                with pytest.raises(utils.InferenceServerException) as refusal:
                    refuse()
                assert refusal.value.status() == "404"
                assert refusal.value.message().endswith("(model_not_found, field model_name)")
                assert MODEL in str(refusal.value) and "model_not_found" in str(refusal.value)
        finally:
            client.close()
