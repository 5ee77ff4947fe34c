"""The Markdown report from a record (no training): the paper's numbers only beside the paper's victim,
Table 4 with PP at the same k as DeepDefense, and an EDM column."""

from __future__ import annotations

from typing import Any

from deepdefense.measure.evaluate import key_role
from deepdefense.measure.markdown import num, pct, row, signed, table
from deepdefense.measure.report import markdown, tables


def _run(loss: str, budget: int, accuracy: float) -> dict[str, Any]:
    return {"loss": loss, "budget": budget, "accuracy": accuracy, "r_test": 1.0, "r_test_tv": 0.1, "r_unif": 0.0}


def _arm(defense: str, accuracy: float, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "defense": defense,
        "settings": settings or {},
        "budget": 100,
        "runtime": {"n": 4, "query_batch": 2, "ms_per_query": 1.5, "fallbacks": 0},
        "runs": [_run("explanations", 100, accuracy)],
    }


def record(dataset: str, attacker: str) -> dict[str, Any]:
    return {
        "config": {
            "checkpoint": f"lenet-{dataset}",
            "interpreter": "gradcam",
            "attacker_dataset": attacker,
            "losses": ["explanations"],
            "budgets": [100],
            "seed": 0,
            "test_n": None,
            "n_unif": 10,
            "p": 15.0,
            "recipe": {
                "optimizer": "adam",
                "lr": 1e-3,
                "batch_size": 64,
                "schedule": "cosine",
                "epochs": 1,
                "lam": 0.01,
            },
        },
        "environment": {
            "host": "h",
            "machine": "m",
            "torch": "t",
            "threads": 1,
            "device": "cpu",
            "defense_device": "cpu",
        },
        "dataset": dataset,
        "victim_accuracy": 99.0,
        "arms": {
            "none": _arm("none", 90.0),
            "pp": _arm("pp", 80.0, {"epsilon": 0.5}),
            "edm": {
                **_arm("edm", 70.0, {"members": 5}),
                "benign": {"n": 10, "accuracy": 90.0, "victim_accuracy": 100.0, "agreement": 90.0},
            },
            "deepdefense": _arm("deepdefense", 60.0, {"top_k": 1, "cs": 90.0, "layers": ["a.conv1"]}),
            "deepdefense-top3": _arm("deepdefense", 65.0, {"top_k": 3, "cs": 90.0, "layers": ["a.conv1"]}),
            "pp-top1": _arm("pp", 80.0, {"epsilon": 0.5}),
            "pp-top3": _arm("pp", 85.0, {"epsilon": 0.5, "top_k": 3}),
        },
    }


def test_table4_rows_dd_and_pp_at_each_k() -> None:
    t = tables(record("mnist", "fashionmnist"))
    rows = {(r["defense"], r["top_k"]): r["accuracy"]["explanations"] for r in t["table4"]}
    assert rows == {("deepdefense", 3): 65.0, ("pp", 1): 80.0, ("pp", 3): 85.0}  # the main PP row is not repeated
    report = markdown(record("mnist", "fashionmnist"), "results", "report.md")
    assert "| PP | 3 | — | 100 | 1.5 |" in report and "| DD | 3 | conv1 | 100 |" in report


def test_paper_numbers_only_beside_the_papers_victim() -> None:
    mnist = markdown(record("mnist", "fashionmnist"), "results", "report.md")
    assert "| paper | 93.37 | 64.03 | — | 17.56 |" in mnist and "| ours | 90.00 | 80.00 | 70.00 | 60.00 |" in mnist
    assert "Where we differ from the paper" in mnist and "EDM has no Table 5 entry" in mnist
    fashion = markdown(record("fashionmnist", "mnist"), "results", "report.md")
    assert "93.37" not in fashion and "| paper |" not in fashion and "Where we differ from the paper" not in fashion
    assert "The paper attacks no Fashion-MNIST victim" in fashion and "random MNIST training images" in fashion
    assert "| ours | 90.00 | 80.00 | 70.00 | 60.00 |" in fashion


def test_cells_without_an_attack_model_say_not_run() -> None:
    r = record("mnist", "fashionmnist")
    r["config"]["budgets"] = [50, 100]
    report = markdown(r, "results", "report.md")
    assert "| EDM | `explanations` | *not run* | 70.00 |" in report and "*not run*: no attack model" in report
    assert tables(record("fashionmnist", "mnist"))["table5"][0]["paper"] is None


def test_labels_of_top1_keeping_arms_not_run_say_why() -> None:
    r = record("mnist", "fashionmnist")
    r["config"]["losses"] = ["explanations", "labels"]
    r["arms"]["none"]["runs"].append(_run("labels", 100, 77.0))
    report = markdown(r, "results", "report.md")
    assert "| DD | `labels` | *not run* |" in report and "| PP | `labels` | *not run* |" in report
    assert "`labels` through DD: these arms answer the victim's top-1" in report  # not PP: it is not an engine mode
    r["arms"]["none"]["runs"].pop()  # without Undefended's labels there is no figure to point at
    assert "`labels` through" not in markdown(r, "results", "report.md")


