"""The evaluation's outputs: JSON, CSV and PNG files in the results folder, and one Markdown report per record
whose sections follow what the record holds.

* The paper's report: our numbers beside the paper's (DeepDefense, Lee/Han/Lee IJCAI-22: Tables 2–5, Figures 2–3).
* The gate's (``docs/results/below-label-line.md``), for a run with gated arms or query sets other than the paper's:
  attack accuracy per query set, budget, arm and attacker (the strongest attacker per arm beside), what honest
  users get from each arm, the extraction monitor replayed on every query set, and — read from the files beside
  the report when they exist — the domain score's AUROCs (``domain-score.json``, ``deepdefense domain``) and the
  gate's latency (``gate-latency.json``, ``deepdefense bench --gate-latency``). Rows of ungated arms this run did
  not collect can come from another run's ``results.json`` (``--baseline-results``), marked with their source.

Nothing here measures anything: every number comes from the record ``measure.evaluate`` produced, and the paper's
numbers are quoted from its tables (``PAPER``). An arm's role (main, Table 3, Table 4, gated, query set) is read
from its fields by ``measure.evaluate.role_of``, never from its key.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepdefense.clients.attack_losses import ATTACK_LOSSES
from deepdefense.defense.names import ENGINE_MODES
from deepdefense.measure import plots
from deepdefense.measure.evaluate import role_of, write_json
from deepdefense.measure.formats import misinformed_answers
from deepdefense.measure.markdown import document, generated_by, num, row, signed, table
from deepdefense.server.monitor import THRESHOLD

#: The paper's numbers for MNIST (LeNet, Grad-CAM): Table 5 (B = 10,000) and Table 2 (Average Drop).
PAPER: dict[str, Any] = {
    "table5": {"none": 93.37, "pp": 64.03, "deepdefense": 17.56, "dd-s": 26.07, "dd-i": 82.16},  # no EDM column
    "table5_budget": 10_000,
    "victim_accuracy": 99.49,
    "average_drop": {"victim": (0.7888, 0.3691), "defended": (0.7587, 0.4091), "p_value": 0.7581},
    # Table 3 and 4 are on Flowers-17 / CUBS-200 (ResNet-18/34, an RTX 2080 Ti): quoted for scale only.
    # Table 4's PP row was run at k = 1 and k = 5; ours runs PP at the same k as DeepDefense.
    "table3_flowers_l17": {"90": (8, 9.19, 1.47), "70": (6, 8.98, 1.38), "50": (3, 11.40, 0.73), "pp": (62.13, 0.21)},
    "table4_flowers": {"dd": {1: 9.19, 3: 41.91}, "pp": {1: 62.13, 5: 51.84}},
}
#: The fidelity table's measures and their decimals.
FIDELITY_CELLS = (("accuracy", 2), ("r_test", 2), ("r_test_tv", 3), ("r_unif", 2), ("r_unif_tv", 3))
#: The honest-user table's figures.
BENIGN_CELLS = ("accuracy", "victim_accuracy", "agreement")
#: How the report names the data sets it mentions.
DATASET_TITLES = {"mnist": "MNIST", "fashionmnist": "Fashion-MNIST"}
MAIN = ("none", "pp", "edm", *ENGINE_MODES)  # the order of the report's tables
NAMES = plots.NAMES
#: The columns of accuracy.csv: the arm's, then its run's.
ARM_FIELDS = ("arm", "defense", "cs", "top_k")
RUN_FIELDS = ("loss", "budget", "accuracy", "r_test", "r_test_tv", "r_unif", "r_unif_tv", "epochs", "train_s", "device")
CSV_FIELDS = ARM_FIELDS + RUN_FIELDS

#: Row order and names of the arms.
ARM_NAMES = {
    "none": "undefended",
    "pp": "Prediction Poisoning",
    "edm": "Ensemble of Diverse Models",
    "deepdefense": "DeepDefense",
    "none+gate": "Adaptive Misinformation (`--defense none --gate misinform`)",
    "deepdefense+gate": "**DeepDefense + gate** (`--gate misinform`)",
}
QUERY_SET_NAMES = {
    "random": "random {attacker} training images (the paper's attacker)",
    "jbda": "JBDA from {seeds} {victim} training images",
    "victim-train": "random {victim} training images (in domain: the ceiling the gate should not stop)",
    "twins": "random {attacker} training images, each sent twice (the second with one pixel moved by 1/255)",
    "adaptive": "the adaptive thief: JBDA from {seeds} {victim} training images, each query sent with its twin, "
    "grown only from the answers that moved between twins",
}
#: The targets (issue 28): the strongest attacker through the gated default with keys stays at or below this, with
#: the paper's queries at B = 10,000 and with JBDA at B = 2,500.
TARGET = 30.0
TARGETS = (
    ("random", 10_000, "the paper's queries"),
    ("jbda", 2_500, "JBDA"),
    ("adaptive", 2_500, "the adaptive thief"),
)


def paper_for(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The paper's numbers when the record's victim is the paper's (LeNet on MNIST); None for another victim
    (the paper attacks no Fashion-MNIST victim)."""
    return PAPER if record.get("dataset", "mnist") == "mnist" else None


def accuracy_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per trained attack model."""
    return [
        {"arm": key, "defense": arm["defense"], **{f: arm.get("settings", {}).get(f) for f in ("cs", "top_k")}}
        | {f: run.get(f) for f in RUN_FIELDS}
        for key, arm in record["arms"].items()
        for run in arm["runs"]
    ]


def main_arms(record: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The paper's arms, by defense: main, ungated, on the paper's query set (Table 5, Figure 2)."""
    return {a["defense"]: a for k, a in record["arms"].items() if role_of(k, a) == ("main", False, "random")}


