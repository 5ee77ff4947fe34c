"""``deepdefense formats`` (measure/formats.py): the variants reach the model as the server decodes them, the
flags are counted as the served gate counts them, and the report names what the gate flags too often."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepdefense.cli import main
from deepdefense.measure.formats import (
    DEFAULT_LIMITS,
    VARIANTS,
    baseline_of,
    misinformed_answers,
    sent_instances,
    wilson,
)
from deepdefense.measure.formats_report import markdown
from deepdefense.server.images import instances_to_tensor

BY_NAME = {v.name: v for v in VARIANTS}


def digits(n: int = 4) -> torch.Tensor:
    """White strokes on black: a vertical bar per digit, in MNIST's value range."""
    x = torch.zeros((n, 1, 28, 28))
    x[:, :, 6:22, 12:16] = 1.0
    return x


def decoded(name: str, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    instances, invert = sent_instances(BY_NAME[name], x, torch.Generator().manual_seed(seed))
    return instances_to_tensor(instances, (1, 28, 28), DEFAULT_LIMITS, invert=invert)


def test_wilson_interval() -> None:
    assert wilson(0, 100)[0] == 0.0 and 0.03 < wilson(0, 100)[1] < 0.04
    low, high = wilson(50, 100)
    assert low < 0.5 < high and abs((0.5 - low) - (high - 0.5)) < 1e-12
    assert wilson(0, 0) == (0.0, 1.0)


def test_ink_on_paper_with_invert_reaches_the_model_as_the_digit() -> None:
    x = digits()
    on_paper = decoded("clean ink on paper, invert", x)
    assert (on_paper - x).abs().mean() < 0.02, "200×200 and back: the digit again, up to the two resizes"
    assert (decoded("clean white-on-black PNG", x) - on_paper).abs().max() <= 1 / 255 + 1e-6
    # exact: float32 pixels sent as Python floats (their exact values) read back to the same float32
    assert torch.equal(decoded("clean pixels", x), x)
    not_inverted = decoded("clean ink on paper, no invert", x)
    assert (not_inverted - (1 - x)).abs().mean() < 0.02, "without the option the model sees ink on paper"


def test_every_variant_is_seeded() -> None:
    x = digits(2)
    for variant in VARIANTS:
        # exact: the same seeded variant made twice along the same path
        assert torch.equal(decoded(variant.name, x, seed=3), decoded(variant.name, x, seed=3)), variant.name


def test_a_photographed_page_stays_grey_after_invert() -> None:
    background = decoded("photographed page, invert", digits(8))[..., :4, :4].mean()
    assert 0.05 < float(background) < 0.35, "invert does not stretch contrast: grey paper becomes dark grey"


def test_misinformed_answers_sums_the_counter() -> None:
    page = 'x 1\ndd_misinformed_answers_total{defense="none"} 3.0\ndd_misinformed_answers_created 1.7e9\n'
    assert misinformed_answers(page) == 3


def record(rates: dict[str, float]) -> dict:
    rows = [
        {
            "name": name,
            "description": f"{name} as sent",
            "n": 1000,
            "flagged": round(1000 * rate),
            "flag_rate": rate,
            "flag_rate_ci95": list(wilson(round(1000 * rate), 1000)),
            "victim_accuracy": 0.99,
            "right_through_gate": 0.99 - rate,
            "right_with_key": 0.99 - rate / 10,  # as if a key's trust spared it nine in ten
        }
        for name, rate in rates.items()
    ]
    gate = {"method": "detector", "threshold": 0.5, "sha256": "0" * 64}
    return {"command": "deepdefense formats", "seed": 0, "seconds": 1.0, "checkpoint": "lenet-mnist", "n": 1000,
            "dataset": "mnist", "gate": gate, "variants": rows, "http_check": []}  # fmt: skip


def test_the_report_names_the_variants_flagged_too_often() -> None:
    text = markdown(record({"clean pixels": 0.004, "clean ink on paper, invert": 0.006, "thinner, pixels": 0.25}))
    assert "| clean ink on paper, invert | clean ink on paper, invert as sent | 1000 | **0.60%**" in text
    reading = text.split("## Reading", 1)[1]
    assert "although honest:** thinner, pixels 25.00%" in reading
    assert "clean ink on paper, invert 0.60%" not in reading.split("although honest")[1]


def test_the_report_shows_the_cost_and_the_variants_over_target() -> None:
    rec = record({"clean pixels": 0.004, "thicker, pixels": 0.01, "thinner, pixels": 0.25})
    text = markdown(rec)
    assert (
        "| thinner, pixels | thinner, pixels as sent | 1000 | **25.00%** (22.42%–27.78%) | 99.00% | 74.00% | 25.00 "
        "| 96.50% | 2.50 |" in text
    )
    reading = text.split("## Reading", 1)[1]
    anonymous, keyed = reading.split("sent anonymously", 1)[1].split("sent by one key")
    assert "the largest is thinner, pixels, 25.00 points; over the target: thinner, pixels 25.00." in anonymous
    assert "the largest is thinner, pixels, 2.50 points; over the target: thinner, pixels 2.50." in keyed
    assert "flagged before" not in text


def test_a_baseline_of_the_same_images_goes_beside_as_before() -> None:
    now = record({"clean pixels": 0.004, "thinner, pixels": 0.01})
    earlier = record({"clean pixels": 0.005, "thinner, pixels": 0.25})
    earlier["gate"] = {"method": "detector", "threshold": -1.3, "sha256": "1" * 64}
    earlier["command"] = "deepdefense formats --seed 0 (before)"
    now["victim_sha256"] = earlier["victim_sha256"] = "a" * 64
    now["baseline"] = baseline_of(earlier, now)
    text = markdown(now)
    assert (
        "| thinner, pixels | thinner, pixels as sent | 1000 | **1.00%** (0.54%–1.83%) | 25.00% | 99.00% | 98.00% "
        "| 74.00% | 1.00 | 98.90% | 0.10 |" in text
    )
    assert "deepdefense formats --seed 0 (before)" in text and "`1111111111111111…`" in text
    assert "thinner, pixels 25.00% → 1.00%" in text.split("## Reading", 1)[1]
    with pytest.raises(ValueError, match="same domain score"):
        baseline_of(now, now)
    other = dict(earlier, n=500)
    with pytest.raises(ValueError, match="n differ"):
        baseline_of(other, now)
    fewer = dict(earlier, variants=earlier["variants"][:1])
    with pytest.raises(ValueError, match="variants differ"):
        baseline_of(fewer, now)


@pytest.mark.usefixtures("no_server_env")
def test_the_command_writes_the_record_and_counts_as_the_server(data_root: Path, tmp_path: Path) -> None:
    report = tmp_path / "format-variants.md"
    argv = ["formats", "--data-root", str(data_root), "--n", "24", "--http-check", "16", "--report", str(report)]
    assert main([*argv, "--device", "cpu"]) == 0
    saved = json.loads(report.with_suffix(".json").read_text())
    assert [r["name"] for r in saved["variants"]] == [v.name for v in VARIANTS]
    assert all(r["n"] == 24 for r in saved["variants"]) and saved["seed"] == 0
    assert saved["command"].startswith("deepdefense formats")
    assert len(saved["http_check"]) == 2
    for check in saved["http_check"]:
        assert check["by_server"] == check["misinformed_replayed"] == check["flagged_offline"], check
    # 24 queries: no key is trusted before its window of 100 is full, so a key pays what an anonymous caller pays
    assert all(r["misinformed_with_key"] == r["flagged"] for r in saved["variants"])
    assert all(r["right_with_key"] == r["right_through_gate"] for r in saved["variants"])
    assert "# Honest digits in other formats" in report.read_text()