def test_arms_not_collected_are_named() -> None:
    r = {**record("mnist", "fashionmnist"), "not_collected": {"deepdefense-cs70": "no stored answers"}}
    assert "* not run: `deepdefense-cs70`" in markdown(r, "results", "report.md")


def test_a_cs_arm_not_run_with_the_same_layers_as_another_says_so() -> None:
    r = record("mnist", "fashionmnist")
    cs50 = {"top_k": 1, "cs": 50.0, "layers": ["a.conv2", "a.fc1"]}
    r["arms"]["deepdefense-cs50"] = _arm("deepdefense", 82.0, cs50)
    r["not_collected"] = {"deepdefense-cs70": {"why": "not stored", "settings": {**cs50, "cs": 70.0}}}
    report = markdown(r, "results", "report.md")
    assert "it optimises the same layers as `deepdefense-cs50`" in report
    assert "| DD | 70 (= cs50: same layers, not run) | conv2, fc1 | 100 | 1.5 |" in report
    r["not_collected"]["deepdefense-cs70"]["settings"]["layers"] = ["a.conv2"]  # other layers: only named as not run
    report = markdown(r, "results", "report.md")
    assert "same layers" not in report and "* not run: `deepdefense-cs70`" in report


def test_honest_users_cost_per_arm() -> None:
    report = markdown(record("mnist", "fashionmnist"), "results", "report.md")
    assert "## What honest users get (benign cost)" in report
    assert "| edm | 10 | 90.00 | 100.00 | 90.00 | 1.5 |" in report and "| none | 10 |" not in report


def test_tables_3_and_4_without_rows_say_which_reason_holds() -> None:
    r = record("fashionmnist", "mnist")
    r["arms"] = {k: v for k, v in r["arms"].items() if k in ("none", "pp")}
    r["config"] |= {"defenses": ["none", "pp"], "cs": [50], "top_k": [1]}
    assert "Not run: `deepdefense` is not among `--defenses`." in markdown(r, "results", "report.md")
    r["config"] |= {"defenses": ["none", "pp", "deepdefense"], "cs": [], "top_k": []}
    report = markdown(r, "results", "report.md")
    assert "Not run: `--cs` was given without values" in report and "`--top-k` was given without values" in report
    r["config"] |= {"cs": [50, 70], "top_k": [1, 3]}
    report = markdown(r, "results", "report.md")
    assert "no attack model of the `--cs 50 70` arms is stored" in report
    assert "no attack model of the `--top-k 1 3` arms is stored" in report


def test_pp_beside_the_cs_arms_only_for_the_attackers_they_faced() -> None:
    r = record("mnist", "fashionmnist")
    r["arms"]["deepdefense-cs50"] = _arm("deepdefense", 62.0, {"top_k": 1, "cs": 50.0, "layers": ["a.conv2"]})
    r["arms"]["pp"]["runs"].append(_run("labels", 100, 77.0))
    pp = next(row for row in tables(r)["table3"] if row["defense"] == "pp")
    assert pp["accuracy"] == {"explanations": 80.0}  # ablation losses default to eq. (1)'s
    r["config"]["ablation_losses"] = ["explanations", "labels"]
    pp = next(row for row in tables(r)["table3"] if row["defense"] == "pp")
    assert pp["accuracy"] == {"explanations": 80.0, "labels": 77.0}


def test_an_arm_s_role_is_read_from_its_fields_and_old_keys_decode_the_same() -> None:
    old = record("mnist", "fashionmnist")
    new = record("mnist", "fashionmnist")
    for key, arm in new["arms"].items():  # what measure.evaluate writes now: the role beside the key
        arm |= dict(zip(("role", "gated", "query_set"), key_role(key), strict=True))
    assert markdown(new, "results", "report.md") == markdown(old, "results", "report.md")
    # the fields decide, not the key: a top-k arm under any name is in Table 4, a main arm under any name in Table 5
    new["arms"]["k3"] = new["arms"].pop("deepdefense-top3")
    new["arms"]["undefended"] = new["arms"].pop("none")
    t = tables(new)
    assert ("k3", 65.0) in [(r["arm"], r["accuracy"]["explanations"]) for r in t["table4"]]
    assert {r["defense"]: r["ours"] for r in t["table5"]}["none"] == 90.0


def test_sections_follow_what_the_record_holds() -> None:
    r = record("mnist", "fashionmnist")
    assert markdown(r, "results", "report.md").startswith("# lenet-mnist (gradcam): model stealing")
    r["config"] |= {"runtime_n": 4}
    r["arms"]["deepdefense+gate"] = {**_arm("deepdefense", 20.0), "role": "main", "gated": True, "query_set": "random"}
    report = markdown(r, "results", "report.md")
    assert (
        report.startswith("# Below the label line")
        and "| **DeepDefense + gate** (`--gate misinform`) | 20.00 |" in report
    )


def test_markdown_tables() -> None:
    assert table("a | b", [[1, None]]) == ["| a | b |", "| --- | --- |", "| 1 | None |"]
    assert row(["", "x"]) == "| | x |"
    assert [num(None), num(float("nan")), num(1.234, 1), pct(0.01234), signed(-1.0)] == [
        "—",
        "—",
        "1.2",
        "1.23%",
        "-1.00",
    ]
