"""The DeepDefense losses, written as the paper's equations (Lee, Han, Lee, IJCAI-22, §4.2).

Pure functions on tensors of one query; every function is differentiable and ``vmap``-able.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12
_BIG = 1e4  # beyond any normalised map value: the neutral start of a min / max


def abs_cosine(dot: Tensor, norm_a: Tensor, norm_b: Tensor) -> Tensor:
    """|cos∠(a, b)| from ⟨a, b⟩, ‖a‖ and ‖b‖ (0 when either is the zero vector)."""
    return dot.abs() / (norm_a * norm_b + _EPS)


def orth_loss(cos_bottom: Tensor, cos_top: Tensor, alpha: float) -> Tensor:
    # eq. (5): α |cos∠(∇_{w_B} f_y, ∇_{w̃_B} f̃_y)| + (1 − α) |cos∠(∇_{w_T} f_y, ∇_{w̃_T} f̃_y)|, cosines from abs_cosine
    return alpha * cos_bottom + (1.0 - alpha) * cos_top


def pred_loss(scores: Tensor, top_k: Tensor, margin: float = 0.0) -> Tensor:
    # eq. (6): Σ_{i<k} (f̃_{s_{i+1}} − f̃_{s_i} + m)⁺ + (max_{j∈S'} f̃_j − f̃_{s_k} + m)⁺; m = 0 is the paper's form
    ranked = scores[top_k]
    order = F.relu(ranked[1:] - ranked[:-1] + margin).sum()
    return order + F.relu(_max_outside(scores, top_k) - ranked[-1] + margin)


def _max_outside(scores: Tensor, top_k: Tensor) -> Tensor:
    """max_{j∈S'} scores_j, S' the classes outside the top-k."""
    return scores.scatter(0, top_k, torch.full_like(scores[top_k], float("-inf"))).max()


def huber(a: Tensor, delta: float) -> Tensor:
    """L_δ(a) = ½a² if |a| ≤ δ, else δ(|a| − ½δ) (Huber, 1964)."""
    absolute = a.abs()
    return torch.where(absolute <= delta, 0.5 * a * a, delta * (absolute - 0.5 * delta))


def int_loss(
    attribution: Tensor, order: Tensor, groups: Tensor, gaps: Tensor, delta: float, margin: float = 0.0
) -> Tensor:
    # eq. (7) over tie groups along the victim's order a:
    #   Σ_g L_δ((max_{g+1} Ĩ − min_g Ĩ + margin·gap_g)⁺) + Σ_g L_δ(max_g Ĩ − min_g Ĩ);
    # without ties every group is one pixel and this is the paper's sum over adjacent pairs (margin = 0)
    ranked = attribution.reshape(-1)[order]
    n = ranked.numel()
    low = ranked.new_full((n,), _BIG).scatter_reduce(0, groups, ranked, "amin")
    high = ranked.new_full((n,), -_BIG).scatter_reduce(0, groups, ranked, "amax")
    between = gaps > 0
    order_hinge = F.relu(torch.where(between, high[1:] - low[:-1] + margin * gaps, torch.zeros_like(gaps)))
    present = torch.zeros_like(ranked).scatter(0, groups, torch.ones_like(ranked)) > 0
    spread = torch.where(present, high - low, torch.zeros_like(ranked))  # a victim tie stays a tie
    return (huber(order_hinge, delta) * between.to(ranked.dtype)).sum() + huber(spread, delta).sum()


def dd_loss(l_orth: Tensor, l_pred: Tensor, l_int: Tensor, lambda1: float, lambda2: float) -> Tensor:
    # eq. (8): L_DD = L_orth + λ1 L_pred + λ2 L_int
    return l_orth + lambda1 * l_pred + lambda2 * l_int


def attribution_order(attribution: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The victim's order a (largest first), each position's tie group along a, and the gaps.

    ``groups[i]`` numbers the run of equal values that position i of the order belongs to;
    ``gaps[g]`` is the victim's value of group g minus that of group g+1 (0 past the last group).
    """
    values, order = attribution.reshape(-1).sort(descending=True, stable=True)
    steps = values[:-1] - values[1:]
    groups = torch.cat([steps.new_zeros(1, dtype=torch.long), (steps > 0).long().cumsum(0)])
    gaps = torch.zeros_like(values).scatter_add(0, groups[:-1], steps)[:-1]  # steps inside a group are 0
    return order, groups, gaps


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 0..n−1 along the last dimension of ``values`` (…, n), ties sharing their average rank.

    From one sort: a run of equal values at sorted positions first..last shares (first + last) / 2 (what the
    counts of smaller and of not larger values give). Batched over the leading dimensions directly, with no
    search: under the engine's gradient transform a ``searchsorted`` cost ten times this whole function."""
    ordered, order = values.sort(dim=-1)
    position = torch.arange(values.shape[-1], device=values.device).expand_as(order)
    starts = torch.cat([torch.ones_like(ordered[..., :1], dtype=torch.bool), ordered[..., 1:] != ordered[..., :-1]], -1)
    ends = starts.roll(-1, dims=-1)  # a run ends where the next begins; the last position ends the last run
    first = torch.where(starts, position, 0).cummax(dim=-1).values
    last = torch.where(ends, position, values.shape[-1] - 1).flip(-1).cummin(dim=-1).values.flip(-1)
    average = (first + last).double() / 2
    return torch.empty_like(average).scatter_(-1, order, average)


def centred_ranks(values: Tensor) -> Tensor:
    """Tie-averaged ranks along the last dimension (…, n) minus their mean: what Spearman's ρ correlates (each row
    one map, flattened)."""
    ranks = average_ranks(values)
    return ranks - ranks.mean(dim=-1, keepdim=True)


def rank_correlation(ra: Tensor, rb: Tensor) -> Tensor:
    """Pearson correlation of centred rank vectors (:func:`centred_ranks`) along the last dimension; 0 when one
    is constant."""
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(_EPS)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's ρ between two maps (Pearson correlation of tie-averaged ranks); 0 when one is constant."""
    return rank_correlation(centred_ranks(a.reshape(-1)), centred_ranks(b.reshape(-1)))


def topk_preserved(probs: Tensor, top_k: Tensor) -> Tensor:
    """True when ``probs`` keeps the order s_1 > … > s_k > max of the rest (the constraint (3), strict)."""
    ranked = probs[top_k]
    return (ranked[:-1] > ranked[1:]).all() & (ranked[-1] > _max_outside(probs, top_k))
