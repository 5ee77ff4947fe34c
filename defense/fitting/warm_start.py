"""Learning the engine's warm start (``defense/warm_start.py``) offline, on a checkpoint's training images: the
engine runs its full cold solver on them, and for each class the victim predicts the mean move of the selected
weights is kept (low-rank layers: the rank-``rank`` SVD of the mean move). ``deepdefense warmstart`` drives it."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from ..engine import DeepDefense


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
