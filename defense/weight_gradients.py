"""The weight gradients that eq. (5) compares, one per query, without forming the large ones.

For one query, the gradient of a class score with respect to a ``Linear`` layer's weight is the
rank-one matrix g ⊗ a (g: the gradient at the layer's output, a: its input). Inner products and
norms of such gradients need only the factors: ⟨g ⊗ a, g' ⊗ a'⟩ = (g·g')(a·a'), ‖g ⊗ a‖ = ‖g‖‖a‖.
A :class:`WeightGradient` holds the rest of a part's gradient (convolutions, biases) flattened,
and the factors of its ``Linear`` weights; the cosine of eq. (5) is taken from :func:`inner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .interpreters import Explanation


class WeightGradient(NamedTuple):
    """∇_w f_y over some parameters, for B queries (a pytree)."""

    dense: Tensor  # (B, P): the parameters not factored, flattened and joined
    outputs: tuple[Tensor, ...]  # per factored weight: ∂f_y/∂z, (B, out)
    inputs: tuple[Tensor, ...]  # per factored weight: the layer's input, (B, in)


def weight_gradient(e: Explanation, names: Sequence[str], batch: int) -> WeightGradient:
    """The gradient over the parameters ``names`` from an explanation (factored weights from ``e.factors``)."""
    factored = [n for n in names if n.endswith(".weight") and n.removesuffix(".weight") in e.factors]
    dense = [e.param_grads[n].reshape(batch, -1) for n in names if n not in factored]
    pairs = [e.factors[n.removesuffix(".weight")] for n in factored]
    flat = torch.cat(dense, dim=1) if dense else e.logits.new_zeros(batch, 0)
    return WeightGradient(flat, tuple(g for g, _ in pairs), tuple(a for _, a in pairs))


def inner(u: WeightGradient, v: WeightGradient) -> Tensor:
    """⟨u, v⟩ per query, (B,)."""
    total = (u.dense * v.dense).sum(1)
    for gu, au, gv, av in zip(u.outputs, u.inputs, v.outputs, v.inputs, strict=True):
        total = total + (gu * gv).sum(1) * (au * av).sum(1)
    return total


def norm(u: WeightGradient) -> Tensor:
    """‖u‖ per query, (B,)."""
    return inner(u, u).clamp_min(0).sqrt()
