"""The report of ``deepdefense prepare``: each step's figures, read back from what it wrote beside the checkpoint
(so a step kept from an earlier run reports as one made now), and whether the misinformation gate can be on."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deepdefense.defense.baselines.edm import ensemble_paths, read_ensemble_meta
from deepdefense.defense.domain import domain_paths, read_domain_meta
from deepdefense.defense.loader import gate_available, load_defense, load_gate
from deepdefense.defense.misinformation import misinformation_path
from deepdefense.defense.sensitivity import select_layers
from deepdefense.defense.warm_start import WarmStartMeta, warm_start_paths
from deepdefense.measure.markdown import document, pct, row, table, yes
from deepdefense.models.checkpoint import CheckpointError, read_meta


def figures(step: str, victim: Path, out: Path) -> dict[str, Any]:
    """What ``step`` measured for ``victim``: the figures its command prints today, from its artifact."""
    return _FIGURES[step](victim, out)


def _sensitivity(victim: Path, out: Path) -> dict[str, Any]:
    stored = read_meta(victim).extra["sensitivity"]
    total = sum(stored["scores"].values())
    return {
        **{k: stored[k] for k in ("n", "seed", "scores")},
        "share_pct": {k: round(100 * v / total, 1) for k, v in stored["scores"].items()},
        "selected_cs90": select_layers(stored["scores"]),
    }


def _warmstart(victim: Path, out: Path) -> dict[str, Any]:
    meta = asdict(WarmStartMeta(**json.loads(warm_start_paths(victim)[0].read_text())))  # serve_steps' default too
    keys = ("interpreter", "layers", "images", "dataset", "rank", "steps", "serve_steps", "seed", "sha256")
    return {k: meta[k] for k in keys}


def _domain(victim: Path, out: Path) -> dict[str, Any]:
    meta = read_domain_meta(domain_paths(victim)[0])
    result: dict[str, Any] = {
        "method": meta.method,
        "threshold": meta.threshold,
        "fpr_target_held_out": meta.fpr,
        "fpr_held_out": meta.fpr_held_out,
        "variants_flagged_held_out": meta.extra.get("variants_flagged_held_out"),
    }
    record = out / "domain.json"
    if record.is_file():
        rec = json.loads(record.read_text())
        if rec.get("victim_sha256") == read_meta(victim).sha256 and "evaluation" in rec:
            test = rec["evaluation"]["methods"][meta.method]
            result["test"] = {k: test[k] for k in ("fpr_in_domain", "auroc", "detection", "false_flags")}
            result["record"] = record.name
    return result


def _misinfo(victim: Path, out: Path) -> dict[str, Any]:
    meta = read_meta(misinformation_path(victim).with_suffix(".json"))
    m = meta.extra["measured"]
    shape = m["answer_shape"]
    accuracy = ("victim_top1_accuracy", "misinfo_top1_accuracy", "top1_agreement_with_victim", "misinfo_mean_p_true")
    return {
        "test_n": m["n"],
        **{k: m[k] for k in accuracy},
        "max_probability_median": {k: shape[k]["max_probability_median"] for k in ("victim", "misinfo")},
        "answered_labels_most_frequent_share": m["answered_labels"]["misinfo"]["most_frequent_share"],
        "gradcam_median_spearman_vs_victim": m["gradcam"]["median_spearman_vs_victim"],
        "logit_temperature": meta.extra.get("logit_temperature"),
    }


def _edm(victim: Path, out: Path) -> dict[str, Any]:
    measured = read_ensemble_meta(ensemble_paths(victim)[0]).measured
    test = measured["test"]
    accuracy = ("victim_accuracy", "served_accuracy", "member_accuracy", "served_agreement_with_victim")
    result = {
        "members": len(test["member_accuracy"]),
        **{k: test[k] for k in accuracy},
        "held_out_outlier_coherence_mean": measured["held_out"]["outliers"]["coherence_mean"],
    }
    if "foreign_test" in measured:
        foreign = measured["foreign_test"]
        result["foreign"] = {k: foreign[k] for k in ("dataset", "coherence_mean", "members_disagree_top1_pct")}
    return result


_FIGURES = {f.__name__.removeprefix("_"): f for f in (_sensitivity, _warmstart, _domain, _misinfo, _edm)}


def gate_verdict(victim: Path, steps: dict[str, dict[str, Any]], data_root: Any, test_fpr: float) -> dict[str, Any]:
    """Whether ``deepdefense serve --checkpoint <victim>`` turns the gate on (``--gate auto``: both halves beside
    it, each loading against the victim's weights, as at the server's start), and whether the figures meet the
    project's targets: the domain score flags at most ``test_fpr`` of the unseen in-domain test images, and the
    misinformation model agrees with the victim at most as often as chance (100/K %)."""
    why_not = None
    if not gate_available(str(victim)):
        why_not = "no domain score or no misinformation model beside the checkpoint"
    else:
        try:
            inner, _ = load_defense(str(victim), "deepdefense", data_root=data_root)
            load_gate(inner, str(victim))
        except (CheckpointError, ValueError) as err:
            why_not = str(err)
    domain_test, mis = steps.get("domain", {}).get("test"), steps.get("misinfo")
    targets = [  # (what, value, at most)
        ("share of unseen in-domain test images the domain score flags",
         domain_test["fpr_in_domain"] if domain_test else None, test_fpr),
        ("misinformation model's top-1 agreement with the victim on the test split (%)",
         mis["top1_agreement_with_victim"] if mis else None, round(100 / len(read_meta(victim).classes), 2)),
    ]  # fmt: skip
    checks = [{"what": w, "value": v, "at_most": m, "passed": None if v is None else v <= m} for w, v, m in targets]
    return {"server_turns_it_on": why_not is None, "why_not": why_not, "checks": checks,
            "targets_met": why_not is None and all(c["passed"] for c in checks)}  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per step, then the gate's verdict."""
    v = report["victim"]
    status = lambda s: s["status"] if s["status"] == "kept" else f"made ({s['why']})"
    lines = [
        f"# deepdefense prepare: {Path(report['checkpoint']).stem}",
        "",
        f"* command: `{report['command']}`",
        f"* victim: {v['arch']} on {v['dataset']}, test accuracy {v['test_accuracy']:.2f}%, weights sha256 "
        f"{v['sha256'][:12]}…" + (f", converted from {v['imported']['description']}" if v.get("imported") else ""),
        f"* {report['seconds']:.0f} s in all; measured at commit {report['measured']['commit']}, "
        f"{report['measured']['date']}",
        "",
        *table(
            "step | status | seconds | figures",
            ([s["step"], status(s), f"{s['seconds']:.0f}", _SUMMARY[s["step"]](s["figures"])] for s in report["steps"]),
        ),
    ]
    gate = report["gate"]
    lines += ["", "## Misinformation gate", ""]
    on = "`deepdefense serve --checkpoint` turns it on (`--gate auto`): both halves load against these weights."
    lines.append(on if gate["server_turns_it_on"] else f"The server cannot turn it on: {gate['why_not']}.")
    lines += ["", *table("target | value | at most | met")]
    for c in gate["checks"]:
        met = "not measured" if c["passed"] is None else yes(c["passed"])
        lines.append(row([c["what"], "—" if c["value"] is None else f"{c['value']:g}", f"{c['at_most']:g}", met]))
    return document(lines)


