"""What a misinformation model (defense/misinformation.py) answers, next to its victim, on the victim's test set.

A useful misinformation model is wrong (top-1 accuracy near 0, little mass on the true class), disagrees
with the victim, and still *looks* like a classifier: its answers are about as confident as the
victim's (max probability, entropy), not near-uniform, which an attacker would spot and discard.
Blends (1 − α)·p_victim + α·p_misinfo show how accuracy falls as α grows; Grad-CAM maps of its own
top-1 class are computed through the same interpreter the server uses, and must be finite.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from deepdefense.defense.interpreters import create_interpreter
from deepdefense.defense.misinformation import blend, misinformation_weight, mix
from deepdefense.measure.agreement import percent, probabilities
from deepdefense.measure.fidelity import spearman
from deepdefense.measure.markdown import row, table

ALPHAS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
#: AM's adaptive blend on in-domain queries, score = the victim's max probability: (τ, ν) pairs.
GATES = ((0.5, 100.0), (0.9, 100.0), (0.99, 100.0))


def answer_shape(p: Tensor) -> dict[str, float]:
    """How confident answers look: mean and 10/50/90% quantiles of the max probability, mean entropy (nats)."""
    top = p.max(1).values.double()
    entropy = -(p.double() * p.double().clamp_min(1e-12).log()).sum(1)
    q10, q50, q90 = torch.quantile(top, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {
        "mean_max_probability": round(float(top.mean()), 4),
        "max_probability_p10": round(q10, 4),
        "max_probability_median": round(q50, 4),
        "max_probability_p90": round(q90, 4),
        "mean_entropy_nats": round(float(entropy.mean()), 4),
    }


def label_spread(label: Tensor, classes: int) -> dict[str, float]:
    """How the top-1 answers spread over the classes: the most frequent one's share (percent; 10% for a
    balanced test set) and the entropy of their distribution (nats; ln 10 ≈ 2.303 when uniform)."""
    share = torch.bincount(label, minlength=classes).double() / len(label)
    return {
        "most_frequent_share": round(100.0 * float(share.max()), 2),
        "entropy_nats": round(float(-(share * share.clamp_min(1e-12).log()).sum()), 4),
    }


def wrong_labels(y: Tensor, label: Tensor, classes: int) -> dict[str, list[float]]:
    """For each true class: the misinformation model's most frequent top-1 and its share (percent).

    Shows whether the model answers one fixed wrong class per true class (a relabelling) or spreads."""
    confusion = torch.zeros(classes, classes).index_put_((y, label), torch.ones(len(y)), accumulate=True)
    share = 100.0 * confusion / confusion.sum(1, keepdim=True).clamp_min(1)
    top = share.max(1)
    return {str(c): [int(top.indices[c]), round(float(top.values[c]), 1)] for c in range(classes)}


def gradcam_maps(victim: nn.Module, misinfo: nn.Module, images: Tensor, batch_size: int = 64) -> dict[str, Any]:
    """Grad-CAM of the misinformation model's own top-1 class: shape, finiteness, all-zero maps, and the
    median Spearman ρ against the victim's map of the victim's top-1 (how different the story is)."""
    shape = tuple(images.shape[1:])
    ours, theirs = create_interpreter("gradcam", misinfo, shape), create_interpreter("gradcam", victim, shape)
    finite, zero, rho = True, 0, []
    for x in images.split(batch_size):
        with torch.no_grad():
            label_m, label_v = misinfo(x).argmax(1), victim(x).argmax(1)
        maps = ours.explain({}, x, label_m).attribution.detach()
        reference = theirs.explain({}, x, label_v).attribution.detach()
        finite &= bool(torch.isfinite(maps).all())
        zero += int((maps.flatten(1).abs().amax(1) == 0).sum())
        rho += [spearman(a, b) for a, b in zip(maps, reference, strict=True)]
    finite_rho = [r for r in rho if not math.isnan(r)]
    return {
        "n": len(images),
        "map_shape": list(maps.shape[1:]),
        "all_finite": finite,
        "all_zero_maps": zero,
        "median_spearman_vs_victim": round(statistics.median(finite_rho), 4) if finite_rho else math.nan,
    }


def measure_misinformation(
    victim: nn.Module,
    misinfo: nn.Module,
    test_set: TensorDataset,
    *,
    alphas: tuple[float, ...] = ALPHAS,
    gates: tuple[tuple[float, float], ...] = GATES,
    n_maps: int = 256,
) -> dict[str, Any]:
    """The figures of docs/results/misinformation.md on the whole ``test_set`` (maps on its first ``n_maps``)."""
    x, y = test_set.tensors
    p_v, p_m = probabilities(victim, x), probabilities(misinfo, x)
    label_v, label_m = p_v.argmax(1), p_m.argmax(1)
    both = {"victim": (p_v, label_v), "misinfo": (p_m, label_m)}
    return {
        "n": len(y),
        **{f"{who}_top1_accuracy": percent(label == y) for who, (_, label) in both.items()},
        **{f"{who}_mean_p_true": round(float(p.gather(1, y[:, None]).mean()), 4) for who, (p, _) in both.items()},
        "misinfo_mean_p_victim_top1": round(float(p_m.gather(1, label_v[:, None]).mean()), 4),
        "top1_agreement_with_victim": percent(label_m == label_v),
        "answer_shape": {who: answer_shape(p) for who, (p, _) in both.items()},
        "answered_labels": {who: label_spread(label, p.shape[1]) for who, (p, label) in both.items()},
        "most_frequent_wrong_label": wrong_labels(y, label_m, p_v.shape[1]),
        "blend_top1_accuracy": {f"{a:g}": percent(mix(p_v, p_m, a).argmax(1) == y) for a in alphas},
        "adaptive_blend_in_domain": [
            {
                "tau": tau,
                "nu": nu,
                "top1_accuracy": percent(blend(p_v, p_m, p_v.amax(1), tau, nu).argmax(1) == y),
                "mean_alpha": round(float(misinformation_weight(p_v.amax(1), tau, nu).mean()), 4),
            }
            for tau, nu in gates
        ],
        "gradcam": gradcam_maps(victim, misinfo, x[:n_maps]),
    }


def report(figures: dict[str, Any], meta: Any) -> str:
    """docs/results/misinformation.md from the figures and the checkpoint's metadata."""
    shape_v, shape_m = figures["answer_shape"]["victim"], figures["answer_shape"]["misinfo"]
    cam = figures["gradcam"]
    labels_v, labels_m = figures["answered_labels"]["victim"], figures["answered_labels"]["misinfo"]
    top_v, top_m = labels_v["most_frequent_share"], labels_m["most_frequent_share"]
    rows = "\n".join(row([key.replace("_", " "), shape_v[key], shape_m[key]]) for key in shape_v)
    by_alpha = figures["blend_top1_accuracy"]
    blends = "\n".join(table(["α", *by_alpha], [["accuracy", *(f"{v:.2f}%" for v in by_alpha.values())]]))
    gate_rows = "\n".join(
        row([g["tau"], f"{g['nu']:g}", g["mean_alpha"], f"{g['top1_accuracy']:.2f}%"])
        for g in figures["adaptive_blend_in_domain"]
    )
    extra = meta.extra
    return f"""# Misinformation model for `{extra["victim"]}` (Adaptive Misinformation)

`{meta.command}`

Seed {meta.seed}, {extra["epochs"]} epochs on {extra["train_split"]} only (Fashion-MNIST, the attacker's data in
the evaluation, is never seen), torch {extra["torch"]}, {extra["threads"]} thread(s). Same architecture and
normalisation as the victim (`{meta.arch}`), trained from a seeded random start to minimise
mean −log(1 − p_true) (Kariyappa & Qureshi, CVPR 2020) + λ·(mean H(p) + KL(mean p ‖ uniform)), λ =
{extra["balance"]:g} (`defense/fitting/misinformation.py`, `answer_spread_penalty`: confident answers spread over all
classes; λ = 0 is AM's loss alone). Weights sha256 `{meta.sha256[:12]}…`, made for victim
weights `{extra["victim_sha256"][:12]}…`. Figures on the full {meta.dataset} test set ({figures["n"]} images);
they are also in `models/checkpoints/{extra["victim"]}-misinfo.json` under `extra.measured`.

| what | victim | misinformation model |
| --- | --- | --- |
| top-1 accuracy | {figures["victim_top1_accuracy"]:.2f}% | **{figures["misinfo_top1_accuracy"]:.2f}%** |
| mean probability on the true class | {figures["victim_mean_p_true"]} | **{figures["misinfo_mean_p_true"]}** |
| top-1 agrees with the victim's | — | {figures["top1_agreement_with_victim"]:.2f}% |
| mean probability on the victim's top-1 | — | {figures["misinfo_mean_p_victim_top1"]} |
| most frequent answered label (share; 10% if balanced) | {top_v:.2f}% | {top_m:.2f}% |
| entropy of the answered labels (nats; uniform: 2.303) | {labels_v["entropy_nats"]} | {labels_m["entropy_nats"]} |

How its answers look (a near-uniform answer would have max probability 0.1 and entropy ln 10 ≈ 2.303):

| answer shape | victim | misinformation model |
| --- | --- | --- |
{rows}

Top-1 accuracy of the blend (1 − α)·p_victim + α·p_misinfo against the true labels:

{blends}

Its most frequent top-1 per true class (label: answered label, share of that class's test images):
{", ".join(f"{c} → {lab} ({pct:.0f}%)" for c, (lab, pct) in figures["most_frequent_wrong_label"].items())}.

AM's adaptive blend on these in-domain queries, α = sigmoid(ν·(τ − max p_victim)) (the gate to come will
supply its own score; this only shows what the victim's confidence alone would let through):

| τ | ν | mean α | top-1 accuracy |
| --- | --- | --- | --- |
{gate_rows}

Grad-CAM (`defense.interpreters.create_interpreter("gradcam", model, input_shape)`) of the misinformation
model's own top-1 class on the first {cam["n"]} test images: maps of shape {cam["map_shape"]}, all finite:
{cam["all_finite"]}, all-zero maps: {cam["all_zero_maps"]}; median Spearman ρ against the victim's map of
its own top-1: {cam["median_spearman_vs_victim"]}.
"""
