"""``deepdefense client``, the benign user, against uvicorn on loopback: undefended and behind PP
(which keeps the argmax, so a benign user's labels do not change)."""

from __future__ import annotations

import json
from pathlib import Path

from support.settings import loopback_settings

from deepdefense.cli import main
from deepdefense.clients.benign import latency_summary
from deepdefense.defense.baselines.pp import PredictionPoisoning
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.measure.launcher import in_thread
from deepdefense.models.checkpoint import load_checkpoint
from deepdefense.server.app import create_app


def run_client(url: str, data_root: Path, out: Path) -> dict:
    rc = main(
        [
            "client",
            "--url",
            url,
            "--data-root",
            str(data_root),
            "--n",
            "24",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def test_benign_client_against_the_undefended_server(data_root: Path, tmp_path: Path) -> None:
    with in_thread(create_app(loopback_settings(tmp_path))) as url:
        report = run_client(url, data_root, tmp_path / "none.json")
    assert report["defense"] == "none" and report["dataset"] == "mnist"
    assert report["n"] == 24 and report["requests"] == 6 and report["explain"] is True
    assert report["agreement_undefended"] == 100.0 and report["accuracy"] >= 90.0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert report["command"].startswith("deepdefense client --url")
    assert report["top1_probability"] == report["top1_probability_undefended"], "undefended: the victim's answers"
    tail = report["top1_probability"]
    assert 0 < tail["min"] <= tail["p10"] <= tail["p25"] <= tail["median"] <= 1


def test_benign_client_behind_prediction_poisoning(data_root: Path, tmp_path: Path) -> None:
    model, meta = load_checkpoint("lenet-mnist")
    model.requires_grad_(False)
    pp = PredictionPoisoning(model, create_interpreter("gradcam", model, tuple(meta.input_shape)))
    with in_thread(create_app(loopback_settings(tmp_path), pp)) as url:
        report = run_client(url, data_root, tmp_path / "pp.json")
    assert report["defense"] == "pp" and report["agreement_undefended"] == 100.0


def test_latency_percentiles() -> None:
    summary = latency_summary([i / 1000 for i in range(1, 101)])
    assert summary == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0, "mean": 50.5}
