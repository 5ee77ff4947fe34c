"""``docs/results/ownership.md``'s writer (``measure/ownership.py report``): the targets follow the introduction, a
row measured on several keys (draws of the hash) counts once per key, rows with the rank test show it, rows
measured before it keep the count alone, and a fine-tuned copy past 1e-3 is where the proof stops."""

from __future__ import annotations

from typing import Any

from deepdefense.measure.ownership import report
from deepdefense.server.watermark import ESCALATED_FRACTION, FRACTION


def _score(p: float, rank: float | None = 1.2) -> dict[str, Any]:
    score: dict[str, Any] = {"agreed": 3, "queries": 20, "p_value": p, "accuracy": 70.0}
    return score if rank is None else {**score, "mean_rank": rank}


def _row(fraction: float, key: int, p: float, **extra: Any) -> dict[str, Any]:
    row = {"query_set": "jbda", "fraction": fraction, "loss": "explanations", "budget": 2500, "key": key}
    return {**row, "copy": _score(p), **extra}


def test_targets_follow_the_introduction_and_every_key_counts() -> None:
    default = {"escalated_fraction": ESCALATED_FRACTION}
    copies = {
        "a": _row(FRACTION, 0, 1e-12, finetuned_50=_score(0.02), **default),
        "b": _row(FRACTION, 1, 1e-10, **default),
        "c": _row(0.005, 0, 1e-5),
        "d": _row(0.005, 1, 1e-9),
        "e": _row(FRACTION, 0, 1e-3),  # the default key's fraction, but for every query: not the default
    }
    text = report([{"copies": copies, "independent": {"seed-1": {"jbda": _score(0.4, rank=5.1)}}}])
    lines = text.splitlines()
    targets, cost = (
        lines.index(
            f"## Targets (issue 34), at the default fractions: {FRACTION:.2%}, {ESCALATED_FRACTION:.2%} escalated"
        ),
        lines.index("## Honest cost per fraction"),
    )
    assert lines[targets - 1] == "" and lines[targets - 2] == "key, i.e. another draw of the keyed hash.", (
        "the targets must come after the introduction's last line, not inside it"
    )
    assert targets < cost
    assert "largest p 1.0e-10 of 2 — met" in text, "both keys at the default fraction are copies to prove"
    assert (
        f"{FRACTION:.2%}: 0 of 1 copies proven (p < 1e-6); {FRACTION:.2%}, {ESCALATED_FRACTION:.2%} escalated: 2 of 2 "
        "copies proven (p < 1e-6); 0.50%: 1 of 2 copies proven" in text
    )
    assert "3/20, rank 1.20, p = 1.0e-12 (70.00%)" in text
    assert "largest p 0.02 — **not met**" in text and "finetuned 50: 3/20, rank 1.20, p = 0.02" in text
    assert "| jbda | 2,500 | 0.50% | explanations (draw 2) | 3/20, rank 1.20, p = 1.0e-09 (70.00%) |" in text


def test_a_row_measured_before_the_rank_test_shows_the_count_alone() -> None:
    old = {"copy": _score(1e-8, rank=None), **{k: v for k, v in _row(FRACTION, 0, 0).items() if k != "copy"}}
    del old["key"]  # records written before keys were drawn more than once carry none
    text = report([{"copies": {"x": old}}])
    assert "| 3/20, p = 1.0e-08 (70.00%) |" in text
