"""BatchNorm re-estimation (METHOD.md section 5): recompute population statistics."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy of every BN running statistic (to restore after an evaluation-only re-estimate)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, num_batches: int = 50,
                  device: torch.device | str | None = None) -> int:
    """Replace BN running stats with the cumulative average over ``num_batches`` batches.

    Only BN layers run in train mode (dropout and quantizer calibration stay as they are);
    momentum and modes are restored afterwards. Returns the number of batches used.
    """
    layers = bn_layers(model)
    if not layers or num_batches <= 0:
        return 0
    modes = [(m, m.training) for m in model.modules()]  # per module: a model may mix train/eval
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if device is not None:
                x = x.to(device, non_blocking=True)
            model(x)
            used += 1
    finally:
        for m, mom in zip(layers, momenta):
            m.momentum = mom
        for m, training in modes:
            m.training = training
    return used
