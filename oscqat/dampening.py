"""Oscillation dampening loss (METHOD.md section 3).

``|| sg(s * x_int) - clip(w, s*n, s*p) ||^2``: pulls each latent weight towards the centre of
its current bin. It reuses the integer weights of the latest forward pass. After
``enable_fused_dampening`` the quantizer computes each layer's sum (and its gradient) inside its
own pass, which is what training uses; the unfused formula stays for other callers.
"""

from __future__ import annotations

import torch
from torch import nn

from oscqat.layers import quant_layers

AGGREGATIONS = ("kernel_mean", "sum", "mean")


def aggregation_weight(layer, aggregation: str) -> float:
    """Factor on a layer's squared-error sum: kernel_mean sums over output channels and
    averages over the rest (fan-in and kernel), mean averages everything, sum keeps it."""
    w = layer.weight
    if aggregation == "kernel_mean":
        return w.shape[0] / w.numel()
    if aggregation == "sum":
        return 1.0
    if aggregation == "mean":
        return 1.0 / w.numel()
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def enable_fused_dampening(module: nn.Module, max_bits: int = 8, enabled: bool = True) -> int:
    """Let layers with weight bits ``<= max_bits`` compute their dampening sum in forward
    (training mode, grad enabled). Returns how many layers were switched."""
    count = 0
    for _, layer in quant_layers(module):
        if layer.weight_bits <= max_bits:
            layer.fuse_dampening = enabled
            count += 1
    return count


def layer_dampening_loss(layer, aggregation: str = "kernel_mean") -> torch.Tensor:
    """Dampening loss of one quantized layer (after a forward pass)."""
    coef = aggregation_weight(layer, aggregation)
    if layer.last_damp is not None:
        return layer.last_damp * coef
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
    return sq.sum() * coef


def dampening_loss(module: nn.Module, aggregation: str = "kernel_mean", max_bits: int = 8) -> torch.Tensor:
    """Sum of the dampening loss over quantized layers with weight bits ``<= max_bits``."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    layers = [layer for _, layer in quant_layers(module) if layer.weight_bits <= max_bits]
    if not layers:
        return torch.zeros(())
    fused = all(layer.last_damp is not None for layer in layers)
    if fused:  # one weighted sum over the per-layer sums instead of an op per layer
        sums = torch.stack([layer.last_damp for layer in layers])
        def coefs() -> torch.Tensor:
            return torch.tensor([aggregation_weight(layer, aggregation) for layer in layers], dtype=sums.dtype,
                                device=sums.device)

        if torch.compiler.is_compiling():  # a graph constant; no module-dict cache (torch 2.11's
            # Dynamo breaks the graph at ``__dict__.setdefault``: 4 graphs instead of 1)
            return torch.dot(sums, coefs())
        cache = module.__dict__.setdefault("_dampening_coefs", {})  # plain dict: not a buffer
        key = (aggregation, max_bits, sums.device, len(layers))
        if key not in cache:
            cache[key] = coefs()
        return torch.dot(sums, cache[key])
    return torch.stack([layer_dampening_loss(layer, aggregation) for layer in layers]).sum()
