"""ResNet-18 / ResNet-34 (He et al., CVPR 2016) from torchvision with the head resized.

The paper's Flowers-17 (ResNet-18) and CUB-200 (ResNet-34) victims. Grad-CAM reads ``layer4``,
the last residual stage (7×7 at 224 px).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import ResNet
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models import resnet34 as tv_resnet34

from .registry import register_model


def _adapt(model: ResNet, in_channels: int) -> ResNet:
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.cam_layer = "layer4"
    return model


@register_model("resnet18")
def resnet18(num_classes: int = 17, in_channels: int = 3) -> ResNet:
    return _adapt(tv_resnet18(weights=None, num_classes=num_classes), in_channels)


@register_model("resnet34")
def resnet34(num_classes: int = 200, in_channels: int = 3) -> ResNet:
    return _adapt(tv_resnet34(weights=None, num_classes=num_classes), in_channels)
