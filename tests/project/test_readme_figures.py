"""README's headline figures are the values of the results files they cite (``docs/results/``): a rerun that
writes new results without the README following, or a README edited by hand, fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from deepdefense.models.checkpoint import SHIPPED_DIR, read_meta

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "results"
README = (REPO / "README.md").read_text()


def results(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def quoted(pattern: str, count: int = 1) -> list[float]:
    """The numbers README gives where ``pattern`` (a regular expression with ``count`` groups) matches, once."""
    matches = re.findall(pattern, README, flags=re.S)
    assert len(matches) == 1, f"README should say {pattern!r} once, found {len(matches)}"
    groups = matches[0] if count > 1 else (matches[0],)
    return [float(g) for g in groups]


def accuracy(arm: dict[str, Any], budget: int, losses: tuple[str, ...] | None = None) -> float:
    """The strongest attacker's accuracy among ``arm``'s runs at ``budget`` (of ``losses``, or all)."""
    runs = [r for r in arm["runs"] if r["budget"] == budget and (losses is None or r["loss"] in losses)]
    assert runs, (arm["key"], budget, losses)
    return max(r["accuracy"] for r in runs)


def test_the_victim() -> None:
    (figure,) = quoted(r"\| victim `lenet-mnist` \| (\d+\.\d+)% MNIST test")
    assert figure == read_meta(SHIPPED_DIR / "lenet-mnist.json").test_accuracy


def test_the_gate_against_thieves_and_the_label_line() -> None:
    arms = results("below-label-line/results.json")["arms"]
    gated, am = quoted(r"\*\*(\d+\.\d+)%\*\* \(\*60-step engine\*\), AM alone (\d+\.\d+)%", 2)
    assert gated == accuracy(arms["deepdefense+gate"], 10_000)
    assert am == accuracy(arms["none+gate"], 10_000)
    (line,) = quoted(r"the label line is (\d+\.\d+)%, the top-1-only attacker against the undefended victim")
    mnist = results("mnist/results.json")["arms"]
    assert line == accuracy(mnist["none"], 10_000, ("labels",))


def test_honest_users() -> None:
    am, default = quoted(
        r"\*\*(\d+\.\d+)%\*\* of the 10,000 MNIST test digits [^|]*?\*\*(\d+\.\d+)%\*\* of the first", 2
    )
    assert am == results("below-label-line/benign-am.json")["accuracy"]
    assert default == results("below-label-line/benign-deepdefense-gate.json")["accuracy"]
    top = quoted(r"first-round gate: (\d+\.\d+)% of the first 1,000 [^|]*?(\d+\.\d+)% of all 10,000", 2)
    assert top == [default, am]
    (now,) = quoted(r"\*\*(\d+\.\d+)%\*\* of all 10,000 MNIST test digits sent by one key, with the ownership")
    assert now == results("honest-default-server-watermarked.json")["accuracy"]
    (plain,) = quoted(r"without the watermark\s+\*\*(\d+\.\d+)%\*\* \(victim")
    assert plain == results("honest-default-server.json")["accuracy"]
    tail = results("honest-answers.json")["top1_probability"]
    assert quoted(r"top-1 probability median (\d\.\d+), 25th percentile (\d\.\d+)", 2) == [tail["median"], tail["p25"]]


def test_the_gates_latency() -> None:
    (ratio,) = quoted(r"×(\d\.\d+) \(95% CI")
    assert ratio == round(results("gate-latency.json")["arms"]["deepdefense"]["ratio"], 3)


def test_table_5() -> None:
    row = (
        r"undefended (\d+\.\d+)%, PP (\d+\.\d+)%, \*\*EDM (\d+\.\d+)%\*\*[^|]*?DD (\d+\.\d+)%, DD-S (\d+\.\d+)%, "
        r"DD-I (\d+\.\d+)%"
    )
    arms = results("mnist/results.json")["arms"]
    expected = [
        accuracy(arms[k], 10_000, ("explanations",)) for k in ("none", "pp", "edm", "deepdefense", "dd-s", "dd-i")
    ]
    assert quoted(row, 6) == expected


def test_the_second_round_gate() -> None:
    fashion = results("below-label-line-monitored/results.json")["arms"]["deepdefense+gate"]
    in_domain = results("gate-aware-in-domain/results.json")["arms"]
    (f,) = quoted(r"Fashion-MNIST queries at B = 10,000: \*\*(\d+\.\d+)%\*\* \(the key escalated")
    assert f == accuracy(fashion, 10_000)
    (adaptive,) = quoted(r"Jacobian steps\) at B = 2,500: \*\*(\d+\.\d+)%\*\*")
    assert adaptive == accuracy(in_domain["deepdefense+gate@adaptive"], 2_500)
    jbda, seeds = quoted(r"JBDA from 150 seeds at B = 2,500: \*\*(\d+\.\d+)%\*\*.*?alone are worth (\d+\.\d+)%", 2)
    assert jbda == accuracy(in_domain["deepdefense+gate@jbda"], 2_500)
    assert seeds == results("gate-aware-in-domain/first-answers.json")["accuracy_first_n"]["150"]
    (jbda_10k,) = quoted(r"at B = 10,000: \*\*(\d+\.\d+)%\*\* \(`below-label-line-jbda-10000.md`\)")
    assert jbda_10k == accuracy(results("gate-aware-jbda-10000/results.json")["arms"]["deepdefense+gate@jbda"], 10_000)
    (p50,) = quoted(r"gate and monitor add (\d+\.\d+)% to a defended query's p50")
    gated, plain = (results(f"gate-cost/{n}.json")["latency_ms"]["p50"] for n in ("gated", "plain"))
    assert p50 == round(100 * (gated / plain - 1), 1)


def test_several_models_in_one_server() -> None:
    mnist, fashion, mnist_alone, fashion_alone = quoted(
        r"through `/v2`: \*\*(\d+\.\d+)%\*\* and \*\*(\d+\.\d+)%\*\* by both routes, as each model served alone "
        r"\((\d+\.\d+)%, (\d+\.\d+)%\)",
        4,
    )
    rows = {r["model"]: r for r in results("multi-model.json")["models"]}
    for name, together, alone in (("lenet-mnist", mnist, mnist_alone), ("lenet-fashionmnist", fashion, fashion_alone)):
        row = rows[name]
        assert together == row["together_predict"]["accuracy"] == row["together_v2"]["accuracy"], name
        assert alone == row["alone_predict"]["accuracy"], name


def test_the_fourth_rounds_goodput() -> None:
    defended, undefended, ratio = quoted(
        r"32 clients: (\d+\.\d+) defended answers/s against (\d+\.\d+) undefended in the same run, "
        r"goodput ratio \*\*(\d\.\d+)\*\*",
        3,
    )
    assert defended == results("perf4/defended-32.json")["throughput_rps"]
    assert undefended == results("perf4/undefended-32.json")["throughput_rps"]
    assert ratio == round(defended / undefended, 3)
    tags = ("", "-run2", "-run3", "-run4")

    def ratio_of(defended: str, tag: str) -> float:
        return (
            results(f"perf4/{defended}{tag}.json")["throughput_rps"]
            / results(f"perf4/undefended-32{tag}.json")["throughput_rps"]
        )

    later = quoted(r"\((\d\.\d+), (\d\.\d+) and (\d\.\d+) in three more runs: \*\*(\d\.\d+)\*\* over four", 4)
    assert later[:3] == [round(ratio_of("defended-32", t), 3) for t in tags[1:]]
    assert later[3] == round(sum(ratio_of("defended-32", t) for t in tags) / 4, 3)
    threads = quoted(r"model threads, the third round's: (\d\.\d+), (\d\.\d+), (\d\.\d+) and (\d\.\d+)\)", 4)
    assert threads == [round(ratio_of("defended-32-threads", t), 3) for t in tags]
    p50s = quoted(
        r"1 client: p50 \*\*(\d+\.\d+) ms\*\* \((\d+\.\d+), (\d+\.\d+) and (\d+\.\d+) ms in the other runs\)", 4
    )
    assert p50s == [results(f"perf4/defended-1{t}.json")["latency_ms"]["p50"] for t in tags]
    processes, threads_pss = quoted(
        r"memory: (\d+\.\d) MiB proportional set size.*?against (\d+\.\d) with model threads", 2
    )
    assert processes == results("perf4/memory-processes.json")["pss_mb"]["end"]
    assert threads_pss == results("perf4/memory-threads.json")["pss_mb"]["end"]


def test_the_ownership_watermark() -> None:
    largest, count, independent, cost = quoted(
        r"five draws of the hash for every thief\): p ≤ \*\*(\d\.\de-\d+)\*\* of (\d+) copies.*?"
        r"ten models trained without our answers: p ≥ \*\*(\d\.\d+)\*\*; honest cost \*\*(\d\.\d+)\*\* points",
        4,
    )
    rows = [
        row
        for name in ("escalated", "escalated-sweep")
        for row in results(f"ownership/{name}.json")["copies"].values()
        if (row["fraction"], row["escalated_fraction"], row["budget"]) == (0.004, 0.01, 2500)
    ]
    assert count == len(rows) and largest == float(f"{max(r['copy']['p_value'] for r in rows):.1e}")
    scores = results("ownership/escalated-independent.json")["independent"].values()
    assert independent == round(min(s["p_value"] for m in scores for s in m.values()), 2)
    assert cost == results("ownership/escalated-cost.json")["honest_cost"]["0.004"]["cost"]
