"""Analytic model size and bit-operations of a (quantized) model, for metrics and the report.

``model_size_kb``: the storage a deployment needs, in KiB (1024 bytes)::

    sum over quantized conv/linear layers of  numel(W) * b_w          (packed integers)
  + 32 * (every other parameter or float buffer used at inference:     (float32)
          biases, float layers' weights, BN affine + running statistics, quantizer scales)

  divided by 8 * 1024. Training-only state (frozen masks and integers) is not counted.

``bops_g``: bit-operations per image, in units of 1e9 (BOPs, as in Baalen et al. 2020)::

    sum over conv/linear layers of  MACs * b_w * b_a
    MACs(conv)   = C_out * H_out * W_out * (C_in / groups) * k_h * k_w
    MACs(linear) = in_features * out_features

  with b_w, b_a the layer's weight and input bit-widths, 32 for anything left in float (the
  first conv's image input, an FP model). Element-wise ops, BN and pooling are not counted.
"""

from __future__ import annotations

import torch
from torch import nn

from oscqat.layers import QuantMixin

FLOAT_BITS = 32


def layer_bits(module: nn.Module) -> tuple[int, int]:
    """``(b_w, b_a)`` of a conv/linear layer; 32 where it is not quantized."""
    if isinstance(module, QuantMixin):
        return module.weight_bits, module.act_bits or FLOAT_BITS
    return FLOAT_BITS, FLOAT_BITS


def model_size_bits(model: nn.Module) -> int:
    """Packed storage in bits (see the module docstring)."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and isinstance(module, QuantMixin):
                total += p.numel() * module.weight_bits
            else:
                total += p.numel() * FLOAT_BITS
        for name, b in module.named_buffers(recurse=False):
            if name in ("running_mean", "running_var") and b is not None:
                total += b.numel() * FLOAT_BITS
    return total


def layer_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, tuple[nn.Module, int]]:
    """``{name: (layer, MACs per image)}`` for every conv/linear, from one forward of a zero image.

    The forward runs in eval mode without gradient and leaves the model's state as it was
    (quantizers must already be calibrated: a zero image is no calibration data).
    """
    macs: dict[str, tuple[nn.Module, int]] = {}
    hooks = []

    def hook(name):
        def record(module, _inputs, output):
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                n = output.shape[1] * output.shape[2] * output.shape[3] * (module.in_channels // module.groups) * kh * kw
            else:
                n = module.in_features * module.out_features
            macs[name] = (module, int(n))
        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
    modes = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
    return macs


def model_cost(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, float]:
    """``{"model_size_kb": ..., "bops_g": ...}`` for images of ``input_shape`` (C, H, W)."""
    bops = 0
    for module, n in layer_macs(model, input_shape).values():
        b_w, b_a = layer_bits(module)
        bops += n * b_w * b_a
    return {"model_size_kb": model_size_bits(model) / 8 / 1024, "bops_g": bops / 1e9}
