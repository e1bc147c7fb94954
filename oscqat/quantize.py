"""``quantize_model``: swap every registered float layer for its quantized twin, in place.

Default bit-width policy follows the paper's release: the first conv gets 8-bit weights and a
float input, the classifier 8-bit weights and input, every other conv/linear (depthwise too)
the target bits. ``overrides`` maps fnmatch patterns of layer names to ``(weight_bits,
act_bits)``; the last matching pattern wins.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from oscqat.layers import QUANT_REGISTRY, QuantMixin, from_float


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model. ``act_bits=None`` leaves inputs of the body layers in float."""

    weight_bits: int = 4
    act_bits: int | None = 4
    per_channel: bool = False
    scale_init: str = "mse"
    first_layer_weight_bits: int = 8
    first_layer_act_bits: int | None = None
    last_layer_weight_bits: int = 8
    last_layer_act_bits: int | None = 8
    overrides: tuple[tuple[str, tuple[int | None, int | None]], ...] = field(default_factory=tuple)

    def __post_init__(self):
        for name in ("weight_bits", "first_layer_weight_bits", "last_layer_weight_bits"):
            value = getattr(self, name)
            if not 2 <= value <= 8:
                raise ValueError(f"QuantConfig.{name} must be between 2 and 8, got {value}")
        for name in ("act_bits", "first_layer_act_bits", "last_layer_act_bits"):
            value = getattr(self, name)
            if value is not None and not 2 <= value <= 8:
                raise ValueError(f"QuantConfig.{name} must be between 2 and 8 or None, got {value}")


def _policy(name: str, index: int, count: int, cfg: QuantConfig) -> tuple[int | None, int | None]:
    if index == 0:
        bits = (cfg.first_layer_weight_bits, cfg.first_layer_act_bits)
    elif index == count - 1:
        bits = (cfg.last_layer_weight_bits, cfg.last_layer_act_bits if cfg.act_bits is not None else None)
    else:
        bits = (cfg.weight_bits, cfg.act_bits)
    for pattern, override in cfg.overrides:
        if fnmatch.fnmatchcase(name, pattern):
            bits = override
    return bits


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Replace conv/linear layers of ``model`` by quantized layers (in place; returns ``model``).

    A pattern override of ``(None, None)`` keeps that layer in float. BatchNorm is left
    unfolded, as in the paper: conv with fake-quantized weight, then float BN.
    """
    cfg = config or QuantConfig()
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) in QUANT_REGISTRY and not isinstance(mod, QuantMixin)
    ]
    if not targets:
        raise ValueError("quantize_model found no Conv2d/Linear layer to quantize")
    for index, (name, mod) in enumerate(targets):
        wbits, abits = _policy(name, index, len(targets), cfg)
        if wbits is None:
            continue
        new = from_float(mod, wbits, abits, cfg.per_channel, cfg.scale_init).to(mod.weight.device)
        _set_submodule(model, name, new)
    return model


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def layer_bits(model: nn.Module) -> dict[str, tuple[int, int | None]]:
    """``{layer name: (weight_bits, act_bits)}`` for every quantized layer."""
    return {n: (m.weight_bits, m.act_bits) for n, m in model.named_modules() if isinstance(m, QuantMixin)}
