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

from oscqat.quantizer import LSQQuantizer, frozen_index

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
        # Sparse view of the two above (flat indices, float integers): forward and backward
        # touch only the frozen elements. Not saved; rebuilt by ``refresh_frozen``.
        self.register_buffer("frozen_idx", None, persistent=False)
        self.register_buffer("frozen_vals", None, persistent=False)
        # Latent weight values at ``frozen_idx``, restored after each optimizer step so frozen
        # weights receive no update (momentum, weight decay). Taken when a weight freezes.
        self.register_buffer("frozen_latent", None, persistent=False)
        self._any_frozen = False
        self.fuse_dampening = False  # compute the dampening sum inside the quantizer's pass
        self.last_weight_int: torch.Tensor | None = None  # integer weight of the latest forward
        # set by an OscillationTracker: the integer type its buffers use (a compiled forward's
        # last_weight_int comes out in it); None while no tracker watches this layer
        self.tracked_int_dtype: torch.dtype | None = None
        self.last_damp: torch.Tensor | None = None  # dampening sum of the latest forward (fused)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_frozen()

    def refresh_frozen(self) -> None:
        """Rebuild the sparse frozen index (call after editing ``frozen_mask``/``frozen_int``).

        The latent values to pin are the current weights at the frozen positions (after a
        checkpoint load, the values saved with the model).
        """
        self.frozen_idx, self.frozen_vals = frozen_index(self.frozen_mask, self.frozen_int)
        self._any_frozen = self.frozen_idx is not None
        self.frozen_latent = (self.weight.detach().reshape(-1)[self.frozen_idx].clone()
                              if self._any_frozen else None)

    def restore_frozen_latent(self) -> None:
        """Put the frozen weights' latent values back (undoes an optimizer step's drift).

        Writes through ``detach()`` (no autograd involved), so it needs no ``no_grad`` context:
        the tracker calls it for every frozen layer at every step."""
        if self._any_frozen:
            buffers = self._buffers
            # scatter_: about 3x faster than index_copy_ on a CPU (unique indices: the same result)
            self._parameters["weight"].detach().view(-1).scatter_(0, buffers["frozen_idx"], buffers["frozen_latent"])

    def freeze_weights(self, flat_idx: torch.Tensor, ints: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Pin the weights at ``flat_idx`` to the integers ``ints``, updating the sparse index
        in place of a full ``refresh_frozen`` pass. ``check`` skips weights already frozen.
        Returns the indices that were newly frozen."""
        buffers = self._buffers  # direct access: Module.__getattr__/__setattr__ cost more than the ops here
        if check:
            fresh = ~buffers["frozen_mask"].view(-1)[flat_idx]
            flat_idx, ints = flat_idx[fresh], ints[fresh]
        if not flat_idx.numel():
            return flat_idx
        ints = ints.detach().to(torch.float32)
        # index_* methods: a few microseconds less per call than tensor indexing, on a hot path
        buffers["frozen_mask"].view(-1).index_fill_(0, flat_idx, True)
        buffers["frozen_int"].view(-1).index_copy_(0, flat_idx, ints.to(torch.int8))
        self._append_frozen(flat_idx, ints)
        return flat_idx

    def _append_frozen(self, flat_idx: torch.Tensor, ints: torch.Tensor) -> None:
        """Add weights (not yet frozen; the dense mask and integers already marked) to the
        sparse index, pinning each to its current latent value. ``ints``: float32 integers.

        The three sparse buffers are views into tensors with spare room, grown by doubling: an
        append writes only the new entries (a concatenation would copy every frozen entry again
        at each of the thousands of steps that freeze a few more). Touches buffers and the weight
        through ``detach()`` only: no ``no_grad`` needed."""
        buffers = self._buffers
        k = flat_idx.numel()
        idx, vals, latent = buffers["frozen_idx"], buffers["frozen_vals"], buffers["frozen_latent"]
        n = 0 if idx is None else idx.numel()
        room = self.__dict__.get("_frozen_room")  # (idx, vals, latent, the views handed out last)
        # a buffer replaced since (a load, model.to, an assignment) or no room left: new room
        if room is None or room[3][0] is not idx or room[3][1] is not vals or room[3][2] is not latent \
                or room[0].numel() < n + k:
            cap = max(2 * (n + k), 64)
            weight = self._parameters["weight"]
            full = (torch.empty(cap, dtype=torch.int64, device=flat_idx.device),
                    torch.empty(cap, dtype=torch.float32, device=flat_idx.device),
                    torch.empty(cap, dtype=weight.dtype, device=weight.device))
            if n:
                for f, old in zip(full, (idx, vals, latent)):
                    f[:n].copy_(old)
            room = (*full, None)
        idx_room, vals_room, latent_room = room[0], room[1], room[2]
        idx_room[n:n + k].copy_(flat_idx)
        vals_room[n:n + k].copy_(ints)
        torch.index_select(self._parameters["weight"].detach().reshape(-1), 0, flat_idx, out=latent_room[n:n + k])
        views = idx_room[:n + k], vals_room[:n + k], latent_room[:n + k]
        buffers["frozen_idx"], buffers["frozen_vals"], buffers["frozen_latent"] = views
        self.__dict__["_frozen_room"] = (idx_room, vals_room, latent_room, views)
        self.__dict__["_any_frozen"] = True

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
            frozen = self.frozen_idx, self.frozen_vals
        w_hat, w_int, damp = self.weight_quantizer.quantize_with_dampening(self.weight, *frozen, want_damp=want_damp)
        if remember:  # the forward's integers, read by the tracker and the dampening loss
            if self.tracked_int_dtype is not None and torch.compiler.is_compiling():
                # a graph output in the tracker's type: a quarter of float32's writes at int8,
                # and the tracker gathers them with one concatenation, no cast
                w_int = w_int.to(self.tracked_int_dtype)
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
