"""The Markdown report of ``deepdefense detectors`` (docs/results/gate-detectors.md)."""

from __future__ import annotations

from typing import Any

from deepdefense.measure.markdown import document, generated_by, row, table, yes

#: The issue's target: no detector tells misinformed from honest answers better than this.
TARGET = 0.60
#: The answer-shape table's medians and their decimals.
ANSWER_CELLS = {"top_p25": 4, "top_median": 4, "entropy_median": 4, "twin_dp_median": 6, "twin_dmap_median": 6}


def markdown(record: dict[str, Any]) -> str:
    m = record["measured"]
    out = [
        "# Telling misinformed answers apart: the thief's detectors",
        "",
        *generated_by("deepdefense detectors", "rerun the command to regenerate."),
        f"* command: `{record['command']}`",
        f"* checkpoint `{record['checkpoint']}` through `{record['defense']}` + gate, interpreter "
        f"{record['interpreter']}, seed {record['seed']}; measured at commit {m['commit']} on {m['date']}",
        "",
        "Every image of a pool is answered by both paths of the gate (honest: the wrapped defense; misinformed: "
        "the gate made to misinform it — the wrapped defense's answer with its classes ranked by the misinformation "
        "model, `defense/gate.py`), and again with one pixel moved by 1/255. Each detector is fitted on half of the "
        "images and scored on the other half: **balanced accuracy, 0.5 is chance**; target ≤ "
        f"{TARGET:.2f}. *Before*: the first gate, whose misinformed answers were the misinformation model's "
        "own fixed answers (measure/detectors.py).",
    ]
    first = record.get("first_try")
    if first:
        out += [
            "",
            "*First try*: this round's first misinformation path, the per-query engine run on the misinformation "
            f"model with its logits divided by T = {first['logit_temperature']} (from `{first['command']}`, "
            f"commit {first['measured']['commit']}; record `{record['first_try_record']}`).",
        ]
    columns = ["pool", "detector", "before", *(["first try"] if first else []), "after", "target met"]
    out += ["", *table(columns)]
    names = {"twin_probabilities": "twin test (probabilities)", "twin_map": "twin test (map)"}
    names["answer_shape"] = "answer shape (logistic regression)"
    for pool, r in record["pools"].items():
        for key, name in names.items():
            after = r["after"][key]
            tried = [f"{first['pools'][pool]['after'][key]:.3f}"] if first else []
            out.append(row([pool, name, f"{r['before'][key]:.3f}", *tried, f"**{after:.3f}**", yes(after <= TARGET)]))
    out += [
        "",
        "What the answers look like (medians; twin Δ: the largest change between an image and its twin):",
        "",
        *table(
            "pool | path | top-1 p, 25th pct | top-1 p, median | entropy | twin Δp | twin Δmap",
            (
                [pool, path.replace("_", " "), *(f"{s[k]:.{d}f}" for k, d in ANSWER_CELLS.items())]
                for pool, r in record["pools"].items()
                for path, s in r["answers"].items()
            ),
        ),
    ]
    for pool, r in record.get("map_reading", {}).items():
        out += [
            "",
            f"What a misinformed answer's map gives away. Its map is the defense's own, made for the class the victim "
            f"would answer. A linear map-to-label classifier fitted on half of the honest answers to {r['own']} "
            f"images (what a thief's honest answers teach him) reads the victim's label from the other half's maps "
            f"{100 * r['own_heldout']:.1f}% of the time, and from the maps of {pool} images "
            f"{100 * r['foreign']:.1f}% of the time (always answering the victim's commonest class on them: "
            f"{100 * r['foreign_commonest']:.1f}%).",
        ]
    return document(out)