_SUMMARY = {
    "sensitivity": lambda f: (
        "S_ℓ share "
        + ", ".join(f"{k.rsplit('.', 1)[-1]} {v}%" for k, v in f["share_pct"].items())
        + f"; CS 90%: {', '.join(f['selected_cs90'])}"
    ),
    "warmstart": lambda f: (
        f"{f['images']} {f['dataset']} images, layers {', '.join(f['layers'])}, serve steps {f['serve_steps']}"
    ),
    "domain": lambda f: (
        f"{f['method']}, held-out FPR {pct(f['fpr_held_out'])}"
        + (
            f"; test FPR {pct(f['test']['fpr_in_domain'])}, AUROC "
            + ", ".join(f"{k} {v:.4f}" for k, v in f["test"]["auroc"].items())
            if "test" in f
            else ""
        )
    ),
    "misinfo": lambda f: (
        f"top-1 accuracy {f['misinfo_top1_accuracy']}% (victim {f['victim_top1_accuracy']}%), "
        f"agreement with the victim {f['top1_agreement_with_victim']}%, "
        f"median max p {f['max_probability_median']['misinfo']} (victim {f['max_probability_median']['victim']}), "
        f"T = {f['logit_temperature']}"
    ),
    "edm": lambda f: (
        f"served {f['served_accuracy']}% (victim {f['victim_accuracy']}%, members "
        f"{', '.join(str(a) for a in f['member_accuracy'])}), agreement {f['served_agreement_with_victim']}%, "
        f"held-out outlier coherence {f['held_out_outlier_coherence_mean']}"
        + (f", {f['foreign']['dataset']} coherence {f['foreign']['coherence_mean']}" if "foreign" in f else "")
    ),
}
