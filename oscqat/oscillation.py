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
    """One layer's slice of the tracker's flat state, as views shaped like the weight."""

    __slots__ = ("_tracker", "_slice", "_shape", "frozen_latent", "_latent_vals", "_latent_idx")

    def __init__(self, tracker: "OscillationTracker", sl: slice, shape: torch.Size):
        self._tracker, self._slice, self._shape = tracker, sl, shape
        self.frozen_latent: torch.Tensor | None = None  # latent values at freeze time (dense)
        self._latent_vals: torch.Tensor | None = None  # frozen_latent at the layer's frozen_idx
        self._latent_idx: torch.Tensor | None = None  # the frozen_idx those values belong to

    def _view(self, flat: torch.Tensor | None) -> torch.Tensor | None:
        return None if flat is None else flat[self._slice].view(self._shape)

    @property
    def freq(self) -> torch.Tensor:
        return self._view(self._tracker._freq)

    @property
    def last_dir(self) -> torch.Tensor:
        return self._view(self._tracker._last_dir)

    @property
    def prev_int(self) -> torch.Tensor | None:
        return self._view(self._tracker._prev)

    @property
    def int_ema(self) -> torch.Tensor | None:
        return self._view(self._tracker._int_ema)

    def latent_values(self, layer: QuantMixin) -> torch.Tensor:
        """``frozen_latent`` at the layer's current frozen indices (cached per index tensor)."""
        if self._latent_idx is not layer.frozen_idx:
            self._latent_vals = self.frozen_latent.reshape(-1)[layer.frozen_idx]
            self._latent_idx = layer.frozen_idx
        return self._latent_vals


STATE_KEYS = ("prev_int", "last_dir", "freq", "int_ema", "frozen_latent")


def layer_kind(layer: QuantMixin) -> str:
    """'depthwise', 'pointwise' (1x1 conv) or 'other' (full conv, linear)."""
    if layer.is_depthwise:
        return "depthwise"
    if layer.is_pointwise:
        return "pointwise"
    return "other"


