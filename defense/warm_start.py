"""Warm starts for the DeepDefense engine: where each query's misdirection model starts (docs/performance.md).

From the victim (plus query-keyed noise, ``DeepDefense.initial_params``) every clone spends most of its
steps walking away from the victim. A warm start is learnt once per checkpoint, offline, on the
checkpoint's *training* images (never the evaluation's attacker data): the engine runs its full cold
solver on them, and for each class the victim predicts the mean move of the selected weights is kept —
each dense per-query tensor as it is, each low-rank ``Linear`` layer (``defense/low_rank.py``) as the
rank-``rank`` SVD of its mean move. A query then starts at victim + move[its predicted class] + its
keyed noise (so a repeated query still gets the same answer, different queries different models), the
start is checked against constraints (3)–(4) (a query whose warm start breaks them starts from the
victim instead), and a few steps enforce its own constraints.

Shipped beside the checkpoint: ``<name>.warm.safetensors`` and ``<name>.warm.json`` (the victim's weights
sha256, the interpreter and layers it was learnt for, how it was learnt, the tensors' sha256, verified
on every load). ``deepdefense warmstart`` makes them; the learning is ``defense/fitting/warm_start.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from deepdefense.models.artifacts import (
    beside,
    check_victim,
    read_pair_meta,
    verified_weights,
    victim_record,
    write_pair,
)
from deepdefense.models.checkpoint import read_meta, resolve_checkpoint

#: ``<checkpoint>.warm.json`` / ``.safetensors``.
SUFFIX = ".warm"
#: The engine's default step cap from a warm start unless its metadata says otherwise (``serve_steps``).
WARM_STEPS = 10


class WarmStartError(ValueError):
    """A warm start that cannot be used: missing, tampered with, or learnt for other victim weights."""


@dataclass
class WarmStartMeta:
    """What a saved warm start is, what it belongs to, and how it was learnt."""

    interpreter: str
    layers: list[str]  # the engine's selected layers (eq. 9) it was learnt for
    classes: int
    rank: int  # of each low-rank layer's move (2 per preset rank-two term)
    images: int  # training images it was learnt on
    dataset: str
    steps: int  # the cold solver's steps per image
    seed: int
    command: str
    serve_steps: int = WARM_STEPS  # the engine's default step cap from this warm start, chosen by measurement
    victim: dict[str, str] = field(default_factory=dict)  # checkpoint name, weights file, sha256
    weights: str = ""
    sha256: str = ""


@dataclass
class WarmStart:
    """Per-class moves of the selected weights: ``dense[name]`` (K, *shape) and ``factors[layer]`` (U (K, out, r),
    V (K, in, r)) with move U Vᵀ."""

    meta: WarmStartMeta
    dense: dict[str, Tensor]
    factors: dict[str, tuple[Tensor, Tensor]]

    @property
    def terms(self) -> int:
        """Rank-two terms each low-rank layer starts with (``LowRankWeight.preset``)."""
        return self.meta.rank // 2 if self.factors else 0


def warm_start_paths(checkpoint: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(warm start metadata JSON, victim metadata JSON) of a checkpoint name or metadata JSON."""
    victim = resolve_checkpoint(checkpoint)
    return beside(victim, SUFFIX), victim


def save_warm_start(
    warm: WarmStart, checkpoint: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> Path:
    """Write ``<out>.safetensors`` + ``<out>.json`` (default: beside the checkpoint); returns the JSON path."""
    meta_path, victim_path = warm_start_paths(checkpoint)
    tensors = {f"dense/{k}": v for k, v in warm.dense.items()}
    for m, (u, v) in warm.factors.items():
        tensors[f"u/{m}"], tensors[f"v/{m}"] = u, v
    victim = read_meta(victim_path)
    warm.meta.victim = victim_record(victim_path, victim.weights, victim.sha256)
    return write_pair(out or meta_path, tensors, warm.meta)


def load_warm_start(checkpoint: str | os.PathLike[str], model: nn.Module) -> WarmStart | None:
    """The warm start shipped for ``checkpoint`` (None when there is none), once its tensors' sha256 is the
    recorded one and it was learnt for ``model``'s weights (:class:`WarmStartError` otherwise)."""
    meta_path, victim_path = warm_start_paths(checkpoint)
    if not meta_path.is_file():
        return None
    meta = read_pair_meta(meta_path, WarmStartMeta, "warm start", WarmStartError)
    weights = verified_weights(meta_path, meta.weights, meta.sha256, "warm start", WarmStartError)
    recorded = meta.victim.get("sha256", "")
    victim_sha256 = read_meta(victim_path).sha256
    check_victim(
        "warm start", meta_path, recorded, victim_path, victim_sha256, WarmStartError, made="learnt", model=model
    )
    try:
        tensors = load_file(str(weights))
    except SafetensorError as err:
        raise WarmStartError(f"warm start {meta_path.stem}: {err}") from None
    dense = {k.removeprefix("dense/"): v for k, v in tensors.items() if k.startswith("dense/")}
    factors = {
        k.removeprefix("u/"): (v, tensors[f"v/{k.removeprefix('u/')}"])
        for k, v in tensors.items()
        if k.startswith("u/")
    }
    return WarmStart(meta, dense, factors)
