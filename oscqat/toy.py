"""The toy regression of the paper (section 2.2; METHOD.md section 6).

One latent weight ``w`` is trained with the straight-through estimator to minimise
``E_x[0.5 * (x * w_star - x * q(w))^2]``, ``x ~ N(0, 1)``. The grid is fixed (scale ``s`` is not
learned). When ``w_star`` lies between two grid points the latent weight never settles: it
oscillates around the rounding threshold between them, and the time average of ``q(w)``
approaches ``w_star`` (the weight spends a fraction ``(w_star - w_down) / s`` of the time in the
upper state). Dampening pulls the latent weight to its bin centre and stops the oscillation;
freezing pins it to the integer the weight held most of the time.

Everything runs through the library itself: a 1x1 ``QuantLinear`` (``LSQQuantizer`` /
``lsq_fake_quant``), ``dampening_loss``, ``OscillationTracker`` (frequency EMA, freezing) and the
cosine schedules of ``oscqat.schedules``, so the toy shows what the real training code does.

    >>> res = run_toy(w_star=0.234, method="lsq", steps=2000)
    >>> res.flips(start=1000) > 100, round(res.time_average_q(start=1000), 2)
    (True, 0.23)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from oscqat.dampening import dampening_loss
from oscqat.layers import QuantLinear
from oscqat.oscillation import OscillationTracker
from oscqat.schedules import dampen_lambda_at, freeze_threshold_at

TOY_METHODS = ("lsq", "dampen", "freeze", "dampen+freeze")


@dataclass
class ToyResult:
    """Per-step trajectories of one toy run (index ``t`` = the state step ``t`` computed its gradient at).

    ``latent``: latent weight; ``q``: quantized weight ``s * x_int`` used in that forward pass
    (frozen value applied); ``w_int``: its integer; ``freq``: oscillation-frequency EMA after the
    step; ``frozen``: whether the weight is frozen after the step; ``dampen_lambda`` and
    ``freeze_threshold``: the schedule values used; ``loss``: the task loss.
    """

    w_star: float
    scale: float
    bits: int
    method: str
    latent: np.ndarray
    q: np.ndarray
    w_int: np.ndarray
    freq: np.ndarray
    frozen: np.ndarray
    dampen_lambda: np.ndarray
    freeze_threshold: np.ndarray
    loss: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.latent)

    @property
    def grid_down(self) -> float:
        """The grid point at or below ``w_star``."""
        return float(np.floor(self.w_star / self.scale) * self.scale)

    @property
    def grid_up(self) -> float:
        """The grid point above ``grid_down``."""
        return self.grid_down + self.scale

    @property
    def threshold(self) -> float:
        """The rounding threshold between ``grid_down`` and ``grid_up``."""
        return self.grid_down + self.scale / 2

    @property
    def expected_up_fraction(self) -> float:
        """Fraction of time in the upper state that makes the average of ``q`` equal ``w_star``."""
        return (self.w_star - self.grid_down) / self.scale

    def flips(self, start: int = 0) -> int:
        """How often the integer weight changed from step ``start`` on."""
        return int(np.count_nonzero(np.diff(self.w_int[start:])))

    def time_average_q(self, start: int = 0) -> float:
        return float(self.q[start:].mean())

    def up_fraction(self, start: int = 0) -> float:
        """Fraction of steps from ``start`` on whose quantized weight is above ``threshold``."""
        return float((self.q[start:] > self.threshold).mean())


def run_toy(
    w_star: float = 0.234,
    method: str = "lsq",
    steps: int = 2000,
    lr: float = 0.05,
    scale: float = 0.1,
    seed: int = 0,
    *,
    bits: int = 4,
    batch_size: int = 64,
    w_init: float | None = None,
    momentum: float = 0.0,
    dampen_lambda: float = 1.0,
    dampen_start: float = 0.25,
    freeze_threshold_start: float = 0.1,
    freeze_threshold_end: float = 0.01,
    freeze_start: float = 0.25,
    osc_momentum: float = 0.01,
) -> ToyResult:
    """Train the single latent weight for ``steps`` SGD steps and return its trajectories.

    Args:
        w_star: the target weight (put it between two grid points to see oscillations).
        method: ``"lsq"`` (plain STE), ``"dampen"``, ``"freeze"`` or ``"dampen+freeze"``.
        steps, lr, momentum: plain SGD on the latent weight.
        scale, bits: the fixed signed grid ``scale * [-2^(b-1), 2^(b-1)-1]``.
        seed, batch_size: the ``x ~ N(0, 1)`` samples of each step.
        w_init: initial latent weight (default ``w_star``).
        dampen_lambda, dampen_start: dampening weight, cosine-ramped in from ``dampen_start``
            (fraction of ``steps``), as in training. The latent weight settles at
            ``c + (w_star - c) / (2 lambda)`` for its bin centre ``c``, so once
            ``lambda > |w_star - c| / s`` it can no longer reach the threshold.
        freeze_threshold_start/_end, freeze_start, osc_momentum: the freezing threshold schedule
            and the EMA momentum of the oscillation tracker.
    """
    if method not in TOY_METHODS:
        raise ValueError(f"method must be one of {TOY_METHODS}, got {method!r}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    dampens, freezes = "dampen" in method, "freeze" in method
    gen = torch.Generator().manual_seed(seed)

    layer = QuantLinear(1, 1, bias=False, weight_bits=bits)
    quantizer = layer.weight_quantizer
    quantizer.scale.requires_grad_(False)  # the toy's grid is fixed
    with torch.no_grad():
        layer.weight.fill_(w_star if w_init is None else w_init)
        quantizer.scale.fill_(scale)
        quantizer.initialized.fill_(True)
    tracker = OscillationTracker(layer, momentum=osc_momentum, max_bits=8)
    state = tracker.states[""]
    opt = torch.optim.SGD([layer.weight], lr=lr, momentum=momentum)

    rec = {k: np.zeros(steps) for k in ("latent", "q", "w_int", "freq", "lam", "f_th", "loss")}
    frozen = np.zeros(steps, dtype=bool)
    for t in range(steps):
        progress = t / steps
        lam = dampen_lambda_at(progress, dampen_lambda, dampen_start) if dampens else 0.0
        f_th = (freeze_threshold_at(progress, freeze_threshold_start, freeze_threshold_end, freeze_start)
                if freezes else 0.0)
        rec["latent"][t] = float(layer.weight.detach())
        x = torch.randn(batch_size, 1, generator=gen)
        out = layer(x)
        loss = 0.5 * (x * w_star - out).pow(2).mean()
        total = loss + lam * dampening_loss(layer) if lam > 0.0 else loss
        x_int = float(layer.last_weight_int)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        tracker.step(freeze_threshold=f_th)
        rec["w_int"][t] = x_int
        rec["q"][t] = x_int * scale
        rec["freq"][t] = float(state.freq)
        rec["lam"][t], rec["f_th"][t] = lam, f_th
        rec["loss"][t] = float(loss.detach())
        frozen[t] = bool(layer.frozen_mask)
    return ToyResult(
        w_star=w_star, scale=scale, bits=bits, method=method, latent=rec["latent"], q=rec["q"],
        w_int=rec["w_int"], freq=rec["freq"], frozen=frozen, dampen_lambda=rec["lam"],
        freeze_threshold=rec["f_th"], loss=rec["loss"],
    )
