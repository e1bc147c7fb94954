"""Cosine schedules for the dampening weight and the freezing threshold (METHOD.md 3-4).

Named ``*_at(progress)`` so they read apart from the config fields (``dampen_lambda``: the final
weight) and the per-epoch metrics they feed.
"""

from __future__ import annotations

import math


def _ramp(progress: float, start: float) -> float | None:
    """Fraction through the scheduled part of training, or None before ``start``."""
    if progress < start:
        return None
    return min(1.0, (progress - start) / max(1.0 - start, 1e-12))


def dampen_lambda_at(progress: float, lambda_end: float, start: float = 0.25) -> float:
    """0 until ``start``, then ``lambda_end * (1 - cos(pi r)) / 2`` with r from 0 to 1."""
    r = _ramp(progress, start)
    return 0.0 if r is None else lambda_end * (1.0 - math.cos(math.pi * r)) / 2.0


def freeze_threshold_at(progress: float, th_start: float, th_end: float, start: float = 0.25) -> float:
    """0 (no freezing) until ``start``, then cosine from ``th_start`` down to ``th_end``."""
    r = _ramp(progress, start)
    if r is None:
        return 0.0
    return th_end + (th_start - th_end) * (1.0 + math.cos(math.pi * r)) / 2.0


def cosine_lr_factor(epoch: int, epochs: int) -> float:
    """Per-epoch cosine decay factor from 1 towards 0 (the release's LR schedule)."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
