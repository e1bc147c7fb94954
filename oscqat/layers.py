"""Quantized layers: the float class plus a small mixin, swapped in through a registry.

A quantized layer fake-quantizes its weight (and, optionally, its input) in forward and keeps
the integer weight of that forward pass (``last_weight_int``) so the oscillation tracker and
the dampening loss reuse it instead of quantizing the weights again.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from oscqat.quantizer import SCALE_EPS, LSQQuantizer, frozen_index

QUANT_REGISTRY: dict[type[nn.Module], type[nn.Module]] = {}


def register_quantized(float_cls: type[nn.Module]) -> Callable[[type], type]:
    """Class decorator: ``@register_quantized(nn.Conv2d) class QuantConv2d(...)``."""

    def wrap(quant_cls: type) -> type:
        QUANT_REGISTRY[float_cls] = quant_cls
        return quant_cls

    return wrap


class QuantMixin:
    """Weight + input fake quantization and per-weight freezing state for conv/linear layers."""

    weight: nn.Parameter

    def _init_quant(self, weight_bits: int, act_bits: int | None, per_channel: bool, init: str = "mse") -> None:
        out_channels = self.weight.shape[0]
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.weight_quantizer = LSQQuantizer(
            weight_bits, signed=True, per_channel=per_channel, num_channels=out_channels, init=init
        )
        self.input_quantizer = (
            LSQQuantizer(act_bits, signed=None, per_channel=False, init=init, batch_axis=0)
            if act_bits is not None else None
        )
        # Frozen weights (iterative freezing): mask and the integer each one is pinned to.
        self.register_buffer("frozen_mask", torch.zeros_like(self.weight, dtype=torch.bool))
        self.register_buffer("frozen_int", torch.zeros_like(self.weight, dtype=torch.int8))
        # Sparse view of the two above (flat indices, float integers) for the eager forward, which
        # then touches only the frozen elements. Not saved: a cache, rebuilt from the dense buffers
        # when stale (``frozen_sparse``). A compiled forward reads the dense buffers instead.
        self.register_buffer("frozen_idx", None, persistent=False)
        self.register_buffer("frozen_vals", None, persistent=False)
        self._sparse_stale = False
        # counts edits of the frozen set made through this layer (freeze_weights, refresh_frozen, a
        # load): an OscillationTracker compares it to the count it last saw to find weights frozen
        # by hand, which it then pins too (pinning the latent values is the tracker's job)
        self._frozen_version = 0
        self._any_frozen = False
        self.fuse_dampening = False  # compute the dampening sum inside the quantizer's pass
        self.last_weight_int: torch.Tensor | None = None  # integer weight of the latest forward
        # set by an OscillationTracker: this layer's slice (shaped like the weight) of the flat
        # integer buffer the tracker reads; a compiled forward writes its integers there in place
        # and hands over the slice itself (so a compiled step's last_weight_int is overwritten by
        # the next compiled forward: clone it to keep it). None while no tracker watches this layer.
        self._int_sink: torch.Tensor | None = None
        self._scale_sink: torch.Tensor | None = None  # the same for the clamped weight scale
        self.last_damp: torch.Tensor | None = None  # dampening sum of the latest forward (fused)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_frozen()

    def refresh_frozen(self) -> None:
        """Rebuild the sparse frozen index; call after editing ``frozen_mask``/``frozen_int`` by hand.

        A tracker watching the layer notices the edit at its next ``step`` and from then on pins
        the newly frozen weights at the latent values they have at that step."""
        self.frozen_idx, self.frozen_vals = frozen_index(self.frozen_mask, self.frozen_int)
        self._any_frozen = self.frozen_idx is not None
        self._sparse_stale = False
        self._frozen_version += 1

    def frozen_sparse(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(frozen_idx, frozen_vals)``, rebuilt first when freezing marked the dense buffers only
        (read them through this: the buffers themselves may be stale)."""
        if self._sparse_stale:
            buffers = self._buffers
            buffers["frozen_idx"], buffers["frozen_vals"] = frozen_index(buffers["frozen_mask"], buffers["frozen_int"])
            self.__dict__["_sparse_stale"] = False
        return self._buffers["frozen_idx"], self._buffers["frozen_vals"]

    def _append_sparse(self, flat_idx: torch.Tensor, vals: torch.Tensor) -> None:
        """Add newly frozen weights (the dense buffers already marked) to a fresh sparse index;
        a stale one stays stale (``frozen_sparse`` rebuilds it). ``vals``: float32 integers.

        What an eager step's freezing uses: its next forward reads the sparse index, and a
        rebuild of every touched layer at every step would cost a ``nonzero`` over each one's
        mask. The two buffers are views into tensors with spare room, grown by doubling, so an
        append writes only the new entries."""
        if self._sparse_stale:
            return
        buffers = self._buffers
        idx, old_vals = buffers["frozen_idx"], buffers["frozen_vals"]
        n, k = (0 if idx is None else idx.numel()), flat_idx.numel()
        room = self.__dict__.get("_sparse_room")  # (idx room, vals room, the views handed out last)
        # a buffer replaced since (a rebuild, a load, model.to) or no room left: new room
        if room is None or room[2][0] is not idx or room[2][1] is not old_vals or room[0].numel() < n + k:
            cap = max(2 * (n + k), 64)
            full = (torch.empty(cap, dtype=torch.int64, device=flat_idx.device),
                    torch.empty(cap, dtype=torch.float32, device=flat_idx.device))
            if n:
                full[0][:n].copy_(idx)
                full[1][:n].copy_(old_vals)
            room = (*full, None)
        room[0][n:n + k].copy_(flat_idx)
        room[1][n:n + k].copy_(vals)
        views = room[0][:n + k], room[1][:n + k]
        buffers["frozen_idx"], buffers["frozen_vals"] = views
        self.__dict__["_sparse_room"] = (room[0], room[1], views)

    def freeze_weights(self, flat_idx: torch.Tensor, ints: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Pin the weights at ``flat_idx`` to the integers ``ints`` (from the next forward on).
        ``check`` skips weights already frozen. Returns the indices that were newly frozen.

        Their latent values are pinned by the ``OscillationTracker`` watching the layer (if any),
        from its next ``step`` on."""
        buffers = self._buffers
        if check:
            fresh = ~buffers["frozen_mask"].view(-1)[flat_idx]
            flat_idx, ints = flat_idx[fresh], ints[fresh]
        if not flat_idx.numel():
            return flat_idx
        buffers["frozen_mask"].view(-1).index_fill_(0, flat_idx, True)
        buffers["frozen_int"].view(-1).index_copy_(0, flat_idx, ints.detach().to(torch.int8))
        self.__dict__["_any_frozen"] = True
        self.__dict__["_sparse_stale"] = True
        self.__dict__["_frozen_version"] += 1
        return flat_idx

    @property
    def is_depthwise(self) -> bool:
        groups = getattr(self, "groups", 1)
        return groups > 1 and groups == getattr(self, "in_channels", -1)

    @property
    def is_pointwise(self) -> bool:
        return isinstance(self, nn.Conv2d) and self.groups == 1 and tuple(self.kernel_size) == (1, 1)

    def _quantize_weight(self, remember: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        want_damp = remember and self.fuse_dampening and self.training and torch.is_grad_enabled()
        if torch.compiler.is_compiling():  # dense: the graph stays the same as more weights freeze
            frozen = self.frozen_mask, self.frozen_int
        else:  # sparse: eager touches only the frozen elements
            frozen = self.frozen_sparse()
        w_hat, w_int, damp = self.weight_quantizer.quantize_with_dampening(self.weight, *frozen, want_damp=want_damp)
        if remember:  # the forward's integers, read by the tracker and the dampening loss
            sink = self._int_sink
            if (sink is not None and self.training and torch.is_grad_enabled() and sink.device == w_int.device
                    and torch.compiler.is_compiling()):
                # a compiled training step: the quantizer's own kernel writes the integers into the
                # tracker's buffer (in its integer type, a quarter of float32's bytes at int8) and
                # the clamped scale next to them; no graph outputs, nothing for the tracker to gather.
                # The integers are read back from w_hat (round(w_hat / s) == w_int exactly): a write
                # into a graph input lands at the graph's end, and Inductor fuses only nearby nodes
                # that merely share inputs, so copying w_int would cost a second pass over the
                # weights; reading w_hat makes it a consumer, fused into the pass that writes w_hat.
                q = self.weight_quantizer
                s = q._broadcast_scale(self.weight).detach().clamp_min(SCALE_EPS)
                sink.copy_(torch.round(w_hat.detach() / s))
                w_int = sink
                self._scale_sink.copy_(q.scale.detach().clamp_min(SCALE_EPS))
            self.last_weight_int = w_int
            self.last_damp = damp if want_damp else None
        return w_hat, w_int

    def weight_int(self) -> torch.Tensor:
        """The integer weight used in forward (frozen values applied), without gradient."""
        with torch.no_grad():
            return self._quantize_weight(remember=False)[1]

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight ``s * x_int`` used in forward (frozen values applied)."""
        with torch.no_grad():
            return self._quantize_weight(remember=False)[0]

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x) if self.input_quantizer is not None else x


