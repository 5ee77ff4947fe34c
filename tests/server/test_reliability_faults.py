"""Faults: a query that makes the defense raise or answer NaN/Inf fails alone (the rest of its
micro-batch is answered), fallbacks and failures are counted, a failed query is not charged and
reveals nothing; a corrupt or mismatched checkpoint is refused before the server listens."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from support.fakes import batcher as fake_batcher
from support.faults import FALLBACK, INF_MAP, NAN, RAISE, SHAPE, FaultyDefense, marked
from support.servers import bearer, error_of, metric_value, serving, wait_until
from support.settings import make_settings

from deepdefense.defense import Answer, NoDefense
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.models.artifacts import sha256_file
from deepdefense.models.checkpoint import SHIPPED_DIR
from deepdefense.server.app import create_app
from deepdefense.server.batcher import DefenseFailed
from deepdefense.server.metrics import ServerMetrics

pytestmark = pytest.mark.usefixtures("no_server_env")

KEY = "fault-key-0123456789"


@pytest.fixture
def faulty(victim: torch.nn.Module) -> FaultyDefense:
    return FaultyDefense(victim)


async def submit_together(defense: FaultyDefense, queries: list[torch.Tensor], **options: Any) -> list[Any]:
    """Submit one-instance requests at the same moment, so that they share one micro-batch."""
    metrics = ServerMetrics().model("lenet-mnist", defense=defense.name, interpreter="gradcam", device="cpu")
    batcher = fake_batcher(
        defense, metrics, max_batch=len(queries), max_wait=5.0, timeout=30.0, max_latency=30.0, **options
    )
    batcher.start()
    try:
        results = await asyncio.gather(
            *(batcher.submit(q.unsqueeze(0), explain=True) for q in queries), return_exceptions=True
        )
    finally:
        await batcher.stop()
    return [r if isinstance(r, BaseException) else r[0] for r in results] + [metrics]


def test_a_raising_query_fails_alone_and_the_batch_is_answered(faulty: FaultyDefense) -> None:
    queries = [marked(0.9, 1), marked(RAISE, 2), marked(0.9, 3), marked(0.9, 4)]
    *results, metrics = asyncio.run(submit_together(faulty, queries))
    assert faulty.calls == [4, 1, 1, 1, 1]  # the batch, then each instance alone
    assert isinstance(results[1], DefenseFailed) and results[1].reason == "exception"
    victim = faulty.model  # labels compared exactly: each retried query ran alone, and no top-1 is near a tie
    for i in (0, 2, 3):
        assert isinstance(results[i], Answer)
        assert results[i].label == int(victim(queries[i].unsqueeze(0)).argmax())
    text = metrics.registry
    assert (
        text.get_sample_value(
            "dd_defense_failures_total", {"model": "lenet-mnist", "defense": "faulty-fake", "reason": "exception"}
        )
        == 1
    )
    assert text.get_sample_value("dd_batch_isolation_retries_total", {"model": "lenet-mnist"}) == 1
    assert text.get_sample_value("dd_answers_total", {"model": "lenet-mnist", "defense": "faulty-fake"}) == 3


def test_non_finite_answers_fail_alone_and_fallbacks_are_counted(faulty: FaultyDefense) -> None:
    queries = [marked(0.9, 1), marked(NAN, 2), marked(INF_MAP, 3), marked(FALLBACK, 4)]
    *results, metrics = asyncio.run(submit_together(faulty, queries))
    assert faulty.calls == [4]  # nothing raised: no retry, the bad answers are simply not sent
    assert isinstance(results[0], Answer) and not results[0].fallback
    assert [type(r) for r in results[1:3]] == [DefenseFailed, DefenseFailed]
    assert {r.reason for r in results[1:3]} == {"invalid_answer"}
    assert isinstance(results[3], Answer) and results[3].fallback
    r = metrics.registry
    assert (
        r.get_sample_value(
            "dd_defense_failures_total", {"model": "lenet-mnist", "defense": "faulty-fake", "reason": "invalid_answer"}
        )
        == 2
    )
    assert r.get_sample_value("dd_defense_fallbacks_total", {"model": "lenet-mnist", "defense": "faulty-fake"}) == 1
    assert r.get_sample_value("dd_answers_total", {"model": "lenet-mnist", "defense": "faulty-fake"}) == 2


class _ShortDefense(NoDefense):
    """Answers a batch of several queries with one answer too few (a broken batched engine)."""

    name = "short-fake"

    def answer(self, x: torch.Tensor, *, explain: bool = True) -> list[Answer]:
        answers = super().answer(x, explain=explain)
        return answers[:-1] if len(x) > 1 else answers


def test_a_wrong_number_of_answers_is_retried_one_by_one(victim: torch.nn.Module) -> None:
    short = _ShortDefense(victim, create_interpreter("gradcam", victim, SHAPE))
    queries = [marked(0.9, i) for i in range(3)]
    *results, metrics = asyncio.run(submit_together(short, queries))  # type: ignore[arg-type]
    assert all(isinstance(r, Answer) for r in results)
    assert [r.label for r in results] == [int(victim(q.unsqueeze(0)).argmax()) for q in queries]
    assert metrics.registry.get_sample_value("dd_batch_isolation_retries_total", {"model": "lenet-mnist"}) == 1


def test_over_http_the_failed_request_gets_a_generic_500_is_refunded_and_the_server_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, faulty: FaultyDefense
) -> None:
    monkeypatch.setenv("DD_API_KEYS", KEY)
    settings = make_settings(tmp_path, query_budget=3, warmup=False)
    with serving(create_app(settings, faulty)) as client:

        def post(*markers: float) -> Any:
            instances = [{"pixels": marked(m, i).tolist()} for i, m in enumerate(markers)]
            return client.post("/predict", json={"instances": instances}, headers=bearer(KEY))

        for bad in ((0.9, RAISE), (NAN,), (0.9, INF_MAP)):
            r = post(*bad)
            assert r.status_code == 500 and error_of(r)["code"] == "defense_failed"
            for leak in ("srv", "safetensors", "tensor", "nan", "inf", "probabilities", "diverged"):
                assert leak not in r.text.lower()
        r = post(FALLBACK)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == 0
        assert post(0.9, 0.9).status_code == 200  # the budget of 3 is whole: the failures were refunded
        assert post(0.9).status_code == 429
        metrics = client.get("/metrics").text
    assert metric_value(metrics, 'dd_defense_failures_total{defense="faulty-fake",reason="exception"}') == 1
    assert metric_value(metrics, 'dd_defense_failures_total{defense="faulty-fake",reason="invalid_answer"}') == 2
    assert metric_value(metrics, 'dd_defense_fallbacks_total{defense="faulty-fake"}') == 1
    assert metric_value(metrics, 'dd_http_requests_total{method="POST",route="/predict",status="500"}') == 3


class _AlwaysNaN(NoDefense):
    name = "nan-fake"

    def answer(self, x: torch.Tensor, *, explain: bool = True) -> list[Answer]:
        answers = super().answer(x, explain=explain)
        for a in answers:
            a.probabilities = a.probabilities * float("nan")
        return answers


def test_a_defense_whose_warm_up_answer_is_unusable_never_becomes_ready(
    tmp_path: Path, victim: torch.nn.Module
) -> None:
    broken = _AlwaysNaN(victim, create_interpreter("gradcam", victim, SHAPE))
    app = create_app(make_settings(tmp_path), broken)
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        runtime = app.state.runtime
        wait_until(lambda: runtime.phase != "starting", timeout=60)
        assert runtime.phase == "failed" and "not finite" in (runtime.failure or "")
        r = client.post("/predict", json={"instances": [{"pixels": marked(0.9).tolist()}]})
        assert r.status_code == 503 and error_of(r)["code"] == "not_ready"


# -- checkpoints refused at start-up ---------------------------------------------------------------------


def copy_checkpoint(tmp_path: Path, name: str = "lenet-mnist") -> tuple[Path, Path]:
    meta = tmp_path / f"{name}.json"
    weights = tmp_path / f"{name}.safetensors"
    shutil.copy(SHIPPED_DIR / "lenet-mnist.json", meta)
    shutil.copy(SHIPPED_DIR / "lenet-mnist.safetensors", weights)
    data = json.loads(meta.read_text())
    data["weights"] = weights.name
    meta.write_text(json.dumps(data))
    return meta, weights


def flip_a_byte(meta: Path, weights: Path) -> None:
    raw = bytearray(weights.read_bytes())
    raw[-7] ^= 0xFF
    weights.write_bytes(bytes(raw))


def five_classes(meta: Path, weights: Path) -> None:
    """Metadata that disagrees with the weights, with a valid sha256: the shapes do not fit."""
    data = json.loads(meta.read_text())
    data["classes"] = data["classes"][:5]
    meta.write_text(json.dumps(data))


def other_architecture(meta: Path, weights: Path) -> None:
    data = json.loads(meta.read_text())
    data["arch"] = "wrn16_4"
    meta.write_text(json.dumps(data))


def not_safetensors(meta: Path, weights: Path) -> None:
    weights.write_bytes(b"\x80\x04pickle-or-anything-else" * 64)
    data = json.loads(meta.read_text())
    data["sha256"] = sha256_file(weights)
    meta.write_text(json.dumps(data))


def missing_weights(meta: Path, weights: Path) -> None:
    weights.unlink()


def malformed_metadata(meta: Path, weights: Path) -> None:
    meta.write_text('{"arch": "lenet", ')


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (flip_a_byte, "sha256"),
        (five_classes, "do not fit"),
        (other_architecture, "do not fit"),
        (not_safetensors, "do not fit"),
        (missing_weights, "missing"),
        (malformed_metadata, "malformed"),
    ],
)
def test_a_bad_checkpoint_is_refused_before_listening(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any, message: str
) -> None:
    import uvicorn

    from deepdefense.cli import main

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the server started listening on a bad checkpoint")

    monkeypatch.setattr(uvicorn.Server, "run", never)
    meta, weights = copy_checkpoint(tmp_path)
    damage(meta, weights)
    assert (
        main(["serve", "--checkpoint", str(meta), "--defense", "none", "--budget-db", str(tmp_path / "b.sqlite")]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("deepdefense serve: error:") and message in err and len(err.splitlines()) == 1


def test_a_defense_that_cannot_be_prepared_stops_the_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Failing after it listens (here: an unknown interpreter), the server exits instead of
    answering 503 for ever, and says why."""
    from deepdefense.cli import main

    monkeypatch.setenv("DD_LOG_LEVEL", "critical")
    rc = main(
        [
            "serve",
            "--defense",
            "none",
            "--interpreter",
            "no-such-interpreter",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--budget-db",
            str(tmp_path / "b.sqlite"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "could not prepare lenet-mnist" in err and "no-such-interpreter" in err
