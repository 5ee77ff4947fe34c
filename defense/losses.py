"""The DeepDefense losses, written as the paper's equations (Lee, Han, Lee, IJCAI-22, §4.2).

Pure functions on tensors of one query; every function is differentiable and ``vmap``-able.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12


def abs_cosine(a: Tensor, b: Tensor) -> Tensor:
    """|cos∠(a, b)| of two flat vectors (0 when either is the zero vector)."""
    return (a * b).sum().abs() / (a.norm() * b.norm() + _EPS)


def orth_loss(cos_bottom: Tensor, cos_top: Tensor, alpha: float) -> Tensor:
    # eq. (5): α |cos∠(∇_{w_B} f_y, ∇_{w̃_B} f̃_y)| + (1 − α) |cos∠(∇_{w_T} f_y, ∇_{w̃_T} f̃_y)|, cosines from abs_cosine
    return alpha * cos_bottom + (1.0 - alpha) * cos_top


def pred_loss(scores: Tensor, top_k: Tensor, margin: float = 0.0) -> Tensor:
    # eq. (6): Σ_{i<k} (f̃_{s_{i+1}} − f̃_{s_i} + m)⁺ + (max_{j∈S'} f̃_j − f̃_{s_k} + m)⁺; m = 0 is the paper's form
    ranked = scores[top_k]
    order = F.relu(ranked[1:] - ranked[:-1] + margin).sum()
    rest = scores.scatter(0, top_k, torch.full_like(ranked, float("-inf")))
    return order + F.relu(rest.max() - ranked[-1] + margin)


def huber(a: Tensor, delta: float) -> Tensor:
    """L_δ(a) = ½a² if |a| ≤ δ, else δ(|a| − ½δ) (Huber, 1964)."""
    absolute = a.abs()
    return torch.where(absolute <= delta, 0.5 * a * a, delta * (absolute - 0.5 * delta))


def int_loss(attribution: Tensor, order: Tensor, gaps: Tensor, delta: float, margin: float = 0.0) -> Tensor:
    # eq. (7): Σ_i L_δ((Ĩ_{a_{i+1}} − Ĩ_{a_i} + margin·(I_{a_i} − I_{a_{i+1}}))⁺) over the victim's order a,
    # pairs tied in the victim (gap 0) masked out; margin = 0 is the paper's equation exactly
    ranked = attribution.reshape(-1)[order]
    hinge = F.relu(ranked[1:] - ranked[:-1] + margin * gaps)
    return (huber(hinge, delta) * (gaps > 0).to(hinge.dtype)).sum()


def dd_loss(l_orth: Tensor, l_pred: Tensor, l_int: Tensor, lambda1: float, lambda2: float) -> Tensor:
    # eq. (8): L_DD = L_orth + λ1 L_pred + λ2 L_int
    return l_orth + lambda1 * l_pred + lambda2 * l_int


def attribution_order(attribution: Tensor) -> tuple[Tensor, Tensor]:
    """The victim's order a (indices of its map, largest first) and the gaps I_{a_i} − I_{a_{i+1}} ≥ 0."""
    values, order = attribution.reshape(-1).sort(descending=True, stable=True)
    return order, values[:-1] - values[1:]


def topk_preserved(probs: Tensor, top_k: Tensor) -> Tensor:
    """True when ``probs`` keeps the order s_1 > … > s_k > max of the rest (the constraint (3), strict)."""
    ranked = probs[top_k]
    rest = probs.scatter(0, top_k, torch.full_like(ranked, float("-inf")))
    return (ranked[:-1] > ranked[1:]).all() & (ranked[-1] > rest.max())
