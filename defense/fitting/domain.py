"""Fitting a domain score (``defense.domain``) offline: a method's scorer fitted on the victim's training split (its
honest variants and synthetic outliers made from it, ``fitting_features``) and thresholded on a held-out part of
that split (``held_out_features``): ``fit_domain_score``. Which method ships is chosen in
``defense/fitting/domain_choice.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..domain import (
    METHODS,
    Detector,
    Mahalanobis,
    empty_scorer,
    victim_outputs,
)
from ..honest_variants import by_family, honest_mix
from ..outliers import OUTLIERS, mild_affine, synthesise

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


# --- the held-out side ---------------------------------------------------------------------------------------


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


def variant_scores(scorer: nn.Module, held: HeldOut) -> dict[str, Tensor]:
    return {name: scorer(f, lg) for name, (f, lg) in held.variants.items()}


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
    threshold = honest_threshold(scorer(held.feats, held.logits), fpr, variant_scores(scorer, held), variant_fpr)
    return scorer, threshold
