"""Layer selection by sensitivity (DeepDefense eq. 9).

S_ℓ = (1/N) Σ_i ‖∇_{w_ℓ} f(x_i; w)_{y_i}‖₁ over N samples, y_i the predicted class; the selected
layers are the smallest set of the most sensitive ones whose cumulative share CS reaches the
threshold (90% by default). Candidate layers are the Conv2d and Linear modules (weight and bias).
Scores are computed once per model and stored in the checkpoint's metadata
(``extra["sensitivity"]``) by ``deepdefense sensitivity``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

if TYPE_CHECKING:
    from deepdefense.models.checkpoint import CheckpointMeta

CANDIDATE_TYPES = (nn.Conv2d, nn.Linear)


def candidate_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, CANDIDATE_TYPES)]


def layer_params(model: nn.Module, layers: list[str]) -> list[str]:
    """Parameter names (weight, bias) of the given layers, in the model's order."""
    wanted = set(layers)
    return [n for n, _ in model.named_parameters() if n.rpartition(".")[0] in wanted]


def layer_sensitivity(model: nn.Module, images: Tensor, batch_size: int = 64) -> dict[str, float]:
    """S_ℓ for every candidate layer ℓ, averaged over ``images`` (N, C, H, W) in [0, 1]."""
    layers = candidate_layers(model)
    names = layer_params(model, layers)
    params = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}

    def score(p: dict[str, Tensor], x: Tensor) -> Tensor:
        logits = functional_call(model, p, (x.unsqueeze(0),), strict=False)[0]
        return logits.gather(0, logits.argmax().view(1)).squeeze(0)

    per_sample = vmap(grad(score), in_dims=(None, 0))
    totals = dict.fromkeys(layers, 0.0)
    for start in range(0, len(images), batch_size):
        grads = per_sample(params, images[start : start + batch_size])
        for name, g in grads.items():
            totals[name.rpartition(".")[0]] += float(g.abs().sum())
    return {layer: total / len(images) for layer, total in totals.items()}


def select_layers(scores: Mapping[str, float], cs: float = 90.0) -> list[str]:
    # eq. (9): the smallest ℓ with CS(ℓ) = Σ_{i≤ℓ} S_(i) / Σ_i S_(i) × 100 ≥ cs, layers ranked by S
    if not 0.0 < cs <= 100.0:
        raise ValueError(f"cumulative sensitivity must be in (0, 100], got {cs}")
    ranked = sorted(scores, key=scores.__getitem__, reverse=True)
    total = sum(scores.values())
    chosen, running = [], 0.0
    for layer in ranked:
        chosen.append(layer)
        running += scores[layer]
        if running / total * 100.0 >= cs - 1e-9:
            break
    return chosen


def sample_images(dataset: torch.utils.data.Dataset, n: int, seed: int = 0) -> Tensor:
    """N images drawn without replacement, seeded."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([dataset[int(i)][0] for i in idx])


def checkpoint_sensitivity(
    model: nn.Module, meta: CheckpointMeta, data_root: str | None = None, n: int = 1000, seed: int = 0
) -> dict[str, float]:
    """The scores stored in the checkpoint's metadata, else computed on ``n`` training images."""
    stored = meta.extra.get("sensitivity")
    if stored:
        return dict(stored["scores"])
    if data_root is None:
        raise ValueError(
            f"checkpoint for {meta.arch}/{meta.dataset} has no stored layer sensitivity; run "
            "`deepdefense sensitivity --checkpoint <checkpoint> --data-root <folder>` once, or give a data root"
        )
    return training_sensitivity(model, meta, data_root, n, seed)


def training_sensitivity(model: nn.Module, meta: CheckpointMeta, data_root: str, n: int, seed: int) -> dict[str, float]:
    """S_ℓ on ``n`` images drawn (seeded) from the checkpoint's training split."""
    from deepdefense.models.data import load_split

    return layer_sensitivity(model, sample_images(load_split(meta.dataset, data_root, "train"), n, seed))


def store_sensitivity(
    checkpoint: str, data_root: str | None, n: int = 1000, seed: int = 0
) -> tuple[Path, dict[str, float]]:
    """Compute S_ℓ on ``n`` training images and store it in the checkpoint's metadata JSON; returns that JSON's path
    and S_ℓ per layer."""
    import json
    from dataclasses import asdict

    from deepdefense.models.checkpoint import load_checkpoint, resolve_checkpoint

    model, meta = load_checkpoint(checkpoint)
    scores = training_sensitivity(model, meta, data_root, n, seed)
    # the weights it was computed for: `deepdefense prepare` redoes it (and what depends on it) for other weights
    meta.extra["sensitivity"] = {
        "n": n,
        "seed": seed,
        "split": "train",
        "scores": scores,
        "weights_sha256": meta.sha256,
    }
    path = resolve_checkpoint(checkpoint)
    path.write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return path, scores
