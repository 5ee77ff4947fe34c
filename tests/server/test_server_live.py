"""The real thing: uvicorn on a loopback port, httpx over TCP, PNG and pixel requests, and the
latency histogram read back from /metrics."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from support.settings import make_settings

from deepdefense.measure.launcher import in_thread
from deepdefense.server.app import create_app

pytestmark = pytest.mark.usefixtures("no_server_env")


@pytest.fixture
def base_url(tmp_path: Path) -> Iterator[str]:
    """A server built the way ``deepdefense serve`` builds it (here with defense ``none``)."""
    with in_thread(create_app(make_settings(tmp_path))) as url:
        yield url


def test_png_and_pixels_over_tcp(base_url: str) -> None:
    image = Image.fromarray((torch.rand(28, 28, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    pixels = torch.rand((1, 28, 28), generator=torch.Generator().manual_seed(1)).tolist()
    with httpx.Client(base_url=base_url, timeout=30) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        r = client.post("/predict", json={"instances": [{"image_b64": png}], "explain": True})
        assert r.status_code == 200
        assert r.json()["predictions"][0]["attribution"]["shape"] == [28, 28]
        r = client.post("/predict", json={"instances": [{"pixels": pixels}, {"image_b64": png}], "explain": False})
        assert r.status_code == 200 and r.json()["defense"] == "none"
        assert len(r.json()["predictions"]) == 2
        metrics = client.get("/metrics")
    assert metrics.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    latency = families["dd_http_request_duration_seconds"]
    count = next(s.value for s in latency.samples if s.name.endswith("_count") and s.labels["route"] == "/predict")
    buckets = [s for s in latency.samples if s.name.endswith("_bucket") and s.labels["route"] == "/predict"]
    assert count == 2
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 2
    answers = next(s.value for s in families["dd_answers"].samples if s.name == "dd_answers_total")
    assert answers == 3
