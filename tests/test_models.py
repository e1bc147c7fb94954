"""The small nets for the offline benchmark: no dead depthwise taps at the benchmark's resolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oscqat import TrainConfig
from oscqat.data import build_data
from oscqat.models import create_model, is_grayscale_model


def _depthwise_grad_counts(arch: str, image_size: int | None, batches: int = 3) -> tuple[int, int]:
    """(weights whose gradient stayed exactly 0 over `batches` training batches, depthwise weights)."""
    data = build_data(TrainConfig(arch=arch, dataset="digits_hard", image_size=image_size, batch_size=32))
    model = create_model(arch, num_classes=10, in_chans=data.in_chans)
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    seen = [torch.zeros_like(m.weight, dtype=torch.bool) for m in dw]
    for i, (x, y) in enumerate(data.train):
        if i >= batches:
            break
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for s, m in zip(seen, dw):
            s |= m.weight.grad != 0
    return sum(int((~s).sum()) for s in seen), sum(s.numel() for s in seen)


def test_mini_mobilenet_v2_has_no_dead_depthwise_taps_at_benchmark_resolution():
    dead, total = _depthwise_grad_counts("mini_mobilenet_v2", None)
    assert total > 2000
    assert dead == 0, f"{dead} of {total} depthwise weights got no gradient"


def test_the_check_finds_dead_taps_when_maps_shrink_to_1x1():
    """8 px through 8x downsampling leaves 1x1 maps: the check must see the dead border taps."""
    dead, total = _depthwise_grad_counts("mini_mobilenet_v2", 8)
    assert dead > 0.1 * total


@pytest.mark.parametrize("arch", ["demo_net", "mini_mobilenet_v2"])
def test_small_nets_are_grayscale_and_classify(arch):
    assert is_grayscale_model(arch)
    model = create_model(arch, num_classes=10, in_chans=1)
    assert model(torch.randn(2, 1, 24, 24)).shape == (2, 10)
    assert not is_grayscale_model("mobilenet_v2")
