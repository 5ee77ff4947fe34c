"""Layer-wise relevance propagation rules as pure, ``torch.func``-friendly functions.

Each rule maps the relevance ``relevance`` at a layer's output to the relevance at its input
``x``. A layer enters a rule as a function of its input only (its weights closed over, bias left
out), and the rule takes vector-Jacobian products of that function with ``torch.func.vjp``, so
every rule is differentiable with respect to the weights and ``vmap``-able, with no ``.detach()``,
no in-place ops and no branching on tensor values. All rules are linear in ``relevance``.

* :func:`z_plus_rule` — the αβ rule with α = 1, β = 0 (Bach et al. 2015; the rule Relevance-CAM
  propagates with): only positive contributions (x_i w_ij)⁺ = x_i⁺ w_ij⁺ + x_i⁻ w_ij⁻ share
  R_j, R_i = Σ_j (x_i w_ij)⁺ / (Σ_i' (x_i' w_i'j)⁺ + ε) · R_j. For Linear and Conv2d.
* :func:`z_rule` — R_i = Σ_j x_i w_ij / (z_j ± ε) · R_j with z_j = Σ_i x_i w_ij, the stabiliser
  taking z_j's sign. For average / adaptive-average pooling and batch norm's per-channel scaling.
* :func:`winner_take_all` — all of R_j goes to the input that won max-pooling window j (the
  gradient of max pooling routes exactly there).
* :func:`split_sum` — a sum a + b (the residual add) splits R in proportion to the two
  contributions: R_a = a / (a + b ± ε) · R, R_b = b / (a + b ± ε) · R (the z-rule).
* :func:`contrastive_output_relevance` — the starting relevance of Contrastive LRP at the logits.

ε only keeps the divisions finite: because biases are kept out of the denominators, the rules
conserve relevance (Σ R_in = Σ R_out, up to ε) wherever no denominator is zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import vjp

EPS = 1e-6

LinearFn = Callable[[Tensor, Tensor], Tensor]  # (input, weight) -> output, linear in both, no bias


def stabilise(z: Tensor, eps: float = EPS) -> Tensor:
    """z moved ε away from zero in the direction of its sign (zero counts as positive)."""
    return torch.where(z >= 0, z + eps, z - eps)


def contrastive_output_relevance(logits: Tensor, y: Tensor | int) -> Tensor:
    """Contrastive LRP's relevance at the logits: +1 on class ``y``, −1/K on each of the others.

    Relevance-CAM (Lee et al. 2021, after Gu et al. 2018) explains class y by the relevance of y
    minus that of the dual concept "every class but y": R = LRP(e_y) − LRP(d) with the dual's
    start vector d = (1 − e_y) / K, exactly as in the Relevance-CAM authors' code (which starts
    LRP from the indicator, not from the logit's value). Every rule here is linear in the
    relevance, so one propagation of e_y − d gives that difference.
    """
    k = logits.shape[-1]
    classes = torch.as_tensor(y, device=logits.device).reshape(-1, 1)
    target = (torch.arange(k, device=logits.device) == classes).to(logits.dtype)
    return (target - (1 - target) / k).expand_as(logits)


def z_rule(fn: Callable[[Tensor], Tensor], x: Tensor, relevance: Tensor) -> Tensor:
    """R_in = x ⊙ Jᵀ (R / (fn(x) ± ε)) for a bias-free linear ``fn``."""
    z, pullback = vjp(fn, x)
    return x * pullback(relevance / stabilise(z))[0]


def z_plus_rule(fn: LinearFn, x: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    """The α = 1, β = 0 rule for a layer ``fn(x, weight)`` (Linear, Conv2d) without its bias."""
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    z_pos, pull_pos = vjp(lambda t: fn(t, w_pos), x_pos)
    z_neg, pull_neg = vjp(lambda t: fn(t, w_neg), x_neg)
    s = relevance / (z_pos + z_neg + EPS)
    return x_pos * pull_pos(s)[0] + x_neg * pull_neg(s)[0]


def winner_take_all(pool: Callable[[Tensor], Tensor], x: Tensor, relevance: Tensor) -> Tensor:
    """Max pooling: each window's relevance goes to its maximal input."""
    return vjp(pool, x)[1](relevance)[0]


def split_sum(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance of a + b shared between a and b in proportion to their values."""
    s = relevance / stabilise(a + b)
    return a * s, b * s
