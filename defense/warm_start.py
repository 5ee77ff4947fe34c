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
on every load). ``deepdefense warmstart`` makes them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn
from tqdm import tqdm

from models.checkpoint import read_meta, resolve_checkpoint, sha256_file, verified_weights

from .domain import state_sha256

if TYPE_CHECKING:
    from .engine import DeepDefense

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


def learn_warm_start(
    engine: DeepDefense, images: Tensor, *, classes: int, rank: int = 8, progress: bool = True
) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """The per-class mean moves of ``engine``'s cold solver on ``images`` (dense moves, low-rank factors).

    ``engine`` must start from the victim (no warm start): what is averaged is where the full solver goes.
    Each query's move is its last feasible iterate minus the victim; classes are the victim's predictions."""
    if engine.warm is not None or engine.config.patience:
        raise ValueError("learn a warm start with a cold engine that runs every step (warm_start=False, patience 0)")
    if rank < 2 or rank % 2:
        raise ValueError("rank must be a positive even number (rank-two terms)")
    victim = engine.victim_params()
    dense = {k: torch.zeros(classes, *victim[k].shape) for k in engine.param_names}
    full = {m: torch.zeros(classes, *victim[f"{m}.weight"].shape) for m in engine.low_rank}
    count = torch.zeros(classes)
    batches = images.split(engine.config.batch_size)
    for x in tqdm(batches, desc="warm start", unit="batch", disable=not progress):
        ref = engine.reference(x)
        state = engine.solve(x, ref)
        label = ref.label.cpu()
        count += torch.bincount(label, minlength=classes).float()
        for k in dense:
            dense[k].index_add_(0, label, (state.anchor[k] - victim[k]).detach().cpu())
        for m, w in state.low_rank.items():
            u, v = w.factors(anchor=True)
            full[m].index_add_(0, label, torch.bmm(u, v.transpose(1, 2)).detach().cpu())
    if bool((count == 0).any()):
        missing = [i for i in range(classes) if count[i] == 0]
        raise ValueError(f"no training image of classes {missing}: give more images")
    for k in dense:
        dense[k] /= count.view(-1, *([1] * (dense[k].dim() - 1)))
    factors = {}
    for m, moves in full.items():
        u, s, vh = torch.linalg.svd(moves / count.view(-1, 1, 1), full_matrices=False)
        factors[m] = ((u[:, :, :rank] * s[:, None, :rank]).contiguous(), vh[:, :rank].transpose(1, 2).contiguous())
    return dense, factors


def warm_start_paths(checkpoint: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(warm start metadata JSON, victim metadata JSON) of a checkpoint name or metadata JSON."""
    victim = resolve_checkpoint(checkpoint)
    return victim.parent / f"{victim.stem}{SUFFIX}.json", victim


def save_warm_start(
    warm: WarmStart, checkpoint: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> Path:
    """Write ``<out>.safetensors`` + ``<out>.json`` (default: beside the checkpoint); returns the JSON path."""
    meta_path, victim_path = warm_start_paths(checkpoint)
    if out is not None:
        stem = Path(out).with_suffix("") if Path(out).suffix in (".json", ".safetensors") else Path(out)
        meta_path = stem.parent / f"{stem.name}.json"
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"dense/{k}": v.contiguous() for k, v in warm.dense.items()}
    for m, (u, v) in warm.factors.items():
        tensors[f"u/{m}"], tensors[f"v/{m}"] = u.contiguous(), v.contiguous()
    weights = meta_path.with_suffix(".safetensors")
    weights.write_bytes(save(tensors))  # through open(): readable by a server running as another user
    victim = read_meta(victim_path)
    warm.meta.victim = {"checkpoint": victim_path.stem, "weights": victim.weights, "sha256": victim.sha256}
    warm.meta.weights, warm.meta.sha256 = weights.name, sha256_file(weights)
    meta_path.write_text(json.dumps(asdict(warm.meta), indent=2) + "\n")
    return meta_path


def load_warm_start(checkpoint: str | os.PathLike[str], model: nn.Module) -> WarmStart | None:
    """The warm start shipped for ``checkpoint`` (None when there is none), once its tensors' sha256 is the
    recorded one and it was learnt for ``model``'s weights (:class:`WarmStartError` otherwise)."""
    meta_path, victim_path = warm_start_paths(checkpoint)
    if not meta_path.is_file():
        return None
    try:
        meta = WarmStartMeta(**json.loads(meta_path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise WarmStartError(f"warm start metadata {meta_path.name} is malformed: {err}") from None
    weights = verified_weights(meta_path, meta.weights, meta.sha256, "warm start", WarmStartError)
    if meta.victim.get("sha256") != state_sha256(model) or meta.victim.get("sha256") != read_meta(victim_path).sha256:
        raise WarmStartError(f"warm start {meta_path.stem} was learnt for other weights than {victim_path.stem}'s")
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
