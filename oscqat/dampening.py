"""Oscillation dampening loss (METHOD.md section 3).

``|| sg(s * x_int) - clip(w, s*n, s*p) ||^2``: pulls each latent weight towards the centre of
its current bin. It reuses the integer weights of the latest forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from oscqat.layers import quant_layers

AGGREGATIONS = ("kernel_mean", "sum", "mean")


def layer_dampening_loss(layer, aggregation: str = "kernel_mean") -> torch.Tensor:
    """Dampening loss of one quantized layer (after a forward pass)."""
    w = layer.weight
    x_int = layer.last_weight_int
    if x_int is None:
        x_int = layer.weight_int()
    quantizer = layer.weight_quantizer
    scale = quantizer._broadcast_scale(w).detach()
    n, p = quantizer.bounds
    target = scale * x_int
    clipped = torch.clamp(w, min=scale * n, max=scale * p)
    sq = (target - clipped).pow(2)
    if layer._any_frozen:
        sq = sq.masked_fill(layer.frozen_mask, 0.0)
    if aggregation == "kernel_mean":
        # sum over output channels, mean over the rest (fan-in and kernel)
        return sq.sum() * (w.shape[0] / w.numel())
    if aggregation == "sum":
        return sq.sum()
    if aggregation == "mean":
        return sq.mean()
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def dampening_loss(module: nn.Module, aggregation: str = "kernel_mean", max_bits: int = 8) -> torch.Tensor:
    """Sum of the dampening loss over quantized layers with weight bits ``<= max_bits``."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    losses = [layer_dampening_loss(layer, aggregation) for _, layer in quant_layers(module)
              if layer.weight_bits <= max_bits]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).sum()
