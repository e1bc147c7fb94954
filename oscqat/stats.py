"""Small statistics used wherever results are summarised: sample std, paired differences, ties.

Every "±" the product prints is the *sample* standard deviation (n-1): with the few seeds a
campaign affords, the population std understates the spread (by 18% at n = 3). Methods that share
seeds are compared by their per-seed differences, whose spread is usually far smaller than either
method's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

TIE_TOL = 1e-9


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float | None  # sample std (n-1); None for a single value
    n: int

    def text(self, scale: float = 1.0, digits: int = 2) -> str:
        if self.std is None:
            return f"{self.mean * scale:.{digits}f} (n=1)"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f} (n={self.n})"


def mean_std(values: Sequence[float]) -> MeanStd:
    """Mean and sample standard deviation (n-1) of ``values`` (at least one)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return MeanStd(mean, None, 1)
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return MeanStd(mean, math.sqrt(var), n)


def t_quantile(p: float, dof: int) -> float:
    """Student-t quantile (scipy, a scikit-learn dependency)."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


@dataclass(frozen=True)
class PairedDiff:
    mean: float
    std: float | None
    n: int
    ci95: tuple[float, float] | None  # t interval of the mean difference; None for n < 2


def paired_diff(a: dict, b: dict) -> PairedDiff:
    """``a - b`` over the keys (seeds) both have: mean, sample std and 95% t interval."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("paired_diff: the two results share no seed")
    diffs = [float(a[k]) - float(b[k]) for k in keys]
    ms = mean_std(diffs)
    if ms.std is None:
        return PairedDiff(ms.mean, None, 1, None)
    half = t_quantile(0.975, ms.n - 1) * ms.std / math.sqrt(ms.n)
    return PairedDiff(ms.mean, ms.std, ms.n, (ms.mean - half, ms.mean + half))


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free interval for the median: the order statistics ``x_(j)`` and
    ``x_(n+1-j)`` with the largest ``j`` whose coverage ``1 - 2 P(Bin(n, 1/2) < j)`` is at least
    ``level``. No assumption on the distribution (benchmark timings have heavy tails); None when
    there are too few values for any such ``j`` (n < 6 at 95%)."""
    from scipy.stats import binom

    x = sorted(float(v) for v in values)
    n = len(x)
    alpha = (1.0 - level) / 2.0
    j = 0
    while j < n // 2 and binom.cdf(j, n, 0.5) <= alpha:  # P(B <= j) = P(B < j + 1)
        j += 1
    return None if j == 0 else (x[j - 1], x[n - j])


def is_tie(a: float | None, b: float | None, tol: float = TIE_TOL) -> bool:
    return a is not None and b is not None and abs(a - b) <= tol
