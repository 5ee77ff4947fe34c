"""200 concurrent requests leave the victim's weights byte-identical, and every answer keeps the
victim's own top-1. Served through DeepDefense, built as the server builds it: a defense that cannot be
built fails this test (it never falls back to ``none``, which would make any engine pass)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from support.numerics import PATH_ATOL, top1_margin
from support.servers import metric_value, serving
from support.settings import make_settings

from deepdefense.defense.engine import DeepDefense
from deepdefense.server.app import create_app
from deepdefense.server.runtime import build_defense
from deepdefense.server.settings import ServerSettings

pytestmark = pytest.mark.usefixtures("no_server_env")

REQUESTS = 200
FAST_ENGINE = {"steps": 2}  # a short optimisation: this test is about isolation, not defense quality


def served_defense() -> DeepDefense:
    """The server's own loading path; any error building the engine is this test's failure."""
    defense = build_defense(
        ServerSettings(defense="deepdefense", gate="none", engine=FAST_ENGINE), "lenet-mnist", torch.device("cpu")
    )
    assert isinstance(defense, DeepDefense) and defense.name == "deepdefense", f"built {defense!r}, not DeepDefense"
    assert defense.config.steps == FAST_ENGINE["steps"]
    return defense


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_concurrent_requests_never_touch_the_victim(tmp_path: Path) -> None:
    defense = served_defense()
    victim = defense.model
    before = weights_digest(victim)
    images = torch.rand((REQUESTS, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probabilities = victim(images).softmax(-1)
    # one batch of 200 here, micro-batches of up to 8 in the server: labels compared exactly because no
    # top-1 is anywhere near a tie that rounding along another path could flip
    assert top1_margin(probabilities).min() > 100 * PATH_ATOL, "a near-tie: the top-1 may differ by path"
    expected = probabilities.argmax(1).tolist()
    settings = make_settings(
        tmp_path,
        defense="deepdefense",
        max_batch_size=8,
        max_batch_wait_ms=2,
        queue_size=REQUESTS,
        request_timeout_s=600,
        max_expected_latency_s=600,
    )
    with serving(create_app(settings, defense)) as client, ThreadPoolExecutor(32) as pool:
        responses = list(
            pool.map(
                lambda x: client.post("/predict", json={"instances": [{"pixels": x.tolist()}], "explain": True}), images
            )
        )
        metrics = client.get("/metrics").text
    assert [r.status_code for r in responses] == [200] * REQUESTS
    # every answer went through the engine's optimisation, not some other path (the warm-up is not counted)
    optimised = metric_value(metrics, 'dd_defense_optimisation_seconds_count{defense="deepdefense"}')
    assert optimised == REQUESTS, f"{optimised} answers optimised by DeepDefense, expected {REQUESTS}"
    for r, label in zip(responses, expected, strict=True):
        body = r.json()
        assert body["defense"] == "deepdefense"
        (prediction,) = body["predictions"]
        assert prediction["label"] == label
        assert max(range(10), key=prediction["probabilities"].__getitem__) == label
    assert weights_digest(victim) == before, "identity is the property: no request may change the victim's weights"
    assert all(not p.requires_grad for p in victim.parameters())
