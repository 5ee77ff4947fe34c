"""The Markdown report of ``deepdefense formats`` (docs/results/format-variants.md), from its JSON record only:
nothing here measures anything."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepdefense.measure.markdown import code, document, made_by, pct, row, table

#: A variant flagged more often than this is named in the reading as one the gate punishes.
NOTABLE = 0.05
#: The most accuracy (victim's minus through the gate, in points) an honest variant may cost (issue 28); clean
#: digits: CLEAN_COST.
COST_TARGET, CLEAN_COST = 2.0, 0.5


def markdown(record: Mapping[str, Any]) -> str:
    gate = record["gate"]
    out = [
        f"# Honest digits in other formats, and the misinformation gate of `{record['checkpoint']}`",
        "",
        *made_by(f"seed {record['seed']}, {record['seconds']} s on this machine", record["command"]),
        f"Digits: {record['n']} of the {record['dataset']} **test** split (drawn by seed {record['seed']}; never "
        "seen by the victim, its domain score or the score's threshold). Each variant is what an honest user would "
        "send, decoded by `server.images.instances_to_tensor` — the function `/predict` calls — with the server's "
        f"default image limits; the shipped domain score (`{gate['method']}`, threshold {gate['threshold']:.6g}) "
        "then says which queries the gate answers from the misinformation model. *Right through the gate*: the "
        "victim's label where the query is not flagged (DeepDefense keeps the top-1), the misinformation model's "
        "where it is. *With a key*: the same digits sent by one API key, 16 per request, to the default server, whose "
        "extraction monitor misinforms the flagged ones only until the key is trusted (a full window of 100 distinct "
        "queries with at most 12.5% flagged; `server/monitor.py`) and all of them once it is escalated (its "
        "domain-flag rules replayed by `MonitorPolicy.misinformed`): a key's first window pays what an anonymous "
        "caller pays. *Cost*: the victim's accuracy minus the accuracy through the gate, in points. The domain score "
        "was fitted with honest variants of the victim's *training* digits of the same families (stroke width, "
        "affine changes, blur, noise, faint ink, scans: `defense/honest_variants.py`, its own code and parameters); "
        "nothing was fitted or tuned on these test images or on this code; Fashion-MNIST is not read.",
        "",
    ]
    before = {r["name"]: r for r in record["baseline"]["variants"]} if record.get("baseline") else {}
    if before:
        b = record["baseline"]
        out += [
            f"*Before*: the same images (same digits, seed and variants) through the domain score shipped before "
            f"(`{b['gate']['method']}`, threshold {b['gate']['threshold']:.6g}, sha256 `{b['gate']['sha256'][:16]}…`), "
            "from the record of:",
            "",
            *code(b["command"]),
            "",
        ]
    header = ["variant", "what is sent", "n", "flagged (95% CI)"]
    header += ["flagged before"] if before else []
    header += ["victim accuracy", "right through the gate"]
    header += ["right through the gate before"] if before else []
    header += ["cost (points)", "right with a key", "cost with a key"]
    out += table(header)
    for r in record["variants"]:
        low, high = r["flag_rate_ci95"]
        was = before.get(r["name"])
        cells = [r["name"], r["description"], str(r["n"]), f"**{pct(r['flag_rate'])}** ({pct(low)}–{pct(high)})"]
        cells += [pct(was["flag_rate"]) if was else "—"] if before else []
        cells += [pct(r["victim_accuracy"]), pct(r["right_through_gate"])]
        cells += [pct(was["right_through_gate"]) if was else "—"] if before else []
        cells += [f"{_cost(r):.2f}", pct(r["right_with_key"]), f"{_cost(r, 'right_with_key'):.2f}"]
        out.append(row(cells))
    checks = record.get("http_check") or []
    if checks:
        out += [
            "",
            "The same count over HTTP: the queries of a variant for the first digits of the sample, sent by one API "
            "key as `/predict` requests (16 instances each, with the variant's invert option) to a server on "
            "loopback (`--defense none --gate misinform`, the monitor on as by default with keys), against the "
            "offline count: flagged by the score, and misinformed by the monitor's replay for one key "
            "(`dd_misinformed_answers_total`):",
            "",
            *table(
                ["variant", "n", "flagged offline", "misinformed, replayed", "misinformed by the server"],
                ([c["name"], c["n"], c["flagged_offline"], c["misinformed_replayed"], c["by_server"]] for c in checks),
            ),
        ]
    return document([*out, "", "## Reading", "", *_reading(record)])


def _cost(r: Mapping[str, Any], right: str = "right_through_gate") -> float:
    """Points of accuracy the gate costs a variant's honest senders (anonymous, or ``right="right_with_key"``: one
    key's): the victim's accuracy minus theirs."""
    return 100 * (r["victim_accuracy"] - r[right])


def _reading(record: Mapping[str, Any]) -> list[str]:
    rows = {r["name"]: r for r in record["variants"]}
    base = rows.get("clean pixels")
    lines = []
    if base is not None:
        lines.append(f"* Clean test digits as pixels: {pct(base['flag_rate'])} flagged (the gate's benign target is "
                     "below 0.5%).")  # fmt: skip
    for name in ("clean white-on-black PNG", "clean ink on paper, invert", "ink on paper, JPEG, invert"):
        if name in rows:
            lines.append(f"* {name}: {pct(rows[name]['flag_rate'])} flagged, "
                         f"{pct(rows[name]['right_through_gate'])} right through the gate.")  # fmt: skip
    if "clean ink on paper, no invert" in rows:
        r = rows["clean ink on paper, no invert"]
        lines.append(f"* The same black-on-white digits **without** the invert option: {pct(r['flag_rate'])} flagged, "
                     f"the victim reads {pct(r['victim_accuracy'])} of them, {pct(r['right_through_gate'])} right "
                     "through the gate: the option is what makes ink on paper readable.")  # fmt: skip
    honest = [r for r in record["variants"] if r["name"] != "clean ink on paper, no invert"]
    punished = [r for r in honest if r["flag_rate"] > NOTABLE]
    if punished:
        named = "; ".join(f"{r['name']} {pct(r['flag_rate'])}" for r in sorted(punished, key=lambda r: -r["flag_rate"]))
        lines.append(f"* **Flagged more than {pct(NOTABLE)} although honest:** {named}. The gate punishes these "
                     "users: their answers come from the misinformation model, wrong on purpose and not marked; the "
                     "model card says so in `answers`.")  # fmt: skip
    lines.append(_cost_line(honest, "right_through_gate", "sent anonymously"))
    lines.append(_cost_line(honest, "right_with_key", "sent by one key"))
    before = {r["name"]: r for r in record["baseline"]["variants"]} if record.get("baseline") else {}
    if before:
        changes = "; ".join(
            f"{r['name']} {pct(before[r['name']]['flag_rate'])} → {pct(r['flag_rate'])}"
            for r in sorted(honest, key=lambda r: -before[r["name"]]["flag_rate"])
            if r["name"] in before and before[r["name"]]["flag_rate"] > NOTABLE
        )
        if changes:
            lines.append(f"* **Before → after**, for the variants flagged more than {pct(NOTABLE)} before: {changes}.")
    return lines


def _cost_line(honest: list[Mapping[str, Any]], right: str, who: str) -> str:
    """The reading's line on the largest cost and the variants over the target, for ``right``'s senders."""
    costs = {r["name"]: _cost(r, right) for r in honest}
    over = {n: c for n, c in costs.items() if c > (CLEAN_COST if n.startswith("clean") else COST_TARGET)}
    worst = max(costs, key=lambda n: costs[n])
    verdict = (
        "every honest variant is within its target."
        if not over
        else "over the target: "
        + "; ".join(f"{n} {c:.2f}" for n, c in sorted(over.items(), key=lambda item: -item[1]))
        + "."
    )
    return (
        f"* **Cost against the victim, {who}** (target: at most {COST_TARGET:g} points per honest variant, "
        f"{CLEAN_COST:g} for clean digits): the largest is {worst}, {costs[worst]:.2f} points; {verdict}"
    )
