"""The misinformation model of Adaptive Misinformation (Kariyappa & Qureshi, "Defending Against Model
Stealing Attacks with Adaptive Misinformation", CVPR 2020), and the blend that serves it.

The misinformation model f̂ has the victim's architecture and normalisation and is trained on the
victim's own training data, but to be *wrong*: it puts little probability on the true class while
staying a confident, ordinary-looking classifier. The gate (``defense/gate.py``) takes only its
ranking of the classes for out-of-domain queries (the attacker's): the answer's values and map stay the
served defense's, on classes that look plausible yet teach a clone the wrong labels.

Its checkpoint is an ordinary one (``models.checkpoint``: safetensors + metadata JSON with sha256,
loadable with ``load_checkpoint``); ``extra`` says what it is (``kind: "misinformation"``) and which
victim it belongs to (name and sha256 of the victim's weights). It lives next to the victim as
``<victim>-misinfo``; :func:`load_misinformation` refuses one made for other weights. Its training is
``defense/fitting/misinformation.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from deepdefense.models.artifacts import beside, check_victim, stem
from deepdefense.models.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
)
from deepdefense.models.normalized import Normalized

KIND = "misinformation"
SUFFIX = "-misinfo"


def misinformation_weight(score: Tensor | float, tau: float, nu: float) -> Tensor:
    """α = sigmoid(ν·(τ − score)) — AM's adaptive weight: near 0 for in-domain queries (score above the
    threshold τ), near 1 for out-of-domain ones; ν sets how sharp the switch is."""
    return torch.sigmoid(nu * (tau - torch.as_tensor(score, dtype=torch.float32)))


def blend(p_victim: Tensor, p_misinfo: Tensor, score: Tensor | float, tau: float, nu: float) -> Tensor:
    """p = (1 − α)·p_victim + α·p_misinfo with α = sigmoid(ν·(τ − score)) — AM's answer (§4, "Adaptive
    misinformation"; their score is the victim's maximum probability, an OOD detector).

    ``p_victim`` and ``p_misinfo`` are (B, K) probabilities, ``score`` is one value per row (B,) or one
    for all. A convex combination of two distributions, so each row still sums to 1.
    """
    return mix(p_victim, p_misinfo, misinformation_weight(score, tau, nu))


def mix(p_victim: Tensor, p_misinfo: Tensor, alpha: Tensor | float) -> Tensor:
    """(1 − α)·p_victim + α·p_misinfo for a given α (one per row, or one for all): the blend's body."""
    alpha = torch.as_tensor(alpha).to(p_victim)
    alpha = alpha.reshape(-1, 1) if alpha.dim() else alpha
    return (1.0 - alpha) * p_victim + alpha * p_misinfo


def misinformation_path(victim_checkpoint: str | os.PathLike[str]) -> Path:
    """Where a victim's misinformation model lives: ``<victim dir>/<victim>-misinfo`` (no suffix)."""
    return stem(beside(resolve_checkpoint(victim_checkpoint), SUFFIX))


def load_misinformation(
    victim_checkpoint: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[Normalized, CheckpointMeta]:
    """The misinformation model made for ``victim_checkpoint`` (shipped name or metadata path).

    Refuses (``CheckpointError``) a missing one, weights whose sha256 differs from the metadata's, a
    checkpoint that is not a misinformation model, and one made for other victim weights: the
    victim's sha256 recorded at training must equal the victim metadata's — a retrained victim
    needs its misinformation model retrained too.
    """
    victim_path = resolve_checkpoint(victim_checkpoint)
    victim = read_meta(victim_path)
    path = beside(victim_path, SUFFIX)
    if not path.is_file():
        raise CheckpointError(
            f"no misinformation model for {victim_path.stem} (looked for {path.name} beside it; "
            f"make one with 'deepdefense misinfo --checkpoint {victim_path.stem}')"
        )
    model, meta = load_checkpoint(path, arch=victim.arch, device=device)
    if meta.extra.get("kind") != KIND:
        raise CheckpointError(f"checkpoint {path.stem} is not a misinformation model (kind {meta.extra.get('kind')!r})")
    recorded = str(meta.extra.get("victim_sha256", ""))
    remedy = f"retrain it: deepdefense misinfo --checkpoint {victim_path.stem}"
    check_victim(
        "misinformation model",
        path,
        recorded,
        victim_path,
        victim.sha256,
        CheckpointError,
        made="trained",
        remedy=remedy,
    )
    if (meta.classes, meta.input_shape, meta.mean, meta.std) != (
        victim.classes,
        victim.input_shape,
        victim.mean,
        victim.std,
    ):
        raise CheckpointError(f"misinformation model {path.stem} does not share {victim_path.stem}'s classes and input")
    return model, meta
