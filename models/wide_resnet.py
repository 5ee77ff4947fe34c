"""WRN-16-4 (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016): the paper's CIFAR-10 victim.

Pre-activation basic blocks, depth 16 (two blocks per group), widening factor 4. Grad-CAM reads
``relu``, the activation after the final batch norm (the last conv block, 8×8 at 32 px).
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


class _Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        skip = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(pre)
        return out + skip


class WideResNet(nn.Module):
    cam_layer = "relu"

    def __init__(self, depth: int = 16, widen: int = 4, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        for group, stride in zip(range(3), (1, 2, 2), strict=True):
            for i in range(n):
                layers.append(
                    _Block(widths[group] if i == 0 else widths[group + 1], widths[group + 1], stride if i == 0 else 1)
                )
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(self.flatten(self.pool(a)))


@register_model("wrn16_4")
def wrn16_4(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    return WideResNet(depth=16, widen=4, num_classes=num_classes, in_channels=in_channels)