@register_quantized(nn.Conv2d)
class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` (depthwise/grouped included) with LSQ weight and input quantization."""

    def __init__(self, *args, weight_bits: int, act_bits: int | None = None, per_channel: bool = False,
                 scale_init: str = "mse", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, act_bits, per_channel, scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat, _ = self._quantize_weight()
        x = self._quantize_input(x)
        return self._conv_forward(x, w_hat.to(x.dtype), self.bias)


@register_quantized(nn.Linear)
class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with LSQ weight and input quantization."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight_bits: int,
                 act_bits: int | None = None, per_channel: bool = False, scale_init: str = "mse", **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self._init_quant(weight_bits, act_bits, per_channel, scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat, _ = self._quantize_weight()
        x = self._quantize_input(x)
        return F.linear(x, w_hat.to(x.dtype), self.bias)


def from_float(module: nn.Module, weight_bits: int, act_bits: int | None, per_channel: bool = False,
               scale_init: str = "mse") -> nn.Module:
    """Build the registered quantized twin of ``module``, sharing its parameters."""
    quant_cls = QUANT_REGISTRY[type(module)]
    new = quant_cls.__new__(quant_cls)
    new.__dict__ = module.__dict__.copy()
    new._parameters = module._parameters.copy()
    new._buffers = module._buffers.copy()
    new._modules = module._modules.copy()
    new._init_quant(weight_bits, act_bits, per_channel, scale_init)
    return new


def quant_layers(module: nn.Module):
    """Yield ``(name, layer)`` for every quantized layer in ``module``."""
    for name, sub in module.named_modules():
        if isinstance(sub, QuantMixin):
            yield name, sub
