"""The PyTorch CIFAR10 tutorial's CNN, with the flatten size computed from the input shape."""

from __future__ import annotations

import torch
from torch import nn

from datasets.base import available_memory
from errors import UserError

KERNEL = 5
POOL = 2


def _after_features(size: int) -> int:
    """Spatial size after conv5 -> pool2 -> conv5 -> pool2 (no padding, floor pooling)."""
    for _ in range(2):
        size = (size - (KERNEL - 1)) // POOL
    return size


def min_input_size() -> int:
    """The smallest side whose feature map keeps at least one pixel (16 for this architecture)."""
    size = 1
    while _after_features(size) < 1:
        size += 1
    return size


class TutorialCNN(nn.Module):
    """conv5x5(6) - pool - conv5x5(16) - pool - fc120 - fc84 - fc(num_classes), as in the tutorial."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        smallest = min_input_size()
        if height < smallest or width < smallest:
            raise UserError(
                f"input {width}x{height} (width x height) is too small for the tutorial CNN: "
                f"dataset.width and dataset.height must each be at least {smallest}"
            )
        flat = 16 * _after_features(height) * _after_features(width)
        weight_bytes = 4 * 120 * flat  # fc1's float32 weights, nearly all of the model at large inputs
        available = available_memory()
        if available is not None and weight_bytes > available // 2:
            raise UserError(
                f"input {width}x{height} (width x height) gives the tutorial CNN {weight_bytes / 2**30:.1f} GiB of "
                f"weights, more than half the {available / 2**30:.1f} GiB of memory available: lower dataset.width "
                "and dataset.height"
            )
        self.conv1 = nn.Conv2d(in_channels, 6, KERNEL)
        self.pool = nn.MaxPool2d(POOL, POOL)
        self.conv2 = nn.Conv2d(6, 16, KERNEL)
        self.fc1 = nn.Linear(flat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)
