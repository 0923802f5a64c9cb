"""torchvision's ResNet-18 for small inputs, as CIFAR ResNets are usually adapted."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18

from models.size import require_input_size


class ResNet18(nn.Module):
    """ResNet-18 (11M parameters) with a 3x3 stride-1 stem and no max-pool, so a 32x32 input keeps its
    resolution into the first stage (ImageNet's 7x7 stride-2 stem and pool would shrink it to 8x8); any
    channel and class count. Meant for a GPU: on 2 CPU cores it trains at ~23 samples/s."""

    # Three stride-2 stages: 16 pixels leave 2x2 for the last stage, so its BatchNorm still has several
    # values per channel when a final batch holds a single item.
    MIN_INPUT_SIZE = 16

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        require_input_size("resnet18", self.MIN_INPUT_SIZE, height, width)
        self.net = resnet18(weights=None, num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def forward(self, x):
        return self.net(x)
