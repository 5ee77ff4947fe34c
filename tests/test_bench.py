"""`deepdefense bench` end to end at toy scale: every path measured, JSON and Markdown written."""

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
            "3",
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
        ("server", None, 1),
        ("server", None, 2),
    ]
    for row in result["rows"]:
        assert row["queries"] > 0 and row["queries_per_second"] > 0 and row["peak_memory_mb"] > 0
        assert 0 < row["ms_per_query_p50"] <= row["ms_per_query_p95"]
    assert result["rows"][-1]["notes"]["statuses"] == {"200": result["rows"][-1]["queries"]}
    assert "batched engine ×4 / one-query engine" in result["ratios"]
    table = out.with_suffix(".md").read_text()
    assert "| server | 2 |" in table and "deepdefense bench" in table
