"""A small depthwise-separable CNN for 8x8..32x32 inputs (the demo's model).

Built like a tiny MobileNet so the depthwise-vs-pointwise oscillation effects of the paper
show up at laptop scale.
"""

from __future__ import annotations

from torch import nn


def _dw_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU6(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class DemoNet(nn.Module):
    """stem conv -> 4 depthwise-separable blocks -> global pool -> linear classifier."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6(inplace=True)
        )
        self.blocks = nn.Sequential(
            _dw_separable(w, w * 2, 1),
            _dw_separable(w * 2, w * 2, 2),
            _dw_separable(w * 2, w * 4, 1),
            _dw_separable(w * 4, w * 4, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(w * 4, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.classifier(self.pool(x).flatten(1))
