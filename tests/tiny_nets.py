"""Networks a user might bring, small enough for the tests: model factories in the form
``unlearn adopt --arch tiny_nets:NAME`` names (``tests/`` is on ``sys.path`` under pytest;
a subprocess needs it on PYTHONPATH)."""

from __future__ import annotations

from torch import nn


class NoBatchNormNet(nn.Module):
    """Two convolutions and a linear head, no BatchNorm (nothing for l2ul to invert)."""

    def __init__(self, num_classes: int, channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def no_bn_net(num_classes: int) -> nn.Module:
    return NoBatchNormNet(num_classes)


def no_bn_rgb_net(num_classes: int) -> nn.Module:
    return NoBatchNormNet(num_classes, channels=3)


def not_a_module(num_classes: int):
    return f"{num_classes} classes"
