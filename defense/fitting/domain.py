"""Fitting a domain score (``defense.domain``) offline: the scorers' fits, thresholds, the choice among candidate
methods and the whole fit/select/save pipeline behind ``deepdefense domain``.

The choice never sees the evaluation's data (``measure.domain`` measures afterwards, on data none of this read):
every candidate is fitted on the victim's training split (its honest variants and synthetic outliers made from it,
``fitting_features``), thresholded on a held-out part of that split (``held_out_features``), and compared there
(``compare_candidates``, ``select_method``): on outliers made from the held-out images (a fitted detector is
measured on each kind with a copy fitted without that kind) and a handwriting-like elastic variation of them
(``handwriting_elastic``: honest digits the threshold never saw, to count false flags).

AUROC (``auroc``) treats in-domain images as positives: the chance that an in-domain image scores
higher than an out-of-domain one, ties counting one half (Mann–Whitney U).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from models.checkpoint import CheckpointMeta, load_checkpoint, resolve_checkpoint
from models.data import load_split

from ..domain import (
    METHODS,
    Detector,
    DomainMeta,
    DomainScore,
    Mahalanobis,
    empty_scorer,
    load_domain_score,
    save_domain_score,
    victim_outputs,
)
from ..honest_variants import FAMILIES, by_family, honest_mix
from ..outliers import OUTLIERS, mild_affine, synthesise

#: The method ``deepdefense domain`` ships unless told otherwise: chosen by measurement on MNIST training
#: images and synthetic outliers only (docs/results/domain-score.md).
DEFAULT_METHOD = "detector"

# --- fitting (pure: tensors in, scorer out) ----------------------------------------------------------------


def fit_mahalanobis(feats: Tensor, labels: Tensor, num_classes: int, shrinkage: float = 1e-3) -> Mahalanobis:
    """Class means and one tied covariance of in-domain features (float64); ``shrinkage`` × mean variance is
    added to the diagonal so dead ReLU units do not make Σ singular."""
    missing = sorted(set(range(num_classes)) - set(labels.unique().tolist()))
    if missing:
        raise ValueError(f"no in-domain features of classes {missing}: a class mean needs at least one")
    f = feats.double()
    means = torch.stack([f[labels == c].mean(0) for c in range(num_classes)])
    centred = f - means[labels]
    cov = centred.T @ centred / len(f)
    cov += shrinkage * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    return Mahalanobis(means, torch.linalg.inv(cov))


def fit_detector(
    feats_in: Tensor,
    feats_out: Tensor,
    generator: torch.Generator,
    *,
    hidden: int = 128,
    epochs: int = 8,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    progress: bool = False,
) -> Detector:
    """Outlier exposure on features: binary cross-entropy, in-domain features 1, synthetic outliers 0,
    the two classes weighted equally whatever their counts. Seeded by ``generator`` (initialisation and
    order), on the CPU."""
    both = torch.cat([feats_in, feats_out])
    std = both.std(0).clamp_min(1e-3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        det = Detector(both.mean(0), std, hidden)
    target = torch.cat([torch.ones(len(feats_in)), torch.zeros(len(feats_out))])
    weight = torch.cat(
        [torch.full((len(feats_in),), 0.5 / len(feats_in)), torch.full((len(feats_out),), 0.5 / len(feats_out))]
    )
    weight *= len(both)
    opt = torch.optim.Adam(det.head.parameters(), lr=lr, weight_decay=weight_decay)
    det.train()
    for _ in tqdm(range(epochs), desc="detector", unit="epoch", disable=not progress, leave=False):
        for idx in torch.randperm(len(both), generator=generator).split(batch_size):
            loss = F.binary_cross_entropy_with_logits(det.logit(both[idx]), target[idx], weight=weight[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return det.eval().requires_grad_(False)


@dataclass
class FitFeatures:
    """The victim's outputs on everything a scorer is fitted on: in-domain training images, one mild-affine
    variant of each (``defense.outliers.mild_affine``), honest variants the victim still reads
    (``defense.honest_variants.honest_mix``; none when fitted without them), and synthetic outliers with their
    kind."""

    feats: Tensor
    labels: Tensor
    feats_variants: Tensor
    feats_honest: Tensor
    feats_out: Tensor
    kind_out: Tensor
    kinds: tuple[str, ...]


def readable(model: nn.Module, x: Tensor, labels: Tensor, *, progress: bool = False, desc: str = "victim") -> Tensor:
    """Victim features of the images of ``x`` that the victim labels right (``labels``): an honest variant the
    victim cannot read is no honest user's digit to keep in domain, and a flag on it costs that user nothing."""
    feats, logits = victim_outputs(model, x, progress=progress, desc=desc)
    return feats[logits.argmax(1) == labels]