class OscillationTracker:
    """Per-weight oscillation frequency EMA, integer EMA and freezing for low-bit layers.

    The state of all tracked layers lives in flat buffers (``states[name]`` gives per-layer
    views), so a step costs a handful of element passes over all weights at once, not a
    dozen small ops per layer. A frozen weight's frequency is set to 0 when it freezes (its
    integer no longer changes, so it cannot oscillate); this keeps the freeze check a single
    ``max`` over the flat frequencies.

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
        self.states: dict[str, _LayerState] = {}
        offset = 0
        for name, layer in self.layers.items():
            numel = layer.weight.numel()
            self.states[name] = _LayerState(self, slice(offset, offset + numel), layer.weight.shape)
            offset += numel
        self.numel = offset
        device = next(iter(self.layers.values())).weight.device if self.layers else torch.device("cpu")
        self._freq = torch.zeros(offset, device=device)
        self._last_dir = torch.zeros(offset, device=device)  # sign of the last integer change
        self._prev: torch.Tensor | None = None  # integers of the previous step
        self._int_ema: torch.Tensor | None = None
        self.steps = 0

    def _gather_ints(self) -> tuple[torch.Tensor | None, list[str]]:
        """All layers' latest forward integers as one flat tensor, and the layers that had none."""
        parts, missing = [], []
        for name, layer in self.layers.items():
            x_int = layer.last_weight_int
            if x_int is None:
                missing.append(name)
                if self._prev is None:
                    x_int = layer.weight_int()
                else:
                    x_int = self._prev[self.states[name]._slice]
            parts.append(x_int.reshape(-1))
        if len(missing) == len(self.layers):
            return None, missing
        flat = torch.cat(parts)
        if flat.device != self._freq.device:  # the model moved after the tracker was built
            self._freq, self._last_dir = self._freq.to(flat.device), self._last_dir.to(flat.device)
            if self._prev is not None:
                self._prev, self._int_ema = self._prev.to(flat.device), self._int_ema.to(flat.device)
        return flat, missing

    @torch.no_grad()
    def step(self, freeze_threshold: float = 0.0) -> None:
        """Update every tracked layer from its latest forward; freeze where ``f > freeze_threshold``.

        ``freeze_threshold=0`` disables freezing. A layer without a forward since the last step
        is left as it is. Also pins the latent value of frozen weights, undoing any weight-decay
        or momentum drift from the optimizer step just taken.
        """
        x, missing = self._gather_ints() if self.layers else (None, [])
        if x is not None:
            self._update(x, missing)
        if freeze_threshold > 0.0 and self.layers and float(self._freq.max()) > freeze_threshold:
            for name, layer in self.layers.items():
                self._freeze(layer, self.states[name], freeze_threshold)
        for name, layer in self.layers.items():
            if layer._any_frozen:
                st = self.states[name]
                if st.frozen_latent is not None:
                    layer.weight.data.view(-1).index_copy_(0, layer.frozen_idx, st.latent_values(layer))
            layer.last_weight_int = None  # consumed: a forward must run before the next update
        self.steps += 1

    def _update(self, x: torch.Tensor, missing: list[str]) -> None:
        if self._prev is None:
            self._prev, self._int_ema = x, x.clone()
            return
        kept = {name: (self.states[name].freq.clone(), self.states[name].last_dir.clone(),
                       self.states[name].int_ema.clone()) for name in missing}
        m = self.momentum
        direction = torch.sub(x, self._prev).sign_()
        oscillated = torch.mul(direction, self._last_dir).lt_(0)  # 1.0 where the direction flipped
        self._freq.lerp_(oscillated, m)
        torch.where(direction != 0, direction, self._last_dir, out=self._last_dir)
        self._int_ema.lerp_(x, m)
        self._prev = x
        for name, (freq, last_dir, int_ema) in kept.items():
            st = self.states[name]
            st.freq.copy_(freq)
            st.last_dir.copy_(last_dir)
            st.int_ema.copy_(int_ema)

    def _freeze(self, layer: QuantMixin, st: _LayerState, threshold: float) -> None:
        freq = st.freq
        new = (freq > threshold) & ~layer.frozen_mask
        if not bool(new.any()):
            return
        n, p = layer.weight_quantizer.bounds
        target = torch.round(st.int_ema).clamp_(n, p)
        layer.frozen_int.copy_(torch.where(new, target.to(torch.int8), layer.frozen_int))
        layer.frozen_mask |= new
        # Frozen: the integer is pinned from the next forward on, so it never moves again. Start
        # its history from the pinned value, so the jump to it is not counted as an oscillation.
        freq.masked_fill_(new, 0.0)
        st.last_dir.masked_fill_(new, 0.0)
        if st.prev_int is not None:
            st.prev_int.copy_(torch.where(new, target, st.prev_int))
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
            out["layers"][name] = {
                key: (None if (value := getattr(st, key)) is None else value.clone()) for key in STATE_KEYS
            }
        return out

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        missing = set(self.states) - set(state["layers"])
        if missing:
            raise KeyError(f"tracker state lacks layers: {sorted(missing)[:5]}")
        saved = {name: state["layers"][name] for name in self.states}
        has_prev = [entry.get("prev_int") is not None for entry in saved.values()]
        if any(has_prev):
            self._prev = torch.cat([layer.weight_int().reshape(-1) for layer in self.layers.values()])
            self._int_ema = self._prev.clone()
        else:
            self._prev = self._int_ema = None
        for name, st in self.states.items():
            entry, layer = saved[name], self.layers[name]
            device = layer.weight.device
            st.freq.copy_(entry["freq"])
            st.last_dir.copy_(entry["last_dir"])  # older checkpoints stored int8 directions
            for key in ("prev_int", "int_ema"):
                if entry.get(key) is not None:
                    getattr(st, key).copy_(entry[key])
            latent = entry.get("frozen_latent")
            st.frozen_latent = latent.to(device) if latent is not None else None
            st._latent_idx = st._latent_vals = None
