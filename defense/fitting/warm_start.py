"""Learning the engine's warm start (``defense/warm_start.py``) offline, on a checkpoint's training images: the
engine runs its full cold solver on them, and for each class the victim predicts the mean move of the selected
weights is kept (low-rank layers: the rank-``rank`` SVD of the mean move). :func:`fit_warm_start` is the whole
pipeline (load the cold engine, draw the training images, learn, save); ``deepdefense warmstart`` calls it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from deepdefense.common.options import described
from deepdefense.models.data import load_split

from ..engine import COLD_STEPS, DeepDefense
from ..loader import load_defense
from ..warm_start import WARM_STEPS, WarmStart, WarmStartMeta, save_warm_start


@dataclass(frozen=True)
class WarmStartConfig:
    """What :func:`fit_warm_start` learns; the fields with a description are ``deepdefense warmstart``'s flags."""

    checkpoint: str = described("lenet-mnist", help="shipped checkpoint name or path to its metadata JSON")
    interpreter: str = described("gradcam", help="the interpreter the warm start is learnt for")
    n: int = described(1280, help="training images to learn on")
    rank: int = described(8, help="rank of each low-rank layer's move (even)")
    seed: int = described(0, help="which training images (a seeded permutation)")
    serve_steps: int = described(
        WARM_STEPS,
        help="the engine's default steps from this warm start: the fewest that keep the strength of the cold "
        "solver, measured with deepdefense fidelity (docs/performance.md)",
    )
    data_root: str | os.PathLike[str] | None = None
    save: str | os.PathLike[str] | None = None  # default: <checkpoint>.warm beside it
    engine_options: dict[str, Any] | None = None  # of the cold solver it averages (``warm_start`` is always off)
    device: str = "cpu"
    progress: bool = True
    command: str = ""


def fit_warm_start(cfg: WarmStartConfig) -> tuple[Path, WarmStartMeta]:
    """Learn the warm start ``cfg`` describes with the checkpoint's cold engine on ``cfg.n`` of its training images
    (a permutation seeded by ``cfg.seed``) and write it (:func:`defense.warm_start.save_warm_start`); returns its
    metadata path and what it records."""
    options = {"warm_start": False, **(cfg.engine_options or {})}
    engine, meta = load_defense(
        cfg.checkpoint, "deepdefense", cfg.interpreter, device=cfg.device, data_root=cfg.data_root, **options
    )
    assert isinstance(engine, DeepDefense)
    images = load_split(meta.dataset, cfg.data_root, "train").tensors[0]  # type: ignore[attr-defined]
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n]
    dense, factors = learn_warm_start(
        engine, images[pick].to(cfg.device), classes=meta.num_classes, rank=cfg.rank, progress=cfg.progress
    )
    warm_meta = WarmStartMeta(
        interpreter=cfg.interpreter,
        layers=engine.layers,
        classes=meta.num_classes,
        rank=cfg.rank,
        images=len(pick),
        dataset=f"{meta.dataset} train",
        steps=engine.config.steps or COLD_STEPS,
        seed=cfg.seed,
        command=cfg.command,
        serve_steps=cfg.serve_steps,
    )
    return save_warm_start(WarmStart(warm_meta, dense, factors), cfg.checkpoint, cfg.save), warm_meta


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
