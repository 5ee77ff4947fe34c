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

Higher scores are more in-domain; a query is flagged when its score is below ``threshold``, chosen on held-out
in-domain images for a false-positive rate; fitting, thresholds and the choice of method are offline
(``defense/fitting/domain.py``, ``domain_choice.py``). ``save_domain_score`` writes
``<checkpoint>.domain.safetensors`` + ``<checkpoint>.domain.json`` beside the checkpoint; ``load_domain_score``
checks the sha256 of the score's weights and that the victim it is given is the very checkpoint the score was
fitted for. Which method ships, and why, is measured by ``deepdefense domain`` (docs/results/domain-score.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm import tqdm

from deepdefense.models.artifacts import (
    beside,
    check_victim,
    read_pair_meta,
    state_sha256,
    verified_weights,
    victim_record,
    write_pair,
)
from deepdefense.models.checkpoint import CheckpointError, read_meta, resolve_checkpoint

METHODS = ("msp", "energy", "mahalanobis", "detector")
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


# --- files -------------------------------------------------------------------------------------------------


def domain_paths(checkpoint_name_or_meta_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(domain metadata JSON, victim metadata JSON) for a checkpoint name (``lenet-mnist``), a checkpoint's
    metadata JSON, or a domain metadata JSON (``….domain.json``)."""
    path = Path(checkpoint_name_or_meta_path)
    if path.name.endswith(f"{SUFFIX}.json"):
        return path, resolve_checkpoint(path.parent / (path.name[: -len(f"{SUFFIX}.json")] + ".json"))
    victim = resolve_checkpoint(path)
    return beside(victim, SUFFIX), victim


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
    state = score.scorer.state_dict()
    meta.method, meta.threshold = score.method, score.threshold
    meta.victim = victim_record(victim_path, victim.weights, victim.sha256)
    tensors = state or {"threshold": torch.tensor([score.threshold])}
    return write_pair(out or beside(victim_path, SUFFIX), tensors, meta)


def read_domain_meta(meta_path: Path) -> DomainMeta:
    return read_pair_meta(meta_path, DomainMeta, "domain score", DomainScoreError)


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
    recorded = meta.victim.get("sha256", "")
    check_victim(
        "domain score", meta_path, recorded, victim_path, victim.sha256, DomainScoreError, made="fitted", model=model
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
