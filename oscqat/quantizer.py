"""LSQ fake quantizer with the straight-through estimator (Esser et al. 2020; METHOD.md section 1).

The pass-through decision is made on ``x / s`` inside ``[n, p]``, not by differentiating
``clamp`` (whose gradient at the bound is 0 or 0.5), so a weight that rounds onto the grid
edge keeps its gradient.

Scales stay positive in forward: the pass divides by ``max(s, SCALE_EPS)``, the clamp the
reference release uses. We clamp rather than learn ``log s`` because a log parameterisation
turns Adam's fixed-size steps on ``s`` into fixed *relative* steps, which would change the
meaning of every published quantizer learning rate (the release's 1e-5 is for ``s`` itself)
and the checkpoints' ``scale`` entries. The clamp is straight-through for the gradient (the
LSQ gradient at the clamped value reaches ``s`` unchanged), so it never silences a scale.
A scale that an optimizer step takes to ``<= SCALE_EPS`` has collapsed: ``collapsed_scales``
finds it and the trainer ends the run (``QuantizerCollapseError``) instead of training on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCALE_EPS = 1e-8  # forward never divides by a smaller scale; a learned scale at or below it has collapsed


def grid_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid ``[n, p]``: signed ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _zero_frozen(resid: torch.Tensor, frozen_idx: torch.Tensor | None) -> torch.Tensor:
    """``resid`` with the frozen elements set to 0 (dense bool mask or flat indices, in place for those)."""
    if frozen_idx is None:
        return resid
    if frozen_idx.dtype == torch.bool:
        return resid.masked_fill(frozen_idx, 0.0)
    resid.view(-1).index_fill_(0, frozen_idx, 0.0)
    return resid


class _LSQFunction(torch.autograd.Function):
    """Fake quantization returning ``(x_hat, x_int, damp, v)``; x_int and ``v = x / s`` (the
    unrounded grid position, kept for the scale-flip attribution) carry no gradient.

    ``frozen_idx``/``frozen_vals`` (optional; flat indices and their float integers) pin some
    elements: those get no gradient to ``x`` and contribute ``x_int`` to the scale gradient.
    A bool ``frozen_idx`` shaped like ``x`` is the dense form (``frozen_vals`` then the dense
    integers): what a compiled graph uses, since its shape stays fixed as more weights freeze
    (the sparse index grows, and a graph holding it would be recompiled at every freeze).
    With ``want_damp`` the same pass also returns the dampening sum ``sum((clip(w) - s*x_int)^2)``
    over non-frozen elements (scale detached) and adds its gradient ``2*(w - s*x_int)`` in
    backward, so dampening costs two element passes instead of its own autograd graph.

    The input is clamped to the grid in grid units before rounding (the same integers as
    rounding first, since the bounds are integers); the clamped value gives the STE mask in one
    comparison, saved for backward, and the dampening residual ``clip(v) - x_int``, which is
    0 outside the grid by construction.
    """

    @staticmethod
    def forward(ctx, x, scale, n, p, grad_scale, frozen_idx, frozen_vals, want_damp):
        in_graph = torch.compiler.is_compiling()
        scale = scale.clamp_min(SCALE_EPS)  # straight-through in backward: grad_s goes to the raw scale
        v = x / scale
        v_clip = v.clamp(n, p)
        inside = v_clip == v  # the straight-through mask: n <= v <= p
        x_int = torch.round(v_clip)
        dense = frozen_idx is not None and frozen_idx.dtype == torch.bool
        if dense:
            x_int = torch.where(frozen_idx, frozen_vals.to(x_int.dtype), x_int)
            inside = inside & ~frozen_idx
        elif frozen_idx is not None:
            x_int.view(-1).index_copy_(0, frozen_idx, frozen_vals)
            inside.view(-1).index_fill_(0, frozen_idx, False)
        x_hat = x_int * scale
        resid = None
        if want_damp:
            # clip(w) - s*x_int = s*(clip(v) - x_int): 0 outside the grid, masked where frozen.
            # In a graph the sum reads the integers back from x_hat (round(x_hat / s) == x_int
            # exactly): it then depends on x_hat's buffer, and Inductor fuses it into x_hat's pass
            # instead of making a second pass over the weights (see QuantMixin._quantize_weight).
            resid = _zero_frozen(v_clip.sub_(torch.round(x_hat / scale) if in_graph else x_int), frozen_idx)
            s = scale.detach()
            if s.numel() == 1:
                flat = resid.reshape(-1)
                damp = torch.dot(flat, flat) * (s * s).reshape(())
            else:
                dims = [d for d in range(v.dim()) if s.shape[d] == 1]
                damp = (resid * resid).sum(dim=dims).reshape(-1).dot((s * s).reshape(-1))
        else:
            damp = x.new_zeros(())
            ctx.mark_non_differentiable(damp)
        # In a graph the backward rebuilds the residual from v and x_int, which the partitioner
        # recomputes from the weights: a residual saved from the forward would be recomputed
        # from x_hat, one more read of every weight-sized tensor.
        rebuild = resid is not None and in_graph
        ctx.save_for_backward(v, x_int, scale, inside, None if rebuild else resid, frozen_idx if rebuild else None)
        ctx.rebuild_resid = rebuild
        ctx.n, ctx.p, ctx.grad_scale = n, p, grad_scale
        ctx.in_graph = in_graph  # inside a graph, activations may be laid out channels-last: see the scale gradient
        ctx.mark_non_differentiable(x_int, v)
        return x_hat, x_int, damp, v

    @staticmethod
    def backward(ctx, grad_out, _grad_int, grad_damp, _grad_v):
        v, x_int, scale, inside, resid, frozen_idx = ctx.saved_tensors
        grad_x = grad_out * inside  # also needed for the scale gradient below
        grad_s = None
        if ctx.needs_input_grad[1]:
            # d x_hat/ds = x_int - v inside, x_int (n or p) when clipped, x_int when frozen:
            # sum(g * ds) = sum(g * x_int) - sum(g_inside * v).
            if (scale.dim() == 0 or scale.numel() == 1) and ctx.in_graph:
                # one reduction in memory order: a dot over reshape(-1) walks a channels-last
                # tensor in logical order, which Inductor emits as a scalar loop with an integer
                # division per element (20 ms of a 32 px MobileNetV2 backward on 2 cores)
                grad_s = (grad_out * x_int - grad_x * v).sum().reshape(scale.shape)
            elif scale.dim() == 0 or scale.numel() == 1:
                g_flat, gx_flat = grad_out.reshape(-1), grad_x.reshape(-1)
                grad_s = torch.dot(g_flat, x_int.reshape(-1)) - torch.dot(gx_flat, v.reshape(-1))
                grad_s = grad_s.reshape(scale.shape)
            else:
                reduce_dims = [d for d in range(v.dim()) if scale.shape[d] == 1]
                grad_s = (grad_out * x_int - grad_x * v).sum(dim=reduce_dims, keepdim=True)
            grad_s = grad_s * ctx.grad_scale
        if ctx.rebuild_resid and grad_damp is not None:  # the forward's residual, bit for bit
            resid = _zero_frozen(v.clamp(ctx.n, ctx.p).sub_(x_int), frozen_idx)
        if resid is not None and grad_damp is not None:
            # d/dw sum((w - s*x_int)^2) = 2*s*(v - x_int) on inside, non-frozen elements
            grad_x.addcmul_(resid, scale.detach() * (2.0 * grad_damp))
        if not ctx.needs_input_grad[0]:
            grad_x = None
        return grad_x, grad_s, None, None, None, None, None, None


def frozen_index(frozen: torch.Tensor | None, frozen_int: torch.Tensor | None):
    """Dense mask + integers -> ``(flat indices, float values)``, or ``(None, None)`` when none."""
    if frozen is None:
        return None, None
    idx = frozen.reshape(-1).nonzero().squeeze(1)
    if idx.numel() == 0:
        return None, None
    return idx, frozen_int.reshape(-1)[idx].to(torch.float32)


def lsq_fake_quant(x, scale, n, p, grad_scale=1.0, frozen=None, frozen_int=None):
    """Functional LSQ: returns ``(x_hat, x_int)``. ``scale`` broadcasts against ``x``.

    ``frozen`` (bool mask) / ``frozen_int`` pin elements to stored integers.
    """
    idx, vals = frozen_index(frozen, frozen_int)
    x_hat, x_int, _, _ = _LSQFunction.apply(x, scale, n, p, grad_scale, idx, vals, False)
    return x_hat, x_int


class LSQQuantizer(nn.Module):
    """Learned-step-size quantizer (a plain module: the scale is its one parameter).

    Args:
        bits: 2..8.
        signed: signed grid; ``None`` decides at calibration (unsigned when the calibration
            tensor has no negative values, e.g. after ReLU).
        per_channel: one scale per slice along ``channel_axis`` (weights: output channels).
        grad_scale: apply LSQ's ``1/sqrt(N * p)`` gradient scale to the scale.
        init: ``"mse"`` (grid search over 100 clipping ratios) or ``"minmax"``.
        batch_axis: for activations, the batch dimension: LSQ's ``N`` in the gradient scale is
            then the number of features per sample, so the scale's step size does not depend on
            the batch size.

    The scale is calibrated at the first forward unless it was set with ``set_scale`` (assigning
    ``scale.data`` by hand is overwritten by that calibration). With ``record_forward`` (set by
    the oscillation tracker on weight quantizers) each gradient-enabled forward keeps
    ``last_v = x / s`` and ``last_scale`` (references and one tiny copy, no extra pass), so the
    tracker can tell integer changes caused by the scale from those caused by the weight.
    """

    def __init__(
        self,
        bits: int,
        *,
        signed: bool | None = True,
        per_channel: bool = False,
        num_channels: int = 1,
        channel_axis: int = 0,
        grad_scale: bool = True,
        init: str = "mse",
        batch_axis: int | None = None,
    ):
        super().__init__()
        if init not in ("mse", "minmax"):
            raise ValueError(f"init must be 'mse' or 'minmax', got {init!r}")
        grid_bounds(bits, True)  # validates bits
        self.bits = bits
        self.per_channel = per_channel
        self.channel_axis = channel_axis
        self.use_grad_scale = grad_scale
        self.init_method = init
        self.batch_axis = batch_axis
        self.scale = nn.Parameter(torch.ones(num_channels if per_channel else ()))
        self.register_buffer("initialized", torch.tensor(False))
        # -1: decide at calibration, 0: unsigned, 1: signed
        self.register_buffer("signed_flag", torch.tensor(-1 if signed is None else int(signed), dtype=torch.int8))
        self._ready = False  # python-side mirror of `initialized` (avoids a device sync per step)
        self.record_forward = False
        self.last_v: torch.Tensor | None = None  # x / s of the latest recorded forward
        self.last_scale: torch.Tensor | None = None  # the (clamped) scale that forward used

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False

    # grid ---------------------------------------------------------------
    @property
    def signed(self) -> bool:
        return int(self.signed_flag) != 0

    @property
    def bounds(self) -> tuple[int, int]:
        return grid_bounds(self.bits, self.signed)

    def extra_repr(self) -> str:
        sign = {-1: "auto", 0: "unsigned", 1: "signed"}[int(self.signed_flag)]
        return f"bits={self.bits}, {sign}, per_channel={self.per_channel}, init={self.init_method}"

    def _broadcast_scale(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale
        if self.per_channel:
            shape = [1] * x.dim()
            shape[self.channel_axis] = -1
            scale = scale.reshape(shape)
        return scale

    # calibration ------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set the scale from a calibration tensor (min-max or MSE over clipping ratios)."""
        x = x.detach().float()
        if int(self.signed_flag) == -1:
            self.signed_flag.fill_(0 if bool((x >= 0).all()) else 1)
        n, p = self.bounds
        if self.per_channel:
            flat = x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1)
        else:
            flat = x.reshape(1, -1)
            if flat.shape[1] > 1_000_000:  # a strided subsample is plenty for a scalar scale
                flat = flat[:, :: flat.shape[1] // 1_000_000 + 1]
        absmax = flat.abs().amax(dim=1).clamp_min(1e-8)
        best = absmax / p
        if self.init_method == "mse":
            best_err = torch.full_like(absmax, float("inf"))
            for ratio in torch.linspace(0.01, 1.0, 100).tolist():
                s = (absmax * ratio / p).clamp_min(1e-8)
                q = torch.round(flat / s[:, None]).clamp_(n, p) * s[:, None]
                err = (q - flat).pow_(2).mean(dim=1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, s, best)
        self.scale.data.copy_(best.reshape(self.scale.shape))
        self.initialized.fill_(True)

    @torch.no_grad()
    def set_scale(self, scale, *, signed: bool | None = None) -> None:
        """Set the scale by hand and mark the quantizer initialized, so the first forward keeps it
        instead of calibrating over it. ``scale``: a number or a tensor shaped like ``self.scale``;
        every value must be finite and > ``SCALE_EPS``. ``signed`` is required when the
        quantizer was built with ``signed=None`` and has not decided its sign yet."""
        value = torch.as_tensor(scale, dtype=self.scale.dtype, device=self.scale.device)
        if value.numel() == 1 and self.scale.numel() > 1:
            value = value.reshape(()).expand(self.scale.shape)
        if value.shape != self.scale.shape and value.numel() == self.scale.numel():
            value = value.reshape(self.scale.shape)
        if value.shape != self.scale.shape:
            raise ValueError(f"scale must have shape {tuple(self.scale.shape)}, got {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()) or bool((value <= SCALE_EPS).any()):
            raise ValueError(f"scale must be finite and > {SCALE_EPS:g}, got min {float(value.min()):g}")
        if signed is not None:
            self.signed_flag.fill_(int(signed))
        elif int(self.signed_flag) == -1:
            raise ValueError("this quantizer decides its sign at calibration (signed=None): pass signed=True/False")
        self.scale.copy_(value)
        self.initialized.fill_(True)
        self._ready = False

    # forward ------------------------------------------------------------------
    def quantize(self, x, frozen_idx=None, frozen_vals=None):
        """Return ``(x_hat, x_int)``; calibrates on the first call.

        ``frozen_idx``/``frozen_vals``: flat indices of pinned elements and their integers
        (float32), see ``frozen_index``; or the dense mask and integers (see ``_LSQFunction``).
        """
        return self.quantize_with_dampening(x, frozen_idx, frozen_vals, want_damp=False)[:2]

    def quantize_with_dampening(self, x, frozen_idx=None, frozen_vals=None, want_damp=True):
        """``quantize`` plus the dampening sum of the same pass (a zero when not ``want_damp``)."""
        if not self._ready:
            if not bool(self.initialized):
                self.calibrate(x)
            self._ready = True
            self._bounds = self.bounds
        n, p = self._bounds
        grad_scale = 1.0
        if self.use_grad_scale:
            per_scale = x.numel() // max(self.scale.numel(), 1)
            if self.batch_axis is not None and x.dim() > 0:
                per_scale //= max(x.shape[self.batch_axis], 1)
            grad_scale = 1.0 / math.sqrt(max(per_scale * p, 1))
        scale = self._broadcast_scale(x)
        if x.dtype != torch.float32:
            x = x.float()
        if frozen_idx is not None and frozen_idx.dtype != torch.bool and not x.is_contiguous():
            x = x.contiguous()  # frozen indices address the flat, contiguous layout
        x_hat, x_int, damp, v = _LSQFunction.apply(x, scale, n, p, grad_scale, frozen_idx, frozen_vals, want_damp)
        # not in a compiled graph: v would become one more output (a pass over every weight); a
        # compiled step's tracker attributes flips from the live weights (OscillationTracker.observe)
        if self.record_forward and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.last_v, self.last_scale = v, scale.detach().clamp_min(SCALE_EPS)
        return x_hat, x_int, damp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(x)[0]


def collapsed_scales(named_quantizers: list[tuple[str, "LSQQuantizer"]]) -> list[tuple[str, float]]:
    """``(name, smallest scale)`` of every quantizer whose scale is ``<= SCALE_EPS``.

    One concatenation and one reduction over all scales (a single device sync); the names are
    looked up only when something collapsed. A NaN scale is not a collapse but a diverged run:
    its next forward gives a NaN loss, which ``NonFiniteLossError`` reports.
    """
    if not named_quantizers:
        return []
    flat = torch.cat([q.scale.detach().reshape(-1) for _, q in named_quantizers])
    if bool(flat.min() > SCALE_EPS):  # NaN compares False: falls through to the detailed check
        return []
    out = []
    for name, q in named_quantizers:
        low = float(q.scale.detach().nan_to_num(nan=float("inf")).min())
        if low <= SCALE_EPS:
            out.append((name, low))
    return out
