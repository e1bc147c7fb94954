"""Oscillation tracking and iterative weight freezing (METHOD.md sections 2 and 4).

The tracker reads the integer weights that each layer used in its latest forward pass
(``last_weight_int``), so it adds no extra quantization pass. Call ``step`` once per training
step, after ``optimizer.step()``; never during evaluation (that would decay the frequencies).
"""

from __future__ import annotations

import torch
from torch import nn

from oscqat.layers import QuantMixin, quant_layers


class _LayerState:
    __slots__ = ("prev_int", "last_dir", "freq", "int_ema", "frozen_latent")

    def __init__(self, weight: torch.Tensor):
        self.prev_int: torch.Tensor | None = None
        self.last_dir = torch.zeros_like(weight, dtype=torch.int8)
        self.freq = torch.zeros_like(weight, dtype=torch.float32)
        self.int_ema: torch.Tensor | None = None
        self.frozen_latent: torch.Tensor | None = None  # latent values at freeze time


def layer_kind(layer: QuantMixin) -> str:
    """'depthwise', 'pointwise' (1x1 conv) or 'other' (full conv, linear)."""
    if layer.is_depthwise:
        return "depthwise"
    if layer.is_pointwise:
        return "pointwise"
    return "other"


class OscillationTracker:
    """Per-weight oscillation frequency EMA, integer EMA and freezing for low-bit layers.

    Args:
        module: model holding quantized layers.
        momentum: EMA momentum ``m`` for the frequency and the integer EMA.
        max_bits: track layers whose weight bits are ``<= max_bits``.
        report_threshold: a weight counts as oscillating in ``summary`` when ``f`` exceeds it.
            Default ``2 * momentum``: more than about two oscillations within the EMA's horizon
            of ``1/m`` steps, so the fraction means the same whatever momentum a trial uses.
    """

    def __init__(self, module: nn.Module, momentum: float = 1e-3, max_bits: int = 4,
                 report_threshold: float | None = None):
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.max_bits = max_bits
        self.report_threshold = 2.0 * momentum if report_threshold is None else report_threshold
        self.layers: dict[str, QuantMixin] = {
            name: layer for name, layer in quant_layers(module) if layer.weight_bits <= max_bits
        }
        self.states = {name: _LayerState(layer.weight) for name, layer in self.layers.items()}
        self.steps = 0

    @torch.no_grad()
    def step(self, freeze_threshold: float = 0.0) -> None:
        """Update every tracked layer from its latest forward; freeze where ``f > freeze_threshold``.

        ``freeze_threshold=0`` disables freezing. Also pins the latent value of frozen weights,
        undoing any weight-decay or momentum drift from the optimizer step just taken.
        """
        m = self.momentum
        for name, layer in self.layers.items():
            x_int = layer.last_weight_int
            if x_int is None:
                continue
            st = self.states[name]
            if st.prev_int is None:
                st.prev_int = x_int.clone()
                st.int_ema = x_int.clone()
            else:
                direction = torch.sign(x_int - st.prev_int).to(torch.int8)
                moved = direction != 0
                oscillated = moved & (direction == -st.last_dir)
                st.last_dir = torch.where(moved, direction, st.last_dir)
                st.freq.mul_(1.0 - m).add_(oscillated, alpha=m)
                st.int_ema.mul_(1.0 - m).add_(x_int, alpha=m)
                st.prev_int.copy_(x_int)
            if freeze_threshold > 0.0:
                self._freeze(layer, st, freeze_threshold)
            if layer._any_frozen and st.frozen_latent is not None:
                torch.where(layer.frozen_mask, st.frozen_latent, layer.weight, out=layer.weight.data)
            layer.last_weight_int = None  # consumed: a forward must run before the next update
        self.steps += 1

    def _freeze(self, layer: QuantMixin, st: _LayerState, threshold: float) -> None:
        new = (st.freq > threshold) & ~layer.frozen_mask
        if not bool(new.any()):
            return
        n, p = layer.weight_quantizer.bounds
        target = torch.round(st.int_ema).clamp_(n, p)
        layer.frozen_int.copy_(torch.where(new, target.to(torch.int8), layer.frozen_int))
        layer.frozen_mask |= new
        latent = layer.weight.detach()
        if st.frozen_latent is None:
            st.frozen_latent = latent.clone()
        else:
            st.frozen_latent = torch.where(new, latent, st.frozen_latent)
        layer.refresh_frozen()

    # reporting -------------------------------------------------------------
    @torch.no_grad()
    def summary(self) -> dict:
        """Oscillating and frozen fractions: overall, depthwise, pointwise and per layer."""
        groups = {"all": [0, 0, 0], "depthwise": [0, 0, 0], "pointwise": [0, 0, 0]}
        per_layer = {}
        for name, layer in self.layers.items():
            st = self.states[name]
            total = st.freq.numel()
            # frozen weights no longer oscillate (their frequency only decays): count them as frozen
            osc = int(((st.freq > self.report_threshold) & ~layer.frozen_mask).sum())
            frozen = int(layer.frozen_mask.sum())
            kind = layer_kind(layer)
            per_layer[name] = {
                "kind": kind,
                "bits": layer.weight_bits,
                "numel": total,
                "osc_frac": osc / total,
                "frozen_frac": frozen / total,
                "mean_freq": float(st.freq.mean()),
            }
            for key in ("all", kind):
                if key in groups:
                    g = groups[key]
                    g[0] += osc
                    g[1] += frozen
                    g[2] += total

        def frac(key: str, idx: int) -> float:
            return groups[key][idx] / groups[key][2] if groups[key][2] else 0.0

        return {
            "osc_frac": frac("all", 0),
            "osc_frac_depthwise": frac("depthwise", 0),
            "osc_frac_pointwise": frac("pointwise", 0),
            "frozen_frac": frac("all", 1),
            "frozen_frac_depthwise": frac("depthwise", 1),
            "frozen_frac_pointwise": frac("pointwise", 1),
            "tracked_weights": groups["all"][2],
            "layers": per_layer,
        }

    # persistence -------------------------------------------------------------
    def state_dict(self) -> dict:
        out = {"steps": self.steps, "momentum": self.momentum, "layers": {}}
        for name, st in self.states.items():
            out["layers"][name] = {k: getattr(st, k) for k in _LayerState.__slots__}
        return out

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        missing = set(self.states) - set(state["layers"])
        if missing:
            raise KeyError(f"tracker state lacks layers: {sorted(missing)[:5]}")
        for name, st in self.states.items():
            saved = state["layers"][name]
            device = self.layers[name].weight.device
            for key in _LayerState.__slots__:
                value = saved[key]
                setattr(st, key, value.to(device) if isinstance(value, torch.Tensor) else value)