def fitting_features(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    generator: torch.Generator,
    kinds: Sequence[str] = tuple(OUTLIERS),
    *,
    honest: bool = True,
    progress: bool = False,
) -> FitFeatures:
    """Victim features of ``x``, of a mild-affine variant of each image, of an honest variant of each (with
    ``honest``: ``honest_mix``, kept where the victim reads it) and of as many synthetic outliers as images (an
    equal share per kind), all made from ``x`` with ``generator``."""
    feats, _ = victim_outputs(model, x, progress=progress, desc="features: in-domain")
    variants, _ = victim_outputs(model, mild_affine(x, generator), progress=progress, desc="features: variants")
    outliers, kind = synthesise(x, generator, kinds)
    feats_out, _ = victim_outputs(model, outliers, progress=progress, desc="features: outliers")
    feats_honest = feats[:0]
    if honest:
        feats_honest = readable(model, honest_mix(x, generator), labels, progress=progress, desc="features: honest")
    return FitFeatures(feats, labels, variants, feats_honest, feats_out, kind, tuple(kinds))


def fit_scorer(
    method: str,
    data: FitFeatures,
    num_classes: int,
    generator: torch.Generator,
    *,
    leave_out: str | None = None,
    progress: bool = False,
) -> nn.Module:
    """The scorer of ``method`` fitted on ``data``: nothing to fit for ``msp`` and ``energy``; in-domain
    features only for ``mahalanobis``; for ``detector``, in-domain features, their mild-affine and honest variants
    against the outliers, without the kind ``leave_out`` (to measure how it does on a kind it never saw)."""
    if method in ("msp", "energy"):
        return empty_scorer(method, data.feats.shape[1], num_classes)
    if method == "mahalanobis":
        return fit_mahalanobis(data.feats, data.labels, num_classes)
    if method == "detector":
        keep = torch.ones(len(data.kind_out), dtype=torch.bool)
        if leave_out is not None:
            keep = data.kind_out != data.kinds.index(leave_out)
        feats_in = torch.cat([data.feats, data.feats_variants, data.feats_honest])
        return fit_detector(feats_in, data.feats_out[keep], generator, progress=progress)
    raise ValueError(f"unknown domain-score method {method!r}; known: {', '.join(METHODS)}")


