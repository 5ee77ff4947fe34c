"""The trust study's replay (measure/trust.py): the server before the trust, and a key's rows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepdefense.measure.trust import escalated_from, key_rows, main, without_trust
from deepdefense.server.monitor import MonitorPolicy


def test_without_the_trust_every_flagged_query_is_misinformed_until_escalation_then_all() -> None:
    policy = MonitorPolicy(window=100, min_queries=50, threshold=0.25)
    honest = [i % 20 == 0 for i in range(400)]  # 5% flagged: never escalated, never spared
    assert without_trust(policy, honest) == honest
    assert policy.misinformed(honest, 16) != honest, "the trust spared none of an honest key's flagged queries"
    thief = [i % 3 == 0 for i in range(400)]
    first = policy.queries_until_escalated(thief)
    assert first is not None
    replayed = without_trust(policy, thief, per_request=16)
    after = 16 * ((first - 1) // 16 + 1)  # the standing is read before each request: the next one is escalated
    assert replayed[:after] == thief[:after] and all(replayed[after:])


def test_a_keys_rows_hold_its_digits_and_foreign_images_once_each() -> None:
    rows = key_rows(30, 70, 100, torch.Generator().manual_seed(0))
    assert sorted(rows.tolist()) == list(range(30)) + list(range(100, 170))
    assert rows.tolist() != sorted(rows.tolist()), "not shuffled"
    assert key_rows(3, 2, 100, None).tolist() == [0, 1, 2, 100, 101], "the digits first, then the foreign images"


def test_a_key_is_answered_as_escalated_from_the_request_its_rule_acts_on() -> None:
    assert escalated_from(214, "spread", 16) == 208, "the screening escalates before the 14th request is answered"
    assert escalated_from(64, "domain", 64) == 64, "domain flags escalate after the first request, for the second"
    assert escalated_from(65, "domain", 64) == 128
    assert escalated_from(None, None, 16) is None


def test_the_study_writes_its_record_and_the_trust_only_ever_adds_honest_answers(
    data_root: Path, tmp_path: Path
) -> None:
    out, report = tmp_path / "trust.json", tmp_path / "trust.md"
    argv = ["--data-root", str(data_root), "--budget", "128", "--out", str(out), "--report", str(report), "--quiet"]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert [k["key"] for k in record["keys"]][-1] == "112 digits, then Fashion-MNIST"
    for key in record["keys"]:
        assert key["foreign_honest_with_trust"] >= key["foreign_honest_without"], key
        assert key["misinformed_with_trust"] <= key["misinformed_without"], key
        assert 0 <= key["thief_accuracy"]["with_trust"] <= 100
    assert "| 25% Fashion-MNIST | 32 |" in report.read_text()
