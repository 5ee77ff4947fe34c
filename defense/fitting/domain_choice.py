"""The choice of a domain score's method and the fit/select/save pipeline behind ``deepdefense domain``.

The choice never sees the evaluation's data (``measure.domain`` measures afterwards, on data none of this read):
every candidate is fitted and thresholded on the victim's training split (``fit_domain_score``) and compared on its
held-out part (``compare_candidates``, ``select_method``): on outliers made from the held-out images (a fitted
detector is measured on each kind with a copy fitted without that kind) and a handwriting-like elastic variation
of them (``handwriting_elastic``: honest digits the threshold never saw, to count false flags).

AUROC (``auroc``) treats in-domain images as positives: the chance that an in-domain image scores
higher than an out-of-domain one, ties counting one half (Mann–Whitney U).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from deepdefense.models.checkpoint import CheckpointMeta, load_checkpoint, resolve_checkpoint
from deepdefense.models.data import load_split

from ..domain import METHODS, DomainMeta, DomainScore, load_domain_score, save_domain_score
from ..honest_variants import FAMILIES
from ..outliers import OUTLIERS
from .domain import FitFeatures, HeldOut, fit_domain_score, fitting_features, held_out_features, variant_scores

#: The method ``deepdefense domain`` ships unless told otherwise: chosen by measurement on MNIST training
#: images and synthetic outliers only (docs/results/domain-score.md).
DEFAULT_METHOD = "detector"


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(values.double(), return_inverse=True, return_counts=True)
    before = torch.cumsum(counts, 0) - counts  # how many values are smaller than each distinct value
    return (before + (counts + 1) / 2.0).double()[inverse]


def auroc(pos: Tensor, neg: Tensor) -> float:
    """P(a positive scores above a negative) + ½ P(tie), from the Mann–Whitney U of the pooled ranks."""
    n_pos, n_neg = len(pos), len(neg)
    if not n_pos or not n_neg:
        raise ValueError("AUROC needs at least one positive and one negative score")
    ranks = average_ranks(torch.cat([pos.flatten(), neg.flatten()]))
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def flagged(scores: Tensor, threshold: float) -> float:
    """The share of ``scores`` below ``threshold`` (what the score flags)."""
    return float((scores < threshold).double().mean())


@dataclass
class Candidate:
    """One method, fitted, with its threshold and what the selection measured of it."""

    method: str
    scorer: nn.Module
    threshold: float
    fpr_held_out: float
    detection: dict[str, float] = field(default_factory=dict)  # kind → share of held-out outliers flagged
    auroc: dict[str, float] = field(default_factory=dict)  # kind → AUROC against the held-out images
    honest_false_flags: float = 0.0  # share of handwriting-elastic held-out digits flagged
    variant_false_flags: dict[str, float] = field(default_factory=dict)  # honest-variant family → share flagged
    unseen_kinds: bool = False  # detection measured with a copy fitted without each kind

    @property
    def mean_detection(self) -> float:
        return sum(self.detection.values()) / len(self.detection)

    @property
    def utility(self) -> float:
        """The selection's criterion: outliers caught minus honest digits flagged, each counted once."""
        return self.mean_detection - self.honest_false_flags

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "fpr_held_out": self.fpr_held_out,
            "detection": self.detection,
            "auroc": self.auroc,
            "mean_detection": self.mean_detection,
            "honest_false_flags": self.honest_false_flags,
            "variant_false_flags": self.variant_false_flags,
            "utility": self.utility,
            "unseen_kinds": self.unseen_kinds,
        }


