"""``deepdefense eval`` end to end, scaled down (budgets 40/80 or 8, one epoch, a few hundred test
images): in-process, against a DeepDefense server on loopback (--url), and with servers it starts
itself (--serve). Checks the files it writes and that a rerun reuses every stored answer and
finished training."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from support.servers import served_queries
from support.settings import loopback_settings

from deepdefense.cli import main
from deepdefense.measure.launcher import in_thread
from deepdefense.server.app import create_app

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--epochs", "1", "--test-n", "200", "--n-unif", "200", "--runtime-n", "8", "--device", "cpu", "--quiet"]


def run_eval(tmp: Path, data_root: Path, *args: str) -> tuple[int, dict[str, Any], Path]:
    out = tmp / "results"
    rc = main(
        [
            "eval",
            "--data-root",
            str(data_root),
            "--store-root",
            str(tmp / "stores"),
            "--out",
            str(out),
            "--report",
            str(tmp / "report.md"),
            *SMALL,
            *args,
        ]
    )
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    return rc, results, out


def test_in_process_none_and_pp(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--defenses",
        "none",
        "pp",
        "--budgets",
        "40",
        "80",
        "--losses",
        "explanations",
        "labels",
        "--n-maps",
        "8",
        "--avg-drop",
        "pp",
        "--n-figure",
        "3",
        "--cs",
        "--top-k",
    ]
    rc, results, out = run_eval(tmp_path, data_root, *args)
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert [r["defense"] for r in summary["table5"]] == ["none", "pp"]
    assert set(results["arms"]) == {"none", "pp"}
    for key in ("none", "pp"):
        arm = results["arms"][key]
        assert arm["queries_sent"] == 80 and arm["budget"] == 80 and arm["runtime"]["n"] == 8
        assert arm["runtime"]["in_process"] and arm["runtime"]["ms_per_query"] > 0
        assert {(r["loss"], r["budget"]) for r in arm["runs"]} == {
            (loss, b) for loss in ("explanations", "labels") for b in (40, 80)
        }
        for r in arm["runs"]:
            assert 0 <= r["accuracy"] <= 100 and 0 <= r["r_test"] <= 100 and 0 <= r["r_unif"] <= 100
            assert (
                0 <= r["r_test_tv"] <= 1 and r["n_test"] == 200 and r["n_unif"] == 200 and len(r["epoch_losses"]) == 1
            )
    assert results["arms"]["pp"]["settings"]["epsilon"] == 0.5 and 0 < results["victim_accuracy"] <= 100
    with open(out / "accuracy.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {r["arm"] for r in rows} == {"none", "pp"}
    drop = json.loads((out / "average_drop.json").read_text())["pp"]
    assert drop["n"] == 8 and drop["p"] == 15.0 and drop["labels_kept"] == 100.0
    # PP answers the victim's own maps; the 8 maps are asked in one request (8 ≤ the query batch of 16) and the
    # reference explains the same 8 in one batch: the same computation, so the same bits
    assert drop["victim"] == drop["defended"] and drop["ttest"]["p_value"] is None, (
        "identity is the property: PP passes the victim's maps through untouched"
    )
    tables = json.loads((out / "tables.json").read_text())
    assert tables["budget"] == 80 and tables["table5"][0]["paper"] == 93.37
    for png in ("fig2.png", "fig3.png"):
        assert (out / png).read_bytes().startswith(PNG)
    report = (tmp_path / "report.md").read_text()
    assert "deepdefense eval --data-root" in report and "93.37" in report and "fig2.png" in report

    # the same command again: every answer is stored and every training cached
    rc, again, _ = run_eval(tmp_path, data_root, *args)
    assert rc == 0
    for key in ("none", "pp"):
        assert again["arms"][key]["queries_sent"] == 0 and again["arms"][key]["stored_before"] == 80
        assert again["arms"][key]["runs"] == results["arms"][key]["runs"]

    # a fresh clone: the attacker's transfer sets are gone (not committed), the cached trainings are not;
    # --only-cached reports them without sending a query
    import shutil

    gone = [d for d in (tmp_path / "stores").iterdir() if "-random-" in d.name]
    assert len(gone) == 2
    for d in gone:
        shutil.rmtree(d)
    rc, cached, _ = run_eval(tmp_path, data_root, *args, "--only-cached")
    assert rc == 0 and not cached.get("not_collected")
    for key in ("none", "pp"):
        assert cached["arms"][key]["queries_sent"] == 0 and cached["arms"][key]["stored_before"] == 0
        assert cached["arms"][key]["runs"] == results["arms"][key]["runs"]
    assert not list((tmp_path / "stores").glob("*-random-*/shard-*")), "--only-cached stored answers"


def test_against_a_deepdefense_server_on_loopback(data_root: Path, tmp_path: Path) -> None:
    settings = loopback_settings(tmp_path, defense="deepdefense", engine={"steps": 2})
    with in_thread(create_app(settings)) as url:
        rc, results, out = run_eval(
            tmp_path,
            data_root,
            "--url",
            url,
            "--budgets",
            "8",
            "--losses",
            "explanations",
            "--runtime-n",
            "4",
            "--n-maps",
            "6",
            "--n-figure",
            "2",
        )
        assert served_queries(url) == 8 + 1 + 4 + 6  # transfer set, warm-up and timed queries, Table 2 images
    assert rc == 0
    arm = results["arms"]["deepdefense"]
    assert arm["url"] == url and arm["settings"]["steps"] == 2 and not arm["runtime"]["in_process"]
    assert [(r["loss"], r["budget"]) for r in arm["runs"]] == [("explanations", 8)]
    drop = arm["average_drop"]
    assert drop["n"] == 6 and drop["labels_kept"] == 100.0
    assert 0 <= drop["victim"]["mean"] <= 1 and 0 <= drop["defended"]["mean"] <= 1
    assert set(drop["ttest"]) == {"n", "mean_difference", "t", "p_value"}
    assert (out / "fig3.png").read_bytes().startswith(PNG)
    assert "ours (deepdefense) | 6 |" in (tmp_path / "report.md").read_text()


def test_servers_it_starts_itself(data_root: Path, tmp_path: Path) -> None:
    rc, results, out = run_eval(
        tmp_path,
        data_root,
        "--serve",
        "--defenses",
        "none",
        "--budgets",
        "16",
        "--losses",
        "labels",
        "--cs",
        "--top-k",
        "--avg-drop",
    )
    assert rc == 0
    arm = results["arms"]["none"]
    assert arm["url"] is None and arm["queries_sent"] == 16 and not arm["runtime"]["in_process"]
    assert (out / "fig2.png").read_bytes().startswith(PNG)


def test_gated_arms_query_sets_and_the_gate_report(data_root: Path, tmp_path: Path) -> None:
    """Adaptive Misinformation (``--gated none``) beside the undefended arm on the three query sets, with a
    gate-aware attacker, honest users and the monitor replayed; the gate's report is written instead of the
    paper's. The shipped domain score flags Fashion-MNIST and passes MNIST training images."""
    args = ["--defenses", "none", "--gated", "none", "--query-sets", "random", "jbda", "victim-train"]
    args += ["--budgets", "60", "--losses", "labels", "confident", "--jbda-seeds", "10", "--benign-n", "50"]
    rc, results, _ = run_eval(tmp_path, data_root, *args, "--avg-drop", "--cs", "--top-k")
    assert rc == 0
    arms = results["arms"]
    assert set(arms) == {f"none{g}{q}" for g in ("", "+gate") for q in ("", "@jbda", "@victim-train")}
    assert arms["none+gate"]["gated"] and arms["none+gate"]["settings"] == {"gate": "misinform"}
    assert not arms["none"]["gated"] and arms["none"]["fingerprint"] != arms["none+gate"]["fingerprint"]
    assert {arms[k]["query_set"] for k in arms} == {"random", "jbda", "victim-train"}
    assert all(a["role"] == "main" and a["gated"] == k.startswith("none+gate") for k, a in arms.items())
    for key, arm in arms.items():
        assert arm["budget"] == 60 and {r["loss"] for r in arm["runs"]} == {"labels", "confident"}
        for run in arm["runs"]:
            assert 0 < run["kept"] <= 60 and (run["kept"] == 60 or run["loss"] == "confident"), key
    for key in ("none", "none+gate"):  # honest users only on the paper's query set
        benign = arms[key]["benign"]
        assert benign["n"] == 50 and benign["accuracy"] >= 90 and benign["victim_accuracy"] >= 90
    assert "benign" not in arms["none+gate@jbda"] and "monitor" not in arms["none"]
    random_, train = arms["none+gate"]["monitor"], arms["none+gate@victim-train"]["monitor"]
    # the domain score keeps honest variants in domain and flags a third of Fashion-MNIST: above the monitor's line
    assert random_["flagged_pct"] > 100 * random_["threshold"] and random_["escalated_at"] is not None
    assert train["flagged_pct"] < 10 and train["escalated_at"] is None
    assert random_["benign"]["clean"]["keys"] == 10 and random_["benign"]["clean"]["escalated"] == 0
    assert random_["benign"]["clean"]["flagged_pct"] <= 1.0
    assert random_["threshold_choice"]["escalated"][f"{random_['threshold']:g}"] == 0
    report = (tmp_path / "report.md").read_text()
    for heading in (
        "# Below the label line",
        "## Queries: JBDA from 10",
        "## Honest users",
        "## The extraction monitor",
    ):
        assert heading in report
    assert "| Adaptive Misinformation (`--defense none --gate misinform`) | jbda |" in report

    # --only-cached with an arm never collected: reported as not run, nothing sent, the others as before
    rc, again, _ = run_eval(tmp_path, data_root, *args, "--gated", "none", "deepdefense", "--only-cached")
    assert rc == 0 and set(again["not_collected"]) == {f"deepdefense+gate{q}" for q in ("", "@jbda", "@victim-train")}
    assert set(again["arms"]) == set(arms) and all(a["queries_sent"] == 0 for a in again["arms"].values())
    assert again["arms"]["none+gate"]["runs"] == arms["none+gate"]["runs"]
    assert "Not collected by this run" in (tmp_path / "report.md").read_text()
