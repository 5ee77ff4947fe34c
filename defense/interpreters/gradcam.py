"""Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017): α_k^y is the spatial mean of ∂f_y/∂A^k."""

from __future__ import annotations

from torch import Tensor

from .base import CAM


class GradCAM(CAM):
    name = "gradcam"

    def channel_weights(self, activation: Tensor, grad_activation: Tensor, extra: Tensor) -> Tensor:
        return grad_activation.mean(dim=(2, 3))
