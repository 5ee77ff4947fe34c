"""The Markdown report of ``deepdefense domain`` (docs/results/domain-score.md), from its JSON record only:
nothing here measures anything."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepdefense.measure.markdown import document, made_by, pct, table


def _variant_rule(record: Mapping[str, Any]) -> str:
    rate = record.get("variant_fpr")
    if rate is None:
        return ""
    return (
        f" and at most {pct(rate)} of each family of their honest variants (those the victim reads right; the "
        "smallest of the per-set thresholds)"
    )


def selection_section(record: Mapping[str, Any]) -> list[str]:
    sel = record["selection"]
    cands = sel["candidates"]
    kinds = list(next(iter(cands.values()))["detection"])
    out = [
        "## 1. Selection — training data and synthetic outliers only",
        "",
        f"Threshold per method: the largest that flags at most {pct(record['fpr'])} of the held-out training "
        "images"
        + _variant_rule(record)
        + ". Then, on held-out training images only: the share of synthetic outliers of each kind it flags "
        "(made from the held-out images; for `detector`, each kind is measured with a copy fitted *without* "
        "that kind, so these are unseen kinds for every method), and the share of honest digits it flags "
        "(the held-out images under a handwriting-like elastic deformation, ~1 px; the victim stays accurate "
        "on them). Rule: " + sel["rule"] + ".",
        "",
    ]
    header = ["method", "held-out FPR", *kinds, "mean caught", "honest variation flagged", "utility"]
    rows = []
    for name, c in cands.items():
        mark = " ✔" if name == sel["selected"] else ""
        shares = (c["fpr_held_out"], *(c["detection"][k] for k in kinds), c["mean_detection"], c["honest_false_flags"])
        rows.append([f"`{name}`{mark}", *map(pct, shares), f"{c['utility']:+.3f}"])
    out += table(header, rows)
    out += ["", "AUROC against each held-out outlier kind (held-out training images positive):", ""]
    out += table(["method", *kinds], [[f"`{n}`", *(f"{c['auroc'][k]:.4f}" for k in kinds)] for n, c in cands.items()])
    families = list(next(iter(cands.values())).get("variant_false_flags") or {})
    if families:
        out += [
            "",
            "Held-out honest variants flagged at the threshold, per family (`defense/honest_variants.py`, made from "
            "the held-out training images with their own seed; only those the victim reads right; `mix`: "
            "`honest_mix`, families composed):",
            "",
            *table(
                ["method", *families],
                [[f"`{n}`", *(pct(c["variant_false_flags"][k]) for k in families)] for n, c in cands.items()],
            ),
        ]
    out += ["", f"**Selected by this rule: `{sel['selected']}`.** Shipped: `{record['shipped']['method']}`.", ""]
    return out


def evaluation_section(record: Mapping[str, Any]) -> list[str]:
    ev = record.get("evaluation")
    if not ev:
        return ["## 2. Evaluation", "", "Not run (`--no-eval`).", ""]
    methods = ev["methods"]
    ood = list(next(iter(methods.values()))["auroc"])
    perts = list(next(iter(methods.values()))["false_flags"])
    shipped, sizes = record["shipped"]["method"], ev["sizes"]
    name = lambda m: f"`{m}`" + (" (shipped)" if m == shipped else "")
    acc = ev["victim_accuracy"]
    return [
        "## 2. Evaluation — data no score was fitted or selected on",
        "",
        f"In domain: the {sizes['in_domain']:,} images of the victim's test split. Out of domain: "
        + ", ".join(f"{k} ({sizes['ood:' + k]:,})" for k in ood)
        + ". The symbols and shapes are of a different kind than every fitting outlier (none is rendered or "
        "drawn). Thresholds are the ones chosen in §1.",
        "",
        "### AUROC (in-domain test images positive) and the test false-positive rate at the threshold",
        "",
        *table(
            ["method", *(f"AUROC {k}" for k in ood), "test FPR"],
            [[name(m), *(f"{r['auroc'][k]:.4f}" for k in ood), pct(r["fpr_in_domain"])] for m, r in methods.items()],
        ),
        "",
        "### Share of each out-of-domain set flagged at the threshold",
        "",
        *table(["method", *ood], [[name(m), *(pct(r["detection"][k]) for k in ood)] for m, r in methods.items()]),
        "",
        "### False flags on honest-but-perturbed test digits",
        "",
        "Perturbations (measure/domain.py `PERTURBATIONS`): blurred (Gaussian σ = 1 px), noisy (Gaussian σ = 0.2), "
        "shifted (up to ±4 px), thicker (3×3 dilation), thinner (2×2 erosion). The victim's accuracy on each "
        "shows the digits stay readable.",
        "",
        *table(
            ["method", "clean", *perts],
            [[name(m), pct(r["fpr_in_domain"]), *(pct(r["false_flags"][k]) for k in perts)] for m, r in methods.items()]
            + [["*victim accuracy*", pct(acc["in_domain"]), *(pct(acc[k]) for k in perts)]],
        ),
        "",
    ]


def reading_section(record: Mapping[str, Any]) -> list[str]:
    """What the tables say about the choice, in numbers taken from them."""
    cands = record["selection"]["candidates"]
    selected, shipped = record["selection"]["selected"], record["shipped"]["method"]
    ranked = sorted(cands, key=lambda m: -cands[m]["utility"])
    out = ["## 3. Reading", ""]
    sel = cands[selected]
    runner = next((m for m in ranked if m != selected), None)
    line = (
        f"* **Why `{selected}`.** On held-out training images and unseen synthetic outlier kinds it catches "
        f"{pct(sel['mean_detection'])} of outliers while flagging {pct(sel['honest_false_flags'])} of honest "
        f"elastic variations (utility {sel['utility']:+.3f})"
    )
    if runner:
        r = cands[runner]
        line += (
            f"; the runner-up `{runner}` catches {pct(r['mean_detection'])} and flags "
            f"{pct(r['honest_false_flags'])} (utility {r['utility']:+.3f})"
        )
    out.append(line + ".")
    if shipped != selected:
        out.append(f"* **Shipped `{shipped}` instead** (`--method {shipped}`), against this run's measurement.")
    for m, c in cands.items():
        worst = min(c["detection"], key=c["detection"].get)
        out.append(
            f"* `{m}`: weakest on `{worst}` ({pct(c['detection'][worst])} caught, AUROC {c['auroc'][worst]:.4f})."
        )
    ev = record.get("evaluation")
    if ev:
        r = ev["methods"][shipped]
        where = "above" if r["fpr_in_domain"] > record["fpr"] else "within"
        out.append(
            f"* **In-domain false positives on the test split: {pct(r['fpr_in_domain'])}**, {where} the "
            f"{pct(record['fpr'])} chosen for on held-out training images. The victim was trained on the whole "
            "training split, so those held-out images are images it has seen; test digits are new to it."
        )
        for k, v in r["auroc"].items():
            best = max(ev["methods"], key=lambda m, k=k: ev["methods"][m]["auroc"][k])
            note = "" if best == shipped else f" (best: `{best}`, {ev['methods'][best]['auroc'][k]:.4f})"
            out.append(f"* {k}: AUROC {v:.4f}, {pct(r['detection'][k])} flagged{note}.")
        worst = max(r["false_flags"], key=r["false_flags"].get)
        why = (
            "each perturbation is of a kind neither the fit nor the selection used, and the check did not "
            "foresee them all."
            if record.get("variant_fpr") is None
            else "the fit and the threshold saw honest variants of the same families (`defense/honest_variants.py`), "
            "made by other code with other parameters from training digits, never these test images."
        )
        out.append(
            f"* **Honest-but-perturbed digits: up to {pct(r['false_flags'][worst])} flagged (`{worst}`)**, where "
            f"the selection's honest check (elastic variation) flagged {pct(cands[shipped]['honest_false_flags'])}: "
            + why
        )
        worst_case = {m: max(e["false_flags"].values()) for m, e in ev["methods"].items()}
        gentlest = min(worst_case, key=worst_case.get)
        out.append(
            "* Worst false-flag rate over the perturbations, per method: "
            + ", ".join(f"`{m}` {pct(v)}" for m, v in worst_case.items())
            + f" (lowest: `{gentlest}`)."
        )
    return [*out, ""]


def markdown(record: Mapping[str, Any]) -> str:
    fit = record["fit_on"]
    shipped = record["shipped"]
    head = [
        f"# Domain score for `{record['checkpoint']}`",
        "",
        *made_by(f"seed {record['seed']}, {record['seconds']} s on this machine", record["command"]),
        f"Victim weights sha256 `{record['victim_sha256']}`. Shipped: `{shipped['metadata']}` + "
        f"`{shipped['weights']}` (method `{shipped['method']}`, sha256 `{shipped['sha256'][:16]}…`), loaded with "
        "`defense.domain.load_domain_score`.",
        "",
        f"Fitted on: {fit['in_domain']}; {fit['variants']}; "
        + (f"honest variants: {fit['honest_variants']}; " if "honest_variants" in fit else "")
        + f"synthetic outliers made from those images (`defense/outliers.py`). Thresholds on: {fit['threshold_on']}. "
        f"Never fitted or selected on: {fit['never']}. Higher scores are more in domain; a query is flagged when its "
        "score is below the threshold.",
        "",
    ]
    sections = [*selection_section(record), *evaluation_section(record), *reading_section(record)]
    return document([*head, *sections])
