"""A domain score for a served victim: how much a query looks like the victim's own training data.

Later work answers out-of-domain queries (a model thief querying with another data set or with
synthetic points) with misinformation while in-domain users keep exact answers (Adaptive
Misinformation, Kariyappa & Qureshi, CVPR 2020). This module holds the score itself, as a small
``scorer`` on the victim's outputs:

* ``msp`` — the victim's maximum softmax probability (Hendrycks & Gimpel 2017);
* ``energy`` — the negative free energy, ``logsumexp`` of the logits (Liu et al. 2020);
* ``mahalanobis`` — minus the smallest class-conditional Mahalanobis distance of the victim's penultimate
  features, one tied covariance (Lee et al. 2018), fitted on in-domain features only;
* ``detector`` — a small MLP head on the (frozen) penultimate features, trained with outlier exposure
  against synthetic outliers (``defense.outliers``).

Higher scores are more in-domain; a query is flagged when its score is below ``threshold``, chosen
on held-out in-domain images for a false-positive rate (``choose_threshold``). The fit functions are
pure (tensors in, scorer out). ``save_domain_score`` writes ``<checkpoint>.domain.safetensors`` +
``<checkpoint>.domain.json`` beside the checkpoint; ``load_domain_score`` checks the sha256 of the
score's weights and that the victim it is given is the very checkpoint the score was fitted for.
Which method ships, and why, is measured by ``deepdefense domain`` (docs/results/domain-score.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn
from tqdm import tqdm

from models.checkpoint import CheckpointError, read_meta, resolve_checkpoint, sha256_file, verified_weights

from .honest_variants import by_family, honest_mix
from .outliers import OUTLIERS, mild_affine, synthesise

METHODS = ("msp", "energy", "mahalanobis", "detector")
#: The method ``deepdefense domain`` ships unless told otherwise: chosen by measurement on MNIST training
#: images and synthetic outliers only (docs/results/domain-score.md).
DEFAULT_METHOD = "detector"
SUFFIX = ".domain"


class DomainScoreError(CheckpointError):
    """A domain score that cannot be trusted or used with this victim: the message says why."""


# --- the victim's outputs -----------------------------------------------------------------------------------


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the victim has no Linear layer whose input could serve as penultimate features")
    return linears[-1]


@torch.no_grad()
def victim_outputs(
    model: nn.Module, x: Tensor, *, batch_size: int = 1000, progress: bool = False, desc: str = "victim"
) -> tuple[Tensor, Tensor]:
    """Penultimate features (the input of the last Linear layer) and logits of ``x``, on the CPU.

    The model must be in eval mode (dropout off); images are sent to the model's device in batches."""
    device = next(model.parameters()).device
    captured: list[Tensor] = []
    hook = _last_linear(model).register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].flatten(1)))
    feats, logits = [], []
    try:
        for chunk in tqdm(x.split(batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            logits.append(model(chunk.to(device)).float().cpu())
            feats.append(captured.pop().float().cpu())
    finally:
        hook.remove()
    return torch.cat(feats), torch.cat(logits)


# --- scorers: (features, logits) -> score, higher = more in-domain -----------------------------------------


class MaxSoftmax(nn.Module):
    def forward(self, feats: Tensor, logits: Tensor) -> Tensor:
        return logits.softmax(-1).amax(-1)


class Energy(nn.Module):
    def forward(self, feats: Tensor, logits: Tensor) -> Tensor:
        return logits.logsumexp(-1)


class Mahalanobis(nn.Module):
    """−min_c (f − μ_c)ᵀ Σ⁻¹ (f − μ_c) with one covariance Σ shared by the classes."""

    def __init__(self, means: Tensor, precision: Tensor) -> None:
        super().__init__()
        self.register_buffer("means", means.float())
        self.register_buffer("precision", precision.float())

    def forward(self, feats: Tensor, logits: Tensor) -> Tensor:
        diff = feats[:, None, :] - self.means[None]  # (B, C, D)
        dist = torch.einsum("bcd,de,bce->bc", diff, self.precision, diff)
        return -dist.amin(-1)


class Detector(nn.Module):
    """A two-layer head on standardised penultimate features; its logit is the score."""

    def __init__(self, mean: Tensor, std: Tensor, hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.head = nn.Sequential(nn.Linear(mean.numel(), hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def logit(self, feats: Tensor) -> Tensor:
        return self.head((feats - self.mean) / self.std).squeeze(-1)

    def forward(self, feats: Tensor, logits: Tensor) -> Tensor:
        return self.logit(feats)


def empty_scorer(method: str, feature_dim: int, num_classes: int, hidden: int = 128) -> nn.Module:
    """A scorer of ``method`` with placeholder buffers of the right shapes (what loading fills in)."""
    if method == "msp":
        return MaxSoftmax()
    if method == "energy":
        return Energy()
    if method == "mahalanobis":
        return Mahalanobis(torch.zeros(num_classes, feature_dim), torch.eye(feature_dim))
    if method == "detector":
        return Detector(torch.zeros(feature_dim), torch.ones(feature_dim), hidden)
    raise ValueError(f"unknown domain-score method {method!r}; known: {', '.join(METHODS)}")


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


# --- the score ---------------------------------------------------------------------------------------------


@dataclass
class DomainMeta:
    """What a saved domain score is, what it belongs to, and how it was made."""

    method: str
    threshold: float
    fpr: float  # the in-domain false-positive rate the threshold was chosen for
    fpr_held_out: float  # the rate it has on the held-out images it was chosen on
    feature_dim: int
    num_classes: int
    victim: dict[str, str]  # checkpoint name, weights file, sha256 of the weights
    command: str
    seed: int
    fit_on: dict[str, Any]
    sha256: str = ""
    weights: str = ""
    hidden: int = 128
    extra: dict[str, Any] = field(default_factory=dict)


class DomainScore:
    """The victim plus a fitted scorer and its threshold: ``score(x)`` (B,), higher = more in-domain;
    ``flags(x)`` is True for the queries judged out of domain."""

    def __init__(self, model: nn.Module, scorer: nn.Module, threshold: float, method: str) -> None:
        self.model = model
        self.scorer = scorer.to(next(model.parameters()).device).eval()
        self.threshold = float(threshold)
        self.method = method

    @torch.no_grad()
    def score_outputs(self, feats: Tensor, logits: Tensor) -> Tensor:
        """The score from victim outputs already computed (``victim_outputs``), e.g. by a caller that needs
        the logits anyway."""
        device = next(self.scorer.buffers(), next(self.model.parameters())).device
        return self.scorer(feats.to(device), logits.to(device))

    @torch.no_grad()
    def score(self, x: Tensor, batch_size: int = 1000) -> Tensor:
        """(B,) scores of images ``x`` in [0, 1], on ``x``'s device."""
        return self.score_outputs(*victim_outputs(self.model, x, batch_size=batch_size)).to(x.device)

    def flags(self, x: Tensor) -> Tensor:
        return self.score(x) < self.threshold


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


def fit_domain_score(
    model: nn.Module,
    method: str,
    train_x: Tensor,
    train_y: Tensor,
    held_x: Tensor,
    held_y: Tensor,
    *,
    fpr: float = 0.005,
    variant_fpr: float = 0.01,
    honest: bool = True,
    generator: torch.Generator,
    kinds: Sequence[str] = tuple(OUTLIERS),
    progress: bool = False,
) -> tuple[DomainScore, float]:
    """Fit ``method`` on ``train_x`` (its honest variants with ``honest``, and outliers made from it) and choose its
    threshold on ``held_x``, images of the same domain the fit never saw: at most ``fpr`` of them flagged and,
    with ``honest``, at most ``variant_fpr`` of each family of their honest variants (``honest_threshold``).
    Returns the score and the false-positive rate it has on ``held_x``."""
    data = fitting_features(model, train_x, train_y, generator, kinds, honest=honest, progress=progress)
    num_classes = int(train_y.max()) + 1
    scorer = fit_scorer(method, data, num_classes, generator, progress=progress)
    score = DomainScore(model, scorer, 0.0, method)
    held = score.score(held_x)
    variants = held_out_variants(model, held_x, held_y, generator, progress=progress) if honest else {}
    score.threshold = honest_threshold(
        held, fpr, {k: score.score_outputs(f, lg).cpu() for k, (f, lg) in variants.items()}, variant_fpr
    )
    return score, float((held < score.threshold).float().mean())


# --- files -------------------------------------------------------------------------------------------------


def state_sha256(model: nn.Module) -> str:
    """The sha256 of a victim's weights as ``save_checkpoint`` would write them: equal to the checkpoint
    file's sha256 exactly when the weights in memory are the checkpoint's."""
    net = getattr(model, "net", model)
    return hashlib.sha256(save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})).hexdigest()


def domain_paths(checkpoint_name_or_meta_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(domain metadata JSON, victim metadata JSON) for a checkpoint name (``lenet-mnist``), a checkpoint's
    metadata JSON, or a domain metadata JSON (``….domain.json``)."""
    path = Path(checkpoint_name_or_meta_path)
    if path.name.endswith(f"{SUFFIX}.json"):
        return path, resolve_checkpoint(path.parent / (path.name[: -len(f"{SUFFIX}.json")] + ".json"))
    victim = resolve_checkpoint(path)
    return victim.parent / f"{victim.stem}{SUFFIX}.json", victim


def save_domain_score(
    score: DomainScore,
    victim_meta_path: str | os.PathLike[str],
    meta: DomainMeta,
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``<out>.safetensors`` + ``<out>.json`` (default ``out``: ``<checkpoint>.domain`` beside the
    victim's metadata); fills in the weights' name and sha256 and the victim's identity. Returns the JSON path."""
    victim_path = resolve_checkpoint(victim_meta_path)
    victim = read_meta(victim_path)
    if state_sha256(score.model) != victim.sha256:
        raise DomainScoreError(f"the score's victim is not the weights of checkpoint {victim_path.stem}")
    stem = Path(out) if out else victim_path.parent / f"{victim_path.stem}{SUFFIX}"
    stem = stem.with_suffix("") if stem.suffix in (".json", ".safetensors") else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.parent / f"{stem.name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in score.scorer.state_dict().items()}
    # bytes through an ordinary open(): save_file creates the file 0600, unreadable to a server running as another user
    weights.write_bytes(save(state or {"threshold": torch.tensor([score.threshold])}))
    meta.method, meta.threshold = score.method, score.threshold
    meta.weights, meta.sha256 = weights.name, sha256_file(weights)
    meta.victim = {"checkpoint": victim_path.stem, "weights": victim.weights, "sha256": victim.sha256}
    meta_path = stem.parent / f"{stem.name}.json"
    meta_path.write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta_path


def read_domain_meta(meta_path: Path) -> DomainMeta:
    try:
        return DomainMeta(**json.loads(meta_path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise DomainScoreError(f"domain score metadata {meta_path.name} is malformed: {err}") from None


def load_domain_score(
    checkpoint_name_or_meta_path: str | os.PathLike[str], model: nn.Module, device: str | torch.device = "cpu"
) -> tuple[DomainScore, DomainMeta]:
    """The domain score saved for a checkpoint, bound to ``model`` (the victim, already loaded).

    Refuses a score whose weights file's sha256 differs from its metadata, one fitted for another victim
    checkpoint, and a ``model`` whose weights are not that checkpoint's."""
    meta_path, victim_path = domain_paths(checkpoint_name_or_meta_path)
    if not meta_path.is_file():
        raise DomainScoreError(f"no domain score for checkpoint {victim_path.stem} ({meta_path.name} not found)")
    meta = read_domain_meta(meta_path)
    weights = verified_weights(meta_path, meta.weights, meta.sha256, "domain score", DomainScoreError)
    victim = read_meta(victim_path)
    if meta.victim.get("sha256") != victim.sha256:
        raise DomainScoreError(
            f"domain score {meta_path.stem} was fitted for victim weights {meta.victim.get('sha256', '')[:12]}…, "
            f"checkpoint {victim_path.stem} has {victim.sha256[:12]}…; refusing to load"
        )
    if state_sha256(model) != victim.sha256:
        raise DomainScoreError(
            f"domain score {meta_path.stem}: the model given is not checkpoint {victim_path.stem}'s weights"
        )
    scorer = empty_scorer(meta.method, meta.feature_dim, meta.num_classes, meta.hidden)
    try:
        state = load_file(str(weights))
        if scorer.state_dict():
            scorer.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise DomainScoreError(f"domain score {meta_path.stem}: weights do not fit {meta.method!r} ({first})") from None
    return DomainScore(model.to(device).eval(), scorer, meta.threshold, meta.method), meta
