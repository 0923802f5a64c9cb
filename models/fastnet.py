"""A compact conv-BatchNorm-GELU network in the style of the fastest CIFAR-10 training scripts."""

from __future__ import annotations

import torch
from torch import nn

from models.size import require_input_size

WIDTHS = (64, 128, 192)  # channels of the three stages: ~0.8M parameters in all (under 1M by design)
STEM = 32


def _conv(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 conv (no bias: BatchNorm's shift replaces it), BatchNorm, GELU."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.GELU()]


class FastNet(nn.Module):
    """stem conv(32), then per stage: conv - max-pool 2 - conv, each conv followed by BatchNorm and GELU; the
    features are max-pooled over space into a linear classifier. Any channel count, size and class count."""

    # Three 2x pools: 16 pixels leave 2x2 for the last stage's BatchNorm, several values per channel even
    # for a final batch of one item.
    MIN_INPUT_SIZE = 16

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        require_input_size("fastnet", self.MIN_INPUT_SIZE, height, width)
        layers = _conv(in_channels, STEM)
        previous = STEM
        for width_ in WIDTHS:
            # Pool right after the first conv of a stage: the second conv runs at a quarter of the pixels.
            conv, norm, activation = _conv(previous, width_)
            layers += [conv, nn.MaxPool2d(2), norm, activation, *_conv(width_, width_)]
            previous = width_
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(previous, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.amax(self.features(x), dim=(2, 3)))
