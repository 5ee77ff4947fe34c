"""`deepdefense bench` end to end at toy scale: every path measured, JSON and Markdown written.

The speed figures are the bench's output and are checked for presence and order only (p50 <= p95),
never against a limit: this test must pass on any machine, however slow or busy."""

from __future__ import annotations

import json
from pathlib import Path

from deepdefense.cli import main


def test_bench_measures_every_path(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--data-root",
            str(data_root),
            "--queries",
            "4",
            "--one-query-queries",
            "2",
            "--batch-sizes",
            "1,4",
            "--clients",
            "1,2",
            "--duration",
            "120",  # an upper bound only: each server phase ends at its 6-request cap (a second or two here)
            "--max-requests",
            "6",
            "--set",
            "steps=2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    setups = [(r["setup"], r["queries_per_call"], r["clients"]) for r in result["rows"]]
    assert setups == [
        ("undefended", 1, None),
        ("one-query engine", 1, None),
        ("batched engine", 1, None),
        ("batched engine", 4, None),
        ("batched engine (previous defaults)", 4, None),  # warm_start=false beside the defaults, same batch
        ("server", None, 1),
        ("server", None, 2),
    ]
    for row in result["rows"]:
        assert row["queries"] > 0 and row["queries_per_second"] > 0 and row["peak_memory_mb"] > 0
        assert 0 < row["ms_per_query_p50"] <= row["ms_per_query_p95"]
    for row in result["rows"][-2:]:  # the server phases: the cap, not the clock, ended them; every answer a 200
        assert row["queries"] == 6 and row["notes"]["statuses"] == {"200": 6}, row
    assert "batched engine ×4 / one-query engine" in result["ratios"]
    assert "batched engine ×4 / previous defaults ×4" in result["ratios"]
    assert result["rows"][4]["notes"]["options"] == {"warm_start": False}
    table = out.with_suffix(".md").read_text()
    assert "| server | 2 |" in table and "deepdefense bench" in table