def _accuracy(record: Mapping[str, Any], defense: str, loss: str, budget: int) -> float | None:
    runs = main_arms(record).get(defense, {}).get("runs", [])
    return next((r["accuracy"] for r in runs if r["loss"] == loss and r["budget"] == budget), None)


def tables(record: Mapping[str, Any]) -> dict[str, Any]:
    """Table 5 (and the other attackers' rows), Table 3, Table 4, the fidelity measures and Table 2."""
    arms, main = record["arms"], main_arms(record)
    budget, present = max(record["config"]["budgets"]), [d for d in MAIN if d in main]
    by_loss = {loss: {d: _accuracy(record, d, loss, budget) for d in present} for loss in record["config"]["losses"]}
    paper = (paper_for(record) or {}).get("table5", {})
    table5 = [{"defense": d, "ours": by_loss.get("explanations", {}).get(d), "paper": paper.get(d)} for d in present]
    for r in table5:
        r["difference"] = None if None in (r["ours"], r["paper"]) else round(r["ours"] - r["paper"], 2)
    fields = ("loss", "budget", *(f for f, _ in FIDELITY_CELLS))
    fidelity = [
        {"defense": d, **{k: run.get(k) for k in fields}}
        for d in present
        for run in main[d]["runs"]
        if run["budget"] == budget
    ]
    table3, table4 = [], []
    for key, arm in arms.items():
        role = role_of(key, arm)[0]
        if role != "main":
            settings = {"top_k": 1, **arm["settings"]}  # PP names k only when it is not the argmax
            (table3 if role == "cs" else table4).append(_variant(key, arm, settings, arm["budget"], arm["runs"]))
    for key, entry in (record.get("not_collected") or {}).items():  # a CS arm not run beside its twin's figures
        twin = _same_layers_as(record, key)
        if twin:
            same = next(r for r in table3 if r["arm"] == twin)
            table3.append({**same, "arm": key, "cs": entry["settings"].get("cs"), "same_as": twin})
    ablation = record["config"].get("ablation_budget") or budget
    ablation_losses = record["config"].get("ablation_losses") or ["explanations"]
    if "pp" in main:  # PP beside the DeepDefense variants, as in the paper's Tables 3 and 4
        # the attackers the DeepDefense variants faced (--ablation-losses), not every one
        pp = _variant("pp", main["pp"], {}, ablation, [r for r in main["pp"]["runs"] if r["loss"] in ablation_losses])
        table3 += [pp] if table3 else []
        table4 += [pp] if table4 and not any(r["defense"] == "pp" for r in table4) else []
    runtime = [{"arm": key, "defense": arm["defense"], **arm["runtime"]} for key, arm in arms.items()]
    drops = {
        key: {k: v for k, v in arm["average_drop"].items() if k != "figure"}
        for key, arm in arms.items()
        if "average_drop" in arm
    }
    main_tables = {"budget": budget, "table5": table5, "by_loss": by_loss, "fidelity": fidelity}
    return main_tables | {"table3": table3, "table4": table4, "runtime": runtime, "average_drop": drops}


def _variant(key: str, arm: Mapping[str, Any], settings: Mapping[str, Any], budget: int, runs: list) -> dict:
    """A row of Table 3 or 4: the arm's settings and runtime, and its attackers' accuracy at ``budget``."""
    row = {"arm": key, "defense": arm["defense"], **{k: settings.get(k) for k in ("cs", "top_k", "layers")}}
    runtime = arm["runtime"] if settings else {"ms_per_query": arm["runtime"]["ms_per_query"]}
    row |= {"budget": budget, **{k: runtime.get(k) for k in ("ms_per_query", "mean_l_orth", "fallbacks")}}
    return row | {"accuracy": {r["loss"]: r["accuracy"] for r in runs if r["budget"] == budget}}


