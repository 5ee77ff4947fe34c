"""The real defended path at small scale: ``lenet-mnist`` through DeepDefense (Grad-CAM, a short
optimisation) over loopback HTTP, with valid, edge-case and hostile requests. The answers are
finite distributions that keep the victim's top-1, are not the victim's own outputs, and nothing
hostile gets past the 4xx line."""

from __future__ import annotations

import base64
import gzip
import io
import json
from collections.abc import Iterator

import httpx
import pytest
import torch
from PIL import Image
from support.images import png_bomb
from support.numerics import CHANGED
from support.servers import metric_value
from support.settings import make_settings

from deepdefense.defense.engine import DeepDefense
from deepdefense.measure.launcher import in_thread
from deepdefense.server.app import create_app
from deepdefense.server.runtime import build_defense
from deepdefense.server.settings import ServerSettings

pytestmark = pytest.mark.usefixtures("no_server_env")

SHORT = {"steps": 2}  # a short optimisation: this is about the serving path, not the defense's quality


@pytest.fixture(scope="module")
def defended() -> DeepDefense:
    """DeepDefense as the server builds it; an engine that cannot be built (or ignores ``steps``) fails the tests."""
    defense = build_defense(
        ServerSettings(defense="deepdefense", gate="none", engine=SHORT), "lenet-mnist", torch.device("cpu")
    )
    assert isinstance(defense, DeepDefense) and defense.config.steps == SHORT["steps"], f"built {defense!r}"
    return defense


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, defended: DeepDefense) -> Iterator[str]:
    settings = make_settings(
        tmp_path_factory.mktemp("defended"), defense="deepdefense", max_batch_wait_ms=20, request_timeout_s=300
    )
    with in_thread(create_app(settings, defended), like_serve=True) as base:
        yield base


def queries() -> torch.Tensor:
    x = torch.rand((4, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    x[2] = 0.0  # a constant image: the victim's map is flat, the engine must still answer (or fall back)
    x[3] = 1.0
    return x


def test_defended_answers_keep_the_top_1_and_are_not_the_victims(url: str, defended: DeepDefense) -> None:
    x = queries()
    png = io.BytesIO()
    Image.fromarray((x[0, 0] * 255).round().byte().numpy()).save(png, format="PNG")
    instances = [{"pixels": xi.tolist()} for xi in x] + [{"image_b64": base64.b64encode(png.getvalue()).decode()}]
    with httpx.Client(base_url=url, timeout=300) as c:
        r = c.post("/predict", json={"instances": instances, "explain": True})
        models = c.get("/v1/models").json()["models"][0]
        metrics = c.get("/metrics").text
    assert r.status_code == 200 and r.json()["defense"] == "deepdefense"
    predictions = r.json()["predictions"]
    victim = defended.model
    with torch.no_grad():
        own = victim(torch.cat([x, x[:1]])).softmax(-1)
    for prediction, mine in zip(predictions, own, strict=True):
        p = torch.tensor(prediction["probabilities"])
        assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-3
        assert prediction["label"] == int(mine.argmax()) == int(p.argmax())
        # `mine` is the victim's raw output along another path (one batch of 5 here): a leak of it would be
        # within rounding (~1e-6 relative); a defended answer is ≥ 0.1 relative away (support/numerics.py)
        assert not torch.allclose(p, mine, rtol=CHANGED, atol=0), "the victim's own probabilities were sent"
        values = torch.tensor(prediction["attribution"]["values"])
        assert values.shape == (28, 28) and torch.isfinite(values).all()
    # the five answers of this request, each from the engine's optimisation (the warm-up is not counted)
    assert metric_value(metrics, 'dd_answers_total{defense="deepdefense"}') == 5
    assert metric_value(metrics, 'dd_defense_optimisation_seconds_count{defense="deepdefense"}') == 5
    settings = models["defense"]["settings"]
    assert "seed" not in settings
    assert all(
        isinstance(v, int | float | str | bool) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
        for v in settings.values()
    )


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        pytest.param(
            '{"instances": [{"pixels": [[' + ", ".join(["[" + ", ".join(["NaN"] * 28) + "]"] * 28) + "]]}]}",
            {},
            422,
            id="nan-pixels",
        ),
        pytest.param(
            json.dumps({"instances": [{"image_b64": png_bomb(50_000, 50_000)}]}),
            {},
            413,
            id="png-declaring-50000x50000",
        ),
        pytest.param(
            gzip.compress(json.dumps({"instances": []}).encode()), {"Content-Encoding": "gzip"}, 415, id="gzip"
        ),
        pytest.param("[" * 50_000 + "]" * 50_000, {}, 400, id="deep-json"),
        pytest.param(json.dumps({"instances": [{"pixels": [[[0.5] * 28] * 28] * 3}]}), {}, 422, id="three-channels"),
    ],
)
def test_hostile_requests_stop_before_the_defense(
    url: str, content: str | bytes, headers: dict[str, str], status: int
) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        before = metric_value(c.get("/metrics").text, 'dd_answers_total{defense="deepdefense"}')
        r = c.post("/predict", content=content, headers={"Content-Type": "application/json"} | headers)
        after = metric_value(c.get("/metrics").text, 'dd_answers_total{defense="deepdefense"}')
    assert r.status_code == status and set(r.json()) == {"error"}
    assert after == before  # refused before any optimisation ran
