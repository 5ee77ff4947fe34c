"""A victim model that takes images in [0, 1] and applies its data set's normalisation itself.

Serving, attacks and interpreters then all speak raw pixel space (Gradient⊙Input multiplies by
the pixels the user sent), and the normalisation travels with the checkpoint's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalized(nn.Module):
    """``net((x - mean) / std)``; ``cam_layer`` names the wrapped model's last conv block."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std must have one value per channel")
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @property
    def cam_layer(self) -> str:
        return f"net.{self.net.cam_layer}"

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)