def write_outputs(record: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """results.json, accuracy.csv, tables.json, average_drop.json, fig2.png and fig3.png in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = tables(record)
    drops = t["average_drop"]  # without their figures
    arms = {k: a | ({"average_drop": drops[k]} if k in drops else {}) for k, a in record["arms"].items()}
    paths = {name: out / f"{name}.json" for name in ("results", "tables", "average_drop")}
    for name, payload in zip(paths, ({**record, "arms": arms}, t, drops), strict=True):
        write_json(paths[name], payload)
    rows = accuracy_rows(record)
    paths["accuracy"] = out / "accuracy.csv"
    with open(paths["accuracy"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    main = main_arms(record)
    main_rows = [r for r in rows if main.get(r["defense"]) is record["arms"][r["arm"]]]
    if main_rows:
        paths["fig2"] = plots.figure2(
            main_rows,
            out / "fig2.png",
            paper=(paper_for(record) or {}).get("table5"),
            paper_budget=PAPER["table5_budget"],
            victim_accuracy=record.get("victim_accuracy"),
            title=f"{record['config']['checkpoint']}, {record['config']['interpreter']}, "
            f"P_A = {record['config']['attacker_dataset']}",
        )
    key, arm = next(((k, a) for k, a in record["arms"].items() if a.get("average_drop", {}).get("figure")), ("", {}))
    if arm:
        maps = (arm["average_drop"]["figure"][k] for k in ("images", "victim_maps", "defended_maps", "labels"))
        paths["fig3"] = plots.figure3(*maps, out / "fig3.png", defended_name=NAMES.get(arm["defense"], key))
    return paths


def _title(dataset: str) -> str:
    return DATASET_TITLES.get(dataset, dataset)


def _cell(value: float | None) -> str:
    """An accuracy cell: *not run* when no attack model of it is stored."""
    return "*not run*" if value is None else num(value)


def gated_run(record: Mapping[str, Any]) -> bool:
    """Whether the record is the gate's: gated arms, or query sets other than the paper's."""
    c = record["config"]
    roles = [role_of(k, a) for k, a in record["arms"].items()]
    return bool(c.get("gated")) or set(c.get("query_sets", ["random"])) != {"random"} or any(g for _, g, _ in roles)


def markdown(
    record: Mapping[str, Any], out: str | Path, doc: str | Path, baseline: Mapping[str, Any] | None = None
) -> str:
    """The record's report: the gate's when it is a gated run (:func:`gated_run`), else the paper's; ``baseline``
    (another run's record) fills the gate's ungated rows this run did not collect."""
    rel = _relative(Path(out), Path(doc).parent)
    if gated_run(record):
        return document(_gate_report(record, Path(out), Path(doc).parent, rel, baseline))
    return document(_paper_report(record, Path(rel)))


def _paper_report(record: Mapping[str, Any], rel: Path) -> list[str]:
    """Our numbers beside the paper's, the differences, the command that made them."""
    t = tables(record)
    c, env = record["config"], record["environment"]
    recipe = c.get("recipe", c)  # records written before the recipe had its own type hold its fields flat
    budget, budgets = t["budget"], sorted(c["budgets"])
    present = [d for d in MAIN if d in main_arms(record)]
    paper = paper_for(record)
    columns = [d for d in MAIN if d in present or (paper and d in paper["table5"])]
    differences = {r["defense"]: r["difference"] for r in t["table5"]}
    lines = [
        f"# {c['checkpoint']} ({c['interpreter']}): model stealing against each defense",
        "",
        *generated_by(
            "deepdefense eval",
            "rerun the command (finished collections and\ntrainings are cached in the results folder and the "
            "transfer-set stores) to regenerate.",
        ),
        f"* command: `{record.get('command', '')}`",
        (
            f"* seed {c['seed']}; attacker's queries: random images of the {c['attacker_dataset']} training split; "
            f"attack model {record.get('arch', 'the victim architecture')}, {recipe['optimizer']} lr {recipe['lr']:g}, "
            f"batch {recipe['batch_size']}, {recipe['schedule']} schedule, {recipe['epochs']} epochs, "
            f"λ {recipe['lam']:g} (eq. 1)"
        ),
        f"* test set: {'all' if c['test_n'] is None else 'first ' + str(c['test_n'])} {record.get('dataset', '')} "
        f"test images; |U| = {c['n_unif']:,} uniform inputs for R_unif",
        (
            f"* this invocation: {env['host']} ({env['machine']}, torch {env['torch']}, {env['threads']} threads), "
            f"attack models on {env['device']}{', ' + env['cuda'] if env.get('cuda') else ''}, "
            f"defenses on {env['defense_device']}"
        ),
        *_provenance(record),
        *_not_collected(record),
        f"* results folder: [`{rel}/`]({rel}/) (`results.json`, `accuracy.csv`, `tables.json`, "
        "`average_drop.json`, `fig2.png`, `fig3.png`)",
        "",
        f"## Table 5: attack-model test accuracy (%) at B = {budget:,}, attacker of eq. (1)",
        "",
        *table(["", *(NAMES[d] for d in columns)]),
        *([row(["paper", *(num(paper["table5"].get(d)) for d in columns)])] if paper else []),
        row(["ours", *(_cell(t["by_loss"].get("explanations", {}).get(d)) for d in columns)]),
        *([row(["ours − paper", *(signed(differences.get(d)) for d in columns)])] if paper else []),
        "",
        f"Victim accuracy on the same test images: {num(record.get('victim_accuracy'))}% "
        + (f"(paper, Table 1: {paper['victim_accuracy']}%)." if paper else "(the paper has no such victim)."),
    ]
    if not paper:
        lines += [
            "",
            f"The paper attacks no {_title(record.get('dataset', ''))} victim: there are no paper numbers to set "
            "beside these. The roles of the data sets are swapped against the MNIST report: the victim learnt "
            f"{_title(record.get('dataset', ''))}, the attacker queries random {_title(c['attacker_dataset'])} "
            "training images.",
        ]
    elif "edm" in present:
        lines += [
            "",
            "EDM has no Table 5 entry in the paper (it appears only in its Figure 2, whose numbers the text "
            "we have does not give).",
        ]
    lines += ["", f"## Every attacker against each defense (B = {budget:,})", ""]
    lines += table(
        ["attacker (loss)", *(NAMES[d] for d in present)],
        (
            [f"{plots.TITLES.get(loss, loss)} (`{loss}`)", *(_cell(t["by_loss"][loss].get(d)) for d in present)]
            for loss in c["losses"]
        ),
    )
    lines += [
        "",
        "## Figure 2: test accuracy against the query budget",
        "",
        f"![Figure 2]({rel}/fig2.png)",
        "",
        (
            "Stars: the paper's Table 5 at B = 10,000 (the paper's Figure 2 itself is not in the text we have)."
            if paper
            else "No stars: the paper has no numbers for this victim."
        ),
        "",
        *table(
            ["defense", "attacker", *(f"B = {b:,}" for b in budgets)],
            (
                [NAMES[d], f"`{loss}`", *(_cell(_accuracy(record, d, loss, b)) for b in budgets)]
                for d in present
                for loss in c["losses"]
            ),
        ),
        "",
        *_not_run_legend(record, present, budgets),
        "",
        f"## Fidelity of the stolen models to the victim (B = {budget:,})",
        "",
        f"R_test / R_unif: percent of {_title(record.get('dataset', 'the victim'))} test images / uniform random",
        "inputs on which the attack model's top-1 differs from the victim's (the talk's 0-1 distance; 100 − R is",
        "the agreement); TV: mean total",
        "variation ½‖f(x) − f̂(x)‖₁ of the probabilities.",
        "",
        *table(
            "defense | attacker | accuracy | R_test | R_test^TV | R_unif | R_unif^TV",
            (
                [NAMES[r["defense"]], f"`{r['loss']}`", *(num(r[k], n) for k, n in FIDELITY_CELLS)]
                for r in t["fidelity"]
            ),
        ),
        *_unif_note(record),
        *_honest_users(record, gated=False),
        *_average_drop_section(record, t, rel),
        *_runtime_sections(t, record["config"]),
    ]
    return lines + (_differences(t, record) if paper else _setup_notes(record))


def _not_run_legend(record: Mapping[str, Any], present: list[str], budgets: list[int]) -> list[str]:
    """Why a Figure 2 cell says *not run*; the labels of a top-1-keeping arm get their own reason."""
    lines = [
        "*not run*: no attack model of that cell is stored (`--only-cached` trains none); the same command",
        "without `--only-cached` trains it.",
    ]
    same_labels = [
        NAMES[d]
        for d in present
        if d in ENGINE_MODES
        and "labels" in record["config"]["losses"]
        and any(_accuracy(record, d, "labels", b) is None and _accuracy(record, "none", "labels", b) for b in budgets)
    ]
    if same_labels:
        lines += [
            "",
            f"`labels` through {', '.join(same_labels)}: these arms answer the victim's top-1 for every query",
            "(constraint (3) with k = 1; a fail-closed safe answer keeps it too), and they are asked the same",
            "queries as Undefended, so the labels attacker's transfer set is Undefended's: its row is their figure,",
            "and their trainings were spent on the cells above instead.",
        ]
    return lines


def _provenance(record: Mapping[str, Any]) -> list[str]:
    """Which command on which machine trained the attack models shown (cached records keep theirs)."""
    made = Counter(
        (run.get("made_by") or "unrecorded", run.get("machine") or run.get("device", "unrecorded"))
        for arm in record["arms"].values()
        for run in arm["runs"]
    )
    return [
        f"* {n} attack model{'s' if n > 1 else ''} trained by `{cmd}` on {where}" for (cmd, where), n in made.items()
    ]


def _not_collected(record: Mapping[str, Any]) -> list[str]:
    """Arms this run planned but could not report: with ``--only-cached`` their queries were never sent."""
    why = "its transfer set is not stored, no attack model of it is cached, and `--only-cached` sends nothing"
    also = lambda twin: f"; it optimises the same layers as `{twin}`, so its answers are that arm's" if twin else ""
    return [f"* not run: `{k}` ({why}{also(_same_layers_as(record, k))})" for k in record.get("not_collected") or {}]


def _same_layers_as(record: Mapping[str, Any], key: str) -> str | None:
    """The reported CS arm whose engine optimises the same layers as the not-run CS arm ``key`` (CS only
    chooses the layers, eq. 9: same layers, same engine, same answers), or None."""
    entry = (record.get("not_collected") or {}).get(key)
    if not isinstance(entry, Mapping) or role_of(key, entry)[0] != "cs":
        return None
    layers = lambda settings: {k: v for k, v in (settings or {}).items() if k != "cs"}
    twin = lambda k, a: role_of(k, a)[0] == "cs" and layers(a["settings"]) == layers(entry.get("settings"))
    return next((k for k, a in record["arms"].items() if twin(k, a)), None)


def _unif_note(record: Mapping[str, Any]) -> list[str]:
    counts = record.get("victim_unif_classes")
    if not counts or not sum(counts):
        return []
    top = max(range(len(counts)), key=counts.__getitem__)
    share = 100.0 * counts[top] / sum(counts)
    return [
        "",
        f"On U the victim answers class {top} for {share:.1f}% of the inputs"
        + (", so R_unif mostly checks that the attack model does the same." if share >= 90 else "."),
    ]


def _honest_users(record: Mapping[str, Any], gated: bool) -> list[str]:
    """What an honest user pays for each arm (``--benign-n``): the first n victim test images sent as queries, the
    answered labels scored against the truth and against the victim's own top-1 (the benign cost)."""
    rows = [(key, arm) for key, arm in record["arms"].items() if arm.get("benign", {}).get("n")]
    if not rows:
        return []
    if gated:
        head = [
            "## Honest users",
            "",
            "The first n MNIST test digits sent through each arm (in-process, the server's `Defense.answer`), scored",
            "against the true labels and the victim's own labels; ms/query: the arm's answer time on "
            f"{record['config']['runtime_n']} test digits",
            "(in-process; gated arms skip the wrapped defense's work for flagged queries here, the server does not).",
            "",
        ]
        header = "arm | n | accuracy (%) | victim (%) | agrees with victim (%) | ms/query"
    else:
        head = [
            "",
            "## What honest users get (benign cost)",
            "",
            f"The first n {_title(record.get('dataset', ''))} test images sent to each arm as an honest user would "
            "send them; accuracy of the answered labels, and their agreement with the undefended victim's top-1.",
            "",
        ]
        header = "arm | n | accuracy (%) | victim's accuracy (%) | agreement with the victim (%) | ms/query"
    cells = (
        [_gate_name(key, arm) if gated else key, f"{b['n']:,}", *(num(b.get(k)) for k in BENIGN_CELLS), num(ms, 1)]
        for key, arm in rows
        for b, ms in [(arm["benign"], arm.get("runtime", {}).get("ms_per_query"))]
    )
    return [*head, *table(header, cells), *([""] if gated else [])]


def _average_drop_section(record: Mapping[str, Any], t: Mapping[str, Any], rel: Path) -> list[str]:
    pv, pd, pp = PAPER["average_drop"]["victim"], PAPER["average_drop"]["defended"], PAPER["average_drop"]["p_value"]
    lines = [
        "",
        f"## Table 2: Average Drop at p = {record['config']['p']:g}% (lower is better; mean ± std, fractions)",
        "",
        "Masking: each map's top p% pixels (ties by row-major index) keep their values, every other pixel is set",
        "to 0 in [0, 1] pixel space; both maps are scored by the victim for its own top-1 class",
        "(`measure/average_drop.py`).",
        "",
        *table(" | n | victim I | misdirection Ĩ | paired t-test p"),
    ]
    spread = lambda mean, std: f"{mean:.4f} ± {std:.4f}"
    if paper_for(record):
        lines.append(row(["paper (MNIST, Grad-CAM)", "—", spread(*pv), spread(*pd), pp]))
    if not t["average_drop"]:
        lines.append(row(["ours", "—", "not run", "not run", "—"]))
    for key, d in t["average_drop"].items():
        cells = [spread(d[k]["mean"], d[k]["std"]) for k in ("victim", "defended")]
        lines.append(row([f"ours ({key})", d["n"], *cells, num(d["ttest"]["p_value"], 4)]))
    if any("figure" in a.get("average_drop", {}) for a in record["arms"].values()):
        lines += ["", "## Figure 3: victim vs misdirection maps", "", f"![Figure 3]({rel}/fig3.png)"]
    return lines


def _runtime_sections(t: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    lines = [
        "",
        "## Runtime per query, every arm",
        "",
        "Wall-clock over the first test images, in requests of the query batch (in-process: `Defense.answer`;",
        "otherwise HTTP round trips).",
        "",
        *table(
            "arm | n | batch | ms/query | mean L_orth | fallbacks | measured on",
            (
                [r["arm"], r["n"], r["query_batch"], num(r["ms_per_query"], 1), num(r.get("mean_l_orth"), 3), *extra]
                for r in t["runtime"]
                for extra in [(r.get("fallbacks", "—"), r.get("machine", "—"))]
            ),
        ),
    ]
    paper3 = PAPER["table3_flowers_l17"]
    lines += [
        "",
        "## Table 3: cumulative sensitivity CS",
        "",
        "Paper (Flowers-17, ResNet-18, Rel-CAM at layer 17, RTX 2080 Ti — another model and data set, for scale): "
        + "; ".join(f"CS {cs}%: {v[0]} layers, f_A {v[1]}%, {v[2]} s" for cs, v in paper3.items() if cs != "pp")
        + f"; PP: f_A {paper3['pp'][0]}%, {paper3['pp'][1]} s.",
        "",
    ]
    lines += _variant_table(t["table3"], "CS (%)", "cs") or [_variant_not_run(config, "cs")]
    paper4 = PAPER["table4_flowers"]
    lines += [
        "",
        "## Table 4: top-k kept",
        "",
        (
            f"Paper (Flowers-17, Grad-CAM): DD k=1 {paper4['dd'][1]}%, k=3 {paper4['dd'][3]}%; "
            f"PP k=1 {paper4['pp'][1]}%, k=5 {paper4['pp'][5]}%."
        ),
        "",
    ]
    lines += _variant_table(t["table4"], "k", "top_k") or [_variant_not_run(config, "top_k")]
    return lines


def _variant_not_run(config: Mapping[str, Any], field: str) -> str:
    """Why a Table 3 / 4 has no row: the one of the three reasons that holds for this run."""
    flag = "--" + field.replace("_", "-")
    if "deepdefense" not in config.get("defenses", ()):
        return "Not run: `deepdefense` is not among `--defenses`."
    if not config.get(field):
        return f"Not run: `{flag}` was given without values, which skips these arms."
    values = " ".join(str(v) for v in config[field])
    return f"Not run: no attack model of the `{flag} {values}` arms is stored, and `--only-cached` trains none."


def _variant_table(rows: list[Mapping[str, Any]], label: str, field: str) -> list[str]:
    if not rows:
        return []
    losses = list(dict.fromkeys(loss for r in rows for loss in r["accuracy"]))
    lines = table(
        ["defense", label, "layers", "B", "ms/query", "mean L_orth", "fallbacks"]
        + [f"f_A `{loss}` (%)" for loss in losses]
    )
    order = {"deepdefense": 0, "pp": 1}
    for r in sorted(rows, key=lambda r: (order.get(r["defense"], 2), r[field] if r[field] is not None else math.inf)):
        layers = ", ".join(str(x).split(".")[-1] for x in r["layers"]) if r["layers"] else "—"
        value = "—" if r[field] is None else f"{r[field]:g}"
        if r.get("same_as"):  # not run: the same layers as another CS, so the same engine and answers
            value += f" (= {r['same_as'].removeprefix('deepdefense-')}: same layers, not run)"
        fallbacks = r["fallbacks"] if r["fallbacks"] is not None else "—"
        cells = [f"{r['budget']:,}", num(r["ms_per_query"], 1), num(r["mean_l_orth"], 3), fallbacks]
        accuracy = (_cell(r["accuracy"].get(loss)) for loss in losses)
        lines.append(row([NAMES.get(r["defense"], r["defense"]), value, layers, *cells, *accuracy]))
    return lines


def _differences(t: Mapping[str, Any], record: Mapping[str, Any]) -> list[str]:
    measured = [r for r in t["table5"] if r["difference"] is not None]
    lines = ["", "## Where we differ from the paper", ""]
    lines += [
        f"* {NAMES[r['defense']]}: {r['ours']:.2f}% against {r['paper']:.2f}% ({r['difference']:+.2f} points)."
        for r in measured
    ]
    missing = [NAMES[r["defense"]] for r in t["table5"] if r["ours"] is None]
    lines += [f"* Not measured in this run: {', '.join(missing)}."] if missing else []
    unpaired = [
        f"{NAMES[r['defense']]} {r['ours']:.2f}%" for r in t["table5"] if r["ours"] is not None and r["paper"] is None
    ]
    lines += [f"* No paper figure to compare with: {', '.join(unpaired)}."] if unpaired else []
    return lines + _evidence(t) + _setup_notes(record)


def _setup_notes(record: Mapping[str, Any]) -> list[str]:
    """How our setup differs from the paper's (and, for another victim, what was kept the same)."""
    attacker = record["config"]["attacker_dataset"]
    return [
        "",
        "Known differences in the setup (each can move these numbers; none is a measured cause on its own):",
        "",
        "* The paper does not give the attacker's training recipe (optimizer, learning rate, epochs, batch, λ of",
        "  eq. 1). Ours was tuned for the *undefended* eq. (1) and soft-label attackers at B = 10,000",
        "  (docs/results/attack-tuning.md) and then kept fixed for every defense. One seed per cell: how far a",
        "  cell moves with the seed, and between two runs of the same command on a GPU, is measured there.",
        "* PP: MAD with ε = 0.5 and a randomly initialised surrogate (Orekondy's reference protocol); the paper",
        "  says only that its hyperparameters were adjusted to keep the victim's accuracy. PP leaves the maps",
        "  undefended, so the eq. (1) attacker still learns from the victim's own maps.",
        "* DD, DD-S, DD-I: our engine's solver and constraints differ from the paper's (docs/design.md,",
        "  docs/tuning.md): relative SGD steps that stay in the feasible region, a Spearman floor for",
        "  constraint (4), a margin in eq. (7), CS 90% of the layer sensitivity (eq. 9).",
        f"* The transfer set is one random draw of the {_title(attacker)} training split"
        + (" (the paper's P_A for MNIST);" if attacker == "fashionmnist" else ";"),
        "  the paper's draw and its test subset are unknown.",
        *(
            [
                "* EDM: an ensemble trained with the victim's training images in-domain and *synthetic* outliers",
                "  (defense/outliers.py) out of domain, never the attacker's data set (the talk notes that EDM",
                "  assumes the attacker's OOD data is known; we do not grant it that).",
            ]
            if "edm" in record["arms"]
            else []
        ),
    ]


def _evidence(t: Mapping[str, Any]) -> list[str]:
    """What this run's own numbers say about the gaps (only sentences whose numbers are all measured)."""
    get = lambda loss, defense: t["by_loss"].get(loss, {}).get(defense)
    lines: list[str] = []
    eq1, soft, top1 = (get(loss, "pp") for loss in ("explanations", "probabilities", "labels"))
    soft0, top10 = get("probabilities", "none"), get("labels", "none")
    if None not in (soft, soft0, top1, top10):
        lines.append(
            f"* PP moves the soft-label attacker from {soft0:.2f}% to {soft:.2f}% ({soft - soft0:+.2f}) and the "
            f"top-1 attacker from {top10:.2f}% to {top1:.2f}% ({top1 - top10:+.2f}): MAD keeps the argmax, "
            "so labels alone are out of its reach."
        )
    if None not in (eq1, soft):
        lines.append(
            f"* Against PP the eq. (1) attacker reaches {eq1:.2f}%, {eq1 - soft:+.2f} points over soft labels "
            "alone: PP answers the victim's own maps, and the map term of eq. (1) learns from them."
        )
    if top1 is not None and top1 > PAPER["table5"]["pp"]:
        lines.append(
            f"* The paper's PP figure ({PAPER['table5']['pp']:.2f}%) lies {top1 - PAPER['table5']['pp']:.2f} "
            f"points below what our top-1 attacker gets through PP ({top1:.2f}%), which no argmax-keeping "
            "perturbation can lower: the paper's eq. (1) attacker must have been misled by PP's soft labels "
            "more than ours (whose recipe was tuned to be strong, see below), or its PP was set up "
            "differently (ε, surrogate)."
        )
    dd, dd_s, dd_i = (get("explanations", d) for d in ENGINE_MODES)
    if None not in (dd, dd_i):
        lines.append(
            f"* DD-I (victim's probabilities, misdirected maps) {dd_i:.2f}% vs DD {dd:.2f}%: the "
            f"probabilities' share of the defense is {dd_i - dd:+.2f} points (paper "
            f"{PAPER['table5']['dd-i'] - PAPER['table5']['deepdefense']:+.2f})."
        )
    if None not in (dd, dd_s):
        lines.append(
            f"* DD-S (misdirected probabilities, victim's maps) {dd_s:.2f}% vs DD {dd:.2f}%: the maps' "
            f"share is {dd_s - dd:+.2f} points (paper {PAPER['table5']['dd-s'] - PAPER['table5']['deepdefense']:+.2f})."
        )
    dd_top1 = get("labels", "deepdefense")
    same = dd_top1 is None and top10 is not None  # not trained: DD's labels are Undefended's (top-1 kept)
    dd_top1 = top10 if same else dd_top1
    if None not in (dd, dd_top1):
        lines.append(
            f"* Through DD the top-1 attacker reaches {dd_top1:.2f}% "
            f"({'the labels are Undefended’s' if same else f'undefended {num(top10)}%'}): DD keeps the "
            f"top-1 class by design, so the labels alone are out of its reach as they are out of PP's. The "
            f"eq. (1) attacker gets {dd:.2f}%, {dd - dd_top1:+.2f} points against ignoring everything but the "
            "label: the misdirected probabilities and maps are worth "
            f"{'less than nothing' if dd < dd_top1 else 'little'}"
            f" to it. The paper's DD figure ({PAPER['table5']['deepdefense']:.2f}%) lies "
            f"{dd_top1 - PAPER['table5']['deepdefense']:.2f} points below our top-1 attacker through DD, which "
            "no top-1-keeping answer can lower; the paper's attacker must have followed the misdirected soft "
            "labels and maps far more than the label they carry."
        )
    edm_top1, edm_eq1 = get("labels", "edm"), get("explanations", "edm")
    if None not in (edm_top1, top10):
        lines.append(
            f"* Through EDM the top-1 attacker gets {edm_top1:.2f}% ({edm_top1 - top10:+.2f} against undefended"
            f"{'' if edm_eq1 is None else f'; eq. (1) {edm_eq1:.2f}%'}): EDM is the one arm here that does not "
            "keep the victim's top-1 on the attacker's queries (the member a query hashes to answers "
            "out-of-domain images its own way), so it goes below the label line; on honest digits see the "
            "benign table."
        )
    return ["", *lines] if lines else []


def _gate_name(key: str, arm: Mapping[str, Any]) -> str:
    """How the gate's report names an arm (``ARM_NAMES``; the key of an arm it has no name for)."""
    role, gated, _ = role_of(key, arm)
    return ARM_NAMES.get(arm["defense"] + "+gate" * gated, key) if role == "main" else key


def accuracy_grid(record: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{query set: {budget: {arm: {loss: (accuracy, kept share, source)}}}} from the record's main arms (and, for
    arms it lacks, the baseline record's random-query-set arms)."""
    grid: dict[str, Any] = {}
    budgets = set(record["config"]["budgets"])
    sources = [("", record)] + ([("baseline", baseline)] if baseline else [])
    for source, rec in sources:
        for key, arm in rec["arms"].items():
            role, gated, query_set = role_of(key, arm)
            base = arm["defense"] + "+gate" * gated
            if role != "main" or base not in ARM_NAMES:
                continue
            for run in arm.get("runs", []):
                if source and run["budget"] not in budgets:  # the baseline fills this run's table, no more
                    continue
                cells = grid.setdefault(query_set, {}).setdefault(run["budget"], {}).setdefault(base, {})
                if run["loss"] in cells:  # this run's own cell wins over the baseline's
                    continue
                kept = run.get("kept", run["budget"])
                cells[run["loss"]] = (run.get("accuracy"), 100.0 * kept / run["budget"], source)
    return grid


def strongest(cells: Mapping[str, tuple[float | None, float, str]]) -> tuple[str, float] | None:
    best = max(((acc, loss) for loss, (acc, _, _) in cells.items() if acc is not None), default=None)
    return None if best is None else (best[1], best[0])


def _gate_report(
    record: Mapping[str, Any], out: Path, here: Path, rel: str, baseline: Mapping[str, Any] | None
) -> list[str]:
    c, env = record["config"], record["environment"]
    grid = accuracy_grid(record, baseline)
    measured = {loss for qs in grid.values() for b in qs.values() for a in b.values() for loss in a}
    losses = [loss for loss in ATTACK_LOSSES if loss in measured]
    lines = [
        "# Below the label line: the misinformation gate and the extraction monitor",
        "",
        *generated_by(
            "deepdefense eval",
            "rerun the command (collections and trainings are\ncached in the results folder and the transfer-set "
            "stores) to regenerate.",
        ),
        f"* command: `{record.get('command', '')}`",
        f"* victim `{c['checkpoint']}` ({record.get('victim_accuracy')}% test accuracy), "
        f"interpreter {c['interpreter']}, seed {c['seed']}; attack model {record.get('arch')} trained as in "
        "`docs/results/attack-tuning.md`",
        f"* machine: {env.get('host')} {env.get('machine')}, {env.get('threads')} torch threads; results: `{rel}`",
    ]
    if baseline:
        lines.append(
            f"* rows marked † come from `{baseline.get('command', 'another run')}` (the same attacker, recipe, "
            "seed and query set; this run did not collect them again)"
        )
    lines += [
        "",
        "Attackers: `explanations` — eq. (1), probabilities and maps; `probabilities` — Knockoff Nets' soft labels;",
        "`labels` — top-1 only; and two that know about the gate and drop the answers they suspect before training",
        "on labels (`clients/attack_losses.py`): `confident` keeps answers whose top probability is ≥ 0.99,",
        "`doubtful` keeps those below (the misinformation model is confidently wrong); and on query sets of twins,",
        "`twin` keeps the answers that moved between an image and its twin (`clients/adaptive.py`: answers drawn",
        "from one fixed network would stand still). The share of answers a filtering attacker kept is in brackets.",
        "*Strongest* is the best attacker of the row.",
        "",
        *_target(grid),
    ]
    if record.get("not_collected"):
        missing = ", ".join(f"`{k}`" for k in record["not_collected"])
        lines += [
            "",
            f"Not collected by this run (`--only-cached` sends nothing; rows marked † come from the baseline): "
            f"{missing}.",
        ]
    names = {"attacker": c["attacker_dataset"], "seeds": c.get("jbda_seeds"), "victim": record.get("dataset")}
    for query_set in [q for q in QUERY_SET_NAMES if q in grid]:
        name = QUERY_SET_NAMES[query_set].format(**names)
        lines += ["", f"## Queries: {name}", ""]
        for budget in sorted(grid[query_set], reverse=True):
            arms = grid[query_set][budget]
            lines += [f"**B = {budget:,}** — MNIST test accuracy of the attack model (%)", ""]
            lines += table(["arm", *losses, "strongest"])
            for arm in [a for a in ARM_NAMES if a in arms]:
                cells, best = arms[arm], strongest(arms[arm])
                name = ARM_NAMES[arm] + (" †" if any(src for _, _, src in cells.values()) else "")  # †: the baseline's
                best_cell = f"{num(best[1])} ({best[0]})" if best else "—"
                lines.append(row([name, *(_kept_cell(cells.get(loss)) for loss in losses), best_cell]))
            lines.append("")
    return [
        *lines,
        *_honest_users(record, gated=True),
        *_client_benign(out),
        *_monitor(record),
        *_domain(here / "domain-score.json"),
        *_latency(here / "gate-latency.json"),
    ]


def _kept_cell(cell: tuple[float | None, float, str] | None) -> str:
    if cell is None:
        return "not run"
    acc, kept, _ = cell
    text = num(acc) if acc is not None else "kept none"
    return text if kept >= 99.995 else f"{text} ({kept:.0f}%)"


def _target(grid: Mapping[str, Any]) -> list[str]:
    lines = []
    for query_set, budget, name in TARGETS:
        cells = grid.get(query_set, {}).get(budget, {}).get("deepdefense+gate")
        best = strongest(cells) if cells else None
        if best is None:
            continue
        verdict = "met" if best[1] <= TARGET else "**not met**"
        lines.append(
            f"* **Target** (issue 28): the strongest attacker through DeepDefense + gate with {name} at "
            f"B = {budget:,} reaches ≤ {TARGET:g}%: **{best[1]:.2f}%** ({best[0]}) — {verdict}."
        )
    return lines or ["Targets (issue 28): not measured by this run."]


def _client_benign(folder: Path) -> list[str]:
    """Honest users over HTTP (``deepdefense client``, ``benign-*.json`` in the results folder, made by its
    ``benign.sh``), with the server's count of misinformed answers (``benign-*-metrics.txt``)."""
    files = sorted(folder.glob("benign-*.json"))
    if not files:
        return []
    lines = [
        "Over HTTP, through servers started with the default settings but the defense "
        f"(`{_relative(folder / 'benign.sh', folder.parent)}`; `deepdefense client`, the first n MNIST test digits):",
        "",
        *table(
            "server | n | accuracy (%) | agrees with the victim (%) | misinformed answers | p50 latency (ms) | command"
        ),
    ]
    for path in files:
        d = json.loads(path.read_text())
        metrics = path.with_name(path.stem + "-metrics.txt")
        misinformed = str(misinformed_answers(metrics.read_text())) if metrics.is_file() else "—"
        cells = [num(d["accuracy"]), num(d["agreement_undefended"]), misinformed, num(d["latency_ms"]["p50"], 0)]
        lines.append(row([f"`{d['defense']}` + gate", f"{d['n']:,}", *cells, f"`{d['command']}`"]))
    return [*lines, ""]


def _monitor(record: Mapping[str, Any]) -> list[str]:
    rows = [(k, a) for k, a in record["arms"].items() if a.get("monitor")]
    if not rows:
        return []
    first = rows[0][1]["monitor"]
    watched = record["config"].get("monitored")
    how = (
        "Each arm's queries were sent as one API key of the default server with keys: the monitor screened them "
        "before they were answered and escalated the key when its queries looked like extraction (`server/monitor.py`:"
        f" domain flags above {100 * first['threshold']:g}% of a {first['window']}-query window, near-duplicates "
        "above 20%, PRADA's W below its line, or taint from an escalated key's queries); from then on every answer "
        "came from the misinformation path."
        if watched
        else "Each transfer set replayed in query order, as one API key, through the monitor's policy "
        f"(`server/monitor.py`: window {first['window']}, at least {first['min_queries']} queries, escalated when "
        f"more than {100 * first['threshold']:g}% of the window is flagged)."
    )
    lines = [
        "## The extraction monitor",
        "",
        how + f" Honest traffic: the MNIST test digits cut into keys of {first.get('benign_key_queries', '—')} "
        "queries, clean and perturbed as in `docs/results/domain-score.md`, all through one monitor.",
        "",
        *table("arm | query set | flagged queries (%) | escalated after query | why | PRADA's W"),
    ]
    for key, arm in rows:
        m, at = arm["monitor"], arm["monitor"].get("escalated_at")
        seen = m.get("watched") or {}
        escalated = "never" if at is None else f"{at:,}"
        cells = [num(m["flagged_pct"]), escalated, seen.get("reason") or "—", num(seen.get("spread"), 3)]
        lines.append(row([_gate_name(key, arm), role_of(key, arm)[2], *cells]))
    benign = first.get("benign")
    if benign:
        lines += [
            "",
            *table("honest traffic | keys | flagged queries (%) | near-duplicates (%) | lowest W | keys escalated"),
        ]
        for name, b in benign.items():
            cells = [num(b["flagged_pct"]), num(b.get("duplicates_pct")), num(b.get("min_spread"), 3)]
            lines.append(row([name, b["keys"], *cells, b["escalated"]]))
    if first.get("threshold_choice"):
        total, choice = first["threshold_choice"]["keys"], first["threshold_choice"]["escalated"]
        lines += [
            "",
            f"How the domain-flag threshold was chosen, before any of the above: honest keys escalated among {total} "
            f"keys of {first.get('benign_key_queries', '—')} perturbed *training* digits (the last 10,000 of the "
            "victim's training split: clean, blurred, noisy, shifted, thicker, thinner) per candidate, by the domain "
            f"flags alone; the lowest with none is 0.15; the default is {THRESHOLD} (server/monitor.py says why).",
            "",
            *table(["threshold", *choice], [["honest keys escalated", *choice.values()]]),
        ]
    return [*lines, ""]


def _domain(path: Path) -> list[str]:
    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    shipped = d["shipped"]["method"]
    m = d["evaluation"]["methods"][shipped]
    flags = ", ".join(f"{k} {100 * v:.1f}%" for k, v in m["false_flags"].items())
    return [
        "## The domain score",
        "",
        f"From `{d['command']}` (seed {d['seed']}; `docs/results/domain-score.md`): method `{shipped}`, fit on MNIST "
        "training images and synthetic outliers only, threshold chosen on held-out MNIST training images.",
        "",
        *table(
            "against | AUROC | flagged at the threshold",
            ([name, f"{auc:.4f}", f"{100 * m['detection'][name]:.1f}%"] for name, auc in m["auroc"].items()),
        ),
        "",
        f"In-domain false positives (MNIST test): {100 * m['fpr_in_domain']:.2f}%; honest perturbed digits: {flags}.",
        "",
    ]


def _latency(path: Path) -> list[str]:
    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    summary = [f"* {line}" for line in d.get("summary_lines", [])]
    return ["## Latency", "", f"From `{d.get('command', '')}` (`docs/results/gate-latency.md`).", "", *summary, ""]


def _relative(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())