def compare_candidates(
    methods: tuple[str, ...] | list[str],
    data: FitFeatures,
    held: HeldOut,
    num_classes: int,
    *,
    fpr: float,
    variant_fpr: float = 0.01,
    seed: int,
    progress: bool = False,
) -> dict[str, Candidate]:
    """Fit every method on ``data`` with its threshold (``fit_domain_score``), and measure it on the held-out
    outliers and honest variation. A method that sees outliers when fitted (``detector``) is
    measured on each kind by a copy fitted without that kind; the returned scorer is fitted on all kinds."""
    out: dict[str, Candidate] = {}
    for method in methods:
        fit = partial(fit_domain_score, method, data, held, num_classes, fpr=fpr, variant_fpr=variant_fpr)
        scorer, threshold = fit(torch.Generator().manual_seed(seed), progress=progress)
        s_held = scorer(held.feats, held.logits)
        cand = Candidate(method, scorer, threshold, flagged(s_held, threshold))
        cand.honest_false_flags = flagged(scorer(held.feats_honest, held.logits_honest), threshold)
        cand.variant_false_flags = {k: flagged(s, threshold) for k, s in variant_scores(scorer, held).items()}
        cand.unseen_kinds = method == "detector"
        bar = tqdm(data.kinds, desc=f"select: {method}", unit="kind", disable=not progress, leave=False)
        for i, kind in enumerate(bar):
            mask = held.kind_out == i
            if cand.unseen_kinds:  # a copy that never saw this kind, thresholded the same way
                copy, t = fit(torch.Generator().manual_seed(seed), leave_out=kind)
                s_in = copy(held.feats, held.logits)
            else:
                copy, s_in, t = scorer, s_held, threshold
            s_out = copy(held.feats_out[mask], held.logits_out[mask])
            cand.detection[kind] = flagged(s_out, t)
            cand.auroc[kind] = auroc(s_in, s_out)
        out[method] = cand
    return out


def select_method(candidates: Mapping[str, Candidate]) -> str:
    """The candidate with the highest utility (mean detection of held-out outlier kinds minus the share of
    honest variations flagged); ties go to the earlier, simpler one."""
    return max(candidates, key=lambda m: (round(candidates[m].utility, 6), -list(candidates).index(m)))


# --- the pipeline: fit, select, save -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainFitConfig:
    """What ``deepdefense domain`` fits (its flags, less the evaluation's)."""

    checkpoint: str  # the victim: shipped name or metadata path
    data_root: str | os.PathLike[str] | None
    seed: int = 0  # of the split, the synthetic outliers and the fit
    method: str = DEFAULT_METHOD  # the method saved; "auto": the one this run selects
    fpr: float = 0.004
    honest_variants: bool = True
    variant_fpr: float = 0.01
    candidates: tuple[str, ...] = METHODS
    held_out: int = 10_000  # training images kept out of fitting (thresholds and selection)
    never: str = "fashionmnist"  # the foreign data set the evaluation reads (recorded as never fitted on)
    save: str | os.PathLike[str] | None = None  # default: <checkpoint>.domain beside it
    device: str | torch.device = "cpu"
    progress: bool = False
    command: str = ""


@dataclass
class DomainFit:
    """A fitted, selected and saved domain score, with what the selection measured and what the evaluation needs."""

    model: nn.Module  # the victim
    victim: CheckpointMeta
    victim_path: Path
    fit_images: int
    held_x: Tensor  # the held-out training images (the evaluation's JBDA-like seeds)
    candidates: dict[str, Candidate]
    selected: str  # by measurement
    method: str  # saved
    meta_path: Path
    meta: DomainMeta

    def record(self, cfg: DomainFitConfig) -> dict[str, Any]:
        """The fit's part of ``deepdefense domain``'s record (the evaluation adds its own)."""
        return {
            "command": cfg.command,
            "seed": cfg.seed,
            "checkpoint": self.victim_path.stem,
            "victim_sha256": self.victim.sha256,
            "fpr": cfg.fpr,
            "variant_fpr": cfg.variant_fpr if cfg.honest_variants else None,
            "fit_on": self.meta.fit_on,
            "selection": {
                "rule": "highest utility = mean share of held-out outliers flagged (detector: per kind, a copy fitted "
                "without that kind) minus share of handwriting-elastic held-out digits flagged",
                "candidates": {k: c.summary() for k, c in self.candidates.items()},
                "selected": self.selected,
            },
            "shipped": {
                "method": self.method,
                "metadata": self.meta_path.name,
                "weights": self.meta.weights,
                "sha256": self.meta.sha256,
            },
        }


