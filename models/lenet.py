"""LeNet for 28×28 grey images (the paper's MNIST/KMNIST victim, Table 1).

The Caffe variant of LeCun et al. (1998): two 5×5 conv layers (20 and 50 channels) with max
pooling, a 500-unit hidden layer and the classifier. Grad-CAM reads ``features.relu2``, the
8×8 activation of the last conv block.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


class LeNet(nn.Module):
    cam_layer = "features.relu2"

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv1", nn.Conv2d(in_channels, 20, kernel_size=5))
        self.features.add_module("relu1", nn.ReLU())
        self.features.add_module("pool1", nn.MaxPool2d(2))
        self.features.add_module("conv2", nn.Conv2d(20, 50, kernel_size=5))
        self.features.add_module("relu2", nn.ReLU())
        self.classifier = nn.Sequential()
        self.classifier.add_module("pool2", nn.MaxPool2d(2))
        self.classifier.add_module("flatten", nn.Flatten())
        self.classifier.add_module("fc1", nn.Linear(50 * 4 * 4, 500))
        self.classifier.add_module("relu3", nn.ReLU())
        self.classifier.add_module("dropout", nn.Dropout(0.5))
        self.classifier.add_module("fc2", nn.Linear(500, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("lenet")
def lenet(num_classes: int = 10, in_channels: int = 1) -> LeNet:
    return LeNet(num_classes=num_classes, in_channels=in_channels)