def choose_threshold(scores_in: Tensor, fpr: float) -> float:
    """The largest threshold t that flags (score < t) at most ``fpr`` of ``scores_in``.

    With n scores sorted ascending, t = s[⌊fpr·n⌋]: only the ⌊fpr·n⌋ scores below it (fewer with ties)
    are flagged."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    ordered = scores_in.double().sort().values
    return float(ordered[int(fpr * len(ordered))])


def honest_threshold(
    scores_in: Tensor, fpr: float, variant_scores: Mapping[str, Tensor] | None = None, variant_fpr: float = 0.01
) -> float:
    """The largest threshold that flags at most ``fpr`` of ``scores_in`` and at most ``variant_fpr`` of each
    non-empty set of ``variant_scores`` (held-out honest variants, by family): the smallest of the per-set
    thresholds."""
    variants = [choose_threshold(s, variant_fpr) for s in (variant_scores or {}).values() if len(s)]
    return min([choose_threshold(scores_in, fpr), *variants])


def held_out_variants(
    model: nn.Module, x: Tensor, labels: Tensor, generator: torch.Generator, *, progress: bool = False
) -> dict[str, tuple[Tensor, Tensor]]:
    """Victim outputs (features, logits) of each honest-variant family of held-out images ``x``
    (``defense.honest_variants.by_family``), kept where the victim reads the variant right: what a threshold is
    checked on besides the clean images."""
    out = {}
    for name, xv in by_family(x, generator).items():
        feats, logits = victim_outputs(model, xv, progress=progress, desc=f"held out: {name}")
        keep = logits.argmax(1) == labels
        out[name] = (feats[keep], logits[keep])
    return out


# --- the held-out side: thresholds and the selection's measures ------------------------------------------------


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


def _grid(b: int, h: int, w: int) -> Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack((xs, ys), dim=-1).expand(b, h, w, 2)


def handwriting_elastic(x: Tensor, g: torch.Generator, alpha: float = 1.0, cells: int = 4) -> Tensor:
    """A smooth elastic deformation of about ``alpha`` pixels (Simard et al. 2003's handwriting variation):
    honest digits unlike any image the victim or a score was fitted on (the victim stays 98.9% accurate on
    held-out training digits). Used by the selection only."""
    b, _, h, w = x.shape
    coarse = torch.randn((b, 2, cells, cells), generator=g)
    field_ = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    return F.grid_sample(x, _grid(b, h, w) + alpha * 2.0 / (w - 1) * field_, align_corners=True).clamp(0.0, 1.0)


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


@dataclass
class HeldOut:
    """Victim outputs on the held-out training images, on outliers made from them, on an honest variation (the
    selection's check) and on the honest-variant families the threshold is held to (``variants``: family →
    (features, logits), empty when the score is fitted without them)."""

    feats: Tensor
    logits: Tensor
    feats_out: Tensor
    logits_out: Tensor
    kind_out: Tensor
    feats_honest: Tensor
    logits_honest: Tensor
    variants: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


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
        cand.variant_false_flags = {k: flagged(s, threshold) for k, s in _variant_scores(scorer, held).items()}
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


def _variant_scores(scorer: nn.Module, held: HeldOut) -> dict[str, Tensor]:
    return {name: scorer(f, lg) for name, (f, lg) in held.variants.items()}


def select_method(candidates: Mapping[str, Candidate]) -> str:
    """The candidate with the highest utility (mean detection of held-out outlier kinds minus the share of
    honest variations flagged); ties go to the earlier, simpler one."""
    return max(candidates, key=lambda m: (round(candidates[m].utility, 6), -list(candidates).index(m)))


def held_out_features(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    generator: torch.Generator,
    variant_generator: torch.Generator,
    kinds: Sequence[str] = tuple(OUTLIERS),
    *,
    honest: bool = True,
    progress: bool = False,
) -> HeldOut:
    """Victim outputs on held-out images ``x`` of the victim's domain, on outliers and a handwriting-elastic
    variation made from them (``generator``), and, with ``honest``, on each family of their honest variants
    (``held_out_variants``, ``variant_generator``)."""
    outliers, kind = synthesise(x, generator, kinds)
    feats, logits = victim_outputs(model, x, progress=progress, desc="held out")
    feats_out, logits_out = victim_outputs(model, outliers, progress=progress, desc="held-out outliers")
    elastic = handwriting_elastic(x, generator)
    feats_honest, logits_honest = victim_outputs(model, elastic, progress=progress, desc="held-out variation")
    variants = held_out_variants(model, x, labels, variant_generator, progress=progress) if honest else {}
    return HeldOut(feats, logits, feats_out, logits_out, kind, feats_honest, logits_honest, variants)


def fit_domain_score(
    method: str,
    data: FitFeatures,
    held: HeldOut,
    num_classes: int,
    generator: torch.Generator,
    *,
    fpr: float = 0.005,
    variant_fpr: float = 0.01,
    leave_out: str | None = None,
    progress: bool = False,
) -> tuple[nn.Module, float]:
    """The scorer of ``method`` fitted on ``data`` (``fit_scorer``; without the outlier kind ``leave_out``) and its
    threshold, chosen on ``held``, images of the same domain the fit never saw: at most ``fpr`` of them flagged and
    at most ``variant_fpr`` of each family of their honest variants (``honest_threshold``)."""
    scorer = fit_scorer(method, data, num_classes, generator, leave_out=leave_out, progress=progress)
    threshold = honest_threshold(scorer(held.feats, held.logits), fpr, _variant_scores(scorer, held), variant_fpr)
    return scorer, threshold


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
    out: str | os.PathLike[str] | None = None  # default: <checkpoint>.domain beside it
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
    meta_path = save_domain_score(score, victim_path, meta, cfg.out)
    loaded, _ = load_domain_score(meta_path, model, cfg.device)  # what ships is what is measured
    f_h, l_h = held.feats, held.logits
    if not torch.allclose(loaded.score_outputs(f_h, l_h).cpu(), chosen.scorer(f_h, l_h), rtol=1e-5, atol=1e-5):
        raise RuntimeError("the saved domain score does not reproduce the fitted one")
    return DomainFit(model, victim, victim_path, len(fit_idx), held_x, candidates, selected, method, meta_path, meta)
