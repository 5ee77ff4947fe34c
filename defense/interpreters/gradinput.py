"""Gradient⊙Input (Shrikumar et al., "Learning Important Features Through Propagating
Activation Differences", ICML 2017): x ⊙ ∂f_y/∂x, summed over channels. Here h(x) = x, so every
layer belongs to the top part (DeepDefense §4.1)."""

from __future__ import annotations

from torch import Tensor

from .base import Interpreter


class GradientInput(Interpreter):
    name = "gradinput"
    uses_activation = False
    needs_input_gradient = True

    def _map(
        self, *, x: Tensor, grad_x: Tensor | None, activation: Tensor, grad_activation: Tensor, extra: Tensor
    ) -> Tensor:
        assert grad_x is not None  # needs_input_gradient
        return (x * grad_x).sum(dim=1)