def fit_select_save(cfg: DomainFitConfig) -> DomainFit:
    """Fit every candidate on the victim's training split less ``cfg.held_out`` images, threshold and compare them
    on those, save ``cfg.method`` (or the selected one) beside the checkpoint and check that what was saved
    reproduces what was fitted."""
    model, victim = load_checkpoint(cfg.checkpoint, device=cfg.device)
    model.requires_grad_(False)
    x, y = load_split(victim.dataset, cfg.data_root, "train").tensors  # type: ignore[attr-defined]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    fit_idx, held_idx = perm[cfg.held_out :], perm[: cfg.held_out]
    kinds = tuple(OUTLIERS)
    data = fitting_features(model, x[fit_idx], y[fit_idx], torch.Generator().manual_seed(cfg.seed + 1), kinds,
                            honest=cfg.honest_variants, progress=cfg.progress)  # fmt: skip
    held_x = x[held_idx]
    held = held_out_features(model, held_x, y[held_idx], torch.Generator().manual_seed(cfg.seed + 2),
                             torch.Generator().manual_seed(cfg.seed + 5), kinds, honest=cfg.honest_variants,
                             progress=cfg.progress)  # fmt: skip
    candidates = compare_candidates(cfg.candidates, data, held, victim.num_classes, fpr=cfg.fpr,
                                    variant_fpr=cfg.variant_fpr, seed=cfg.seed + 3, progress=cfg.progress)  # fmt: skip
    selected = select_method(candidates)
    method = selected if cfg.method == "auto" else cfg.method
    if method not in candidates:
        raise ValueError(f"--method {method} is not among --candidates {' '.join(cfg.candidates)}")
    chosen = candidates[method]
    victim_path = resolve_checkpoint(cfg.checkpoint)
    fit_on = {
        "in_domain": f"{victim.dataset} train: {len(fit_idx)} images (random split, seed {cfg.seed})",
        "variants": "one mild-affine variant per in-domain image (detector only)",
        "honest_variants": (
            f"one honest_mix variant per in-domain image, kept where the victim reads it: {len(data.feats_honest)} "
            f"(defense/honest_variants.py: {', '.join(FAMILIES)}; detector only); threshold also held to "
            f"{cfg.variant_fpr:g} of each family of the held-out images' variants"
            if cfg.honest_variants
            else "none (--no-honest-variants)"
        ),
        "outliers": {k: int((data.kind_out == i).sum()) for i, k in enumerate(kinds)} if method == "detector" else {},
        "threshold_on": f"{victim.dataset} train: the other {len(held_idx)} images",
        "never": f"{victim.dataset} test, {cfg.never} (any split)",
    }
    meta = DomainMeta(
        method=method,
        threshold=chosen.threshold,
        fpr=cfg.fpr,
        fpr_held_out=chosen.fpr_held_out,
        feature_dim=int(data.feats.shape[1]),
        num_classes=victim.num_classes,
        victim={},
        command=cfg.command,
        seed=cfg.seed,
        fit_on=fit_on,
        extra={
            "selected_by_measurement": selected,
            "honest_variants": cfg.honest_variants,
            "variant_fpr": cfg.variant_fpr if cfg.honest_variants else None,
            "variants_flagged_held_out": chosen.variant_false_flags,
            "torch": torch.__version__,
        },
    )
    score = DomainScore(model, chosen.scorer, chosen.threshold, method)
    meta_path = save_domain_score(score, victim_path, meta, cfg.save)
    loaded, _ = load_domain_score(meta_path, model, cfg.device)  # what ships is what is measured
    f_h, l_h = held.feats, held.logits
    if not torch.allclose(loaded.score_outputs(f_h, l_h).cpu(), chosen.scorer(f_h, l_h), rtol=1e-5, atol=1e-5):
        raise RuntimeError("the saved domain score does not reproduce the fitted one")
    return DomainFit(model, victim, victim_path, len(fit_idx), held_x, candidates, selected, method, meta_path, meta)
