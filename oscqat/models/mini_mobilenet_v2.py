"""A small MobileNetV2 (inverted residuals, depthwise 3x3, BN, ReLU6) for 16-32 px inputs.

torchvision's MobileNetV2 downsamples 32x: at 32 px its last stages run on 1x1 maps, where a
3x3 depthwise kernel sees only padding outside its centre (40% of its depthwise taps get
exactly zero gradient). This net downsamples 8x, so at 16 px (digits_hard) the smallest map is 2x2 and every
tap of every depthwise kernel touches real activations (tests/test_models.py checks it), and a
run of ~2,000 steps takes minutes on one CPU core.
"""

from __future__ import annotations

from torch import nn

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper's table
DEFAULT_SETTINGS = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 2, 2))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    """1x1 expand (skipped at t = 1) -> depthwise 3x3 -> 1x1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = _conv_bn(cin, hidden, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, act=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return x + out if self.residual else out


class MiniMobileNetV2(nn.Module):
    """stem 3x3 -> inverted residual stages (8x downsampling) -> 1x1 head -> pool -> linear."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, stem: int = 16, head: int = 128,
                 settings=DEFAULT_SETTINGS):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_chans, stem, 3))
        blocks, cin = [], stem
        for t, c, n, s in settings:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*_conv_bn(cin, head, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.pool(x).flatten(1))
