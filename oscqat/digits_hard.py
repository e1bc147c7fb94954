"""``digits_hard``: scikit-learn's bundled 8x8 digits made hard enough to tell QAT methods apart.

Plain digits saturates (FP ~98%, every method within seed noise). Here each of the 1,797 real
digits is rendered ``VARIANTS`` times at 16x16 (default) under seeded random distortions: an
affine map (rotation, anisotropic scale, shear, translation) and a smooth elastic warp sampled
straight from the 8x8 source (one ``grid_sample``), then a contrast change, a background with a
random brightness gradient, a faint distractor (a shifted fragment of another digit) and
Gaussian pixel noise. Nothing is downloaded.

Splits are made over *source* digits, never over renderings, so no test image is a distortion of
a training digit: the test sources are fixed (``oscqat.data.DIGITS_TEST_SEED``), train/selection
sources of the rest follow the run's seed. The renderings use a constant seed too, so the whole
set is identical in every process; it is built once per process and size and cached (~0.3 s).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

DEFAULT_SIZE = 16
VARIANTS = 3  # renderings per source digit (train, selection and test alike)
RENDER_SEED = 14_014


def _rand(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def render(src: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Distorted ``size`` x ``size`` renderings of ``src`` (N, 1, 8, 8) in [0, 1]; deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    n = src.shape[0]
    rot = _rand(gen, n, -0.6, 0.6)  # radians, about +-34 degrees
    shear = _rand(gen, n, -0.35, 0.35)
    zoom_x, zoom_y = _rand(gen, n, 0.8, 1.25), _rand(gen, n, 0.8, 1.25)  # >1: the digit looks smaller
    tx, ty = _rand(gen, n, -0.25, 0.25), _rand(gen, n, -0.25, 0.25)
    cos, sin = torch.cos(rot), torch.sin(rot)
    # output (normalised) coordinates -> source coordinates: rotation @ shear @ zoom, then shift
    a11, a12 = cos * zoom_x, (cos * shear - sin) * zoom_y
    a21, a22 = sin * zoom_x, (sin * shear + cos) * zoom_y
    theta = torch.stack([torch.stack([a11, a12, tx], 1), torch.stack([a21, a22, ty], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    coarse = 0.12 * torch.randn(n, 2, 4, 4, generator=gen)  # smooth elastic warp
    grid = grid + F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    img = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # distractor: a fragment of another digit, shifted towards a border, at low contrast
    other = src[torch.randint(0, n, (n,), generator=gen)]
    shift = torch.stack([torch.stack([torch.full((n,), 1.3), torch.zeros(n), _rand(gen, n, -1, 1).sign() * 0.9], 1),
                         torch.stack([torch.zeros(n), torch.full((n,), 1.3), _rand(gen, n, -0.6, 0.6)], 1)], 1)
    frag = F.grid_sample(other, F.affine_grid(shift, (n, 1, size, size), align_corners=False),
                         mode="bilinear", padding_mode="zeros", align_corners=False)
    img = img + _rand(gen, n, 0.0, 0.35).view(n, 1, 1, 1) * frag

    contrast = _rand(gen, n, 0.5, 1.0).view(n, 1, 1, 1)
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = _rand(gen, n, 0, 2 * math.pi).view(n, 1, 1, 1)
    ramp = torch.cos(angle) * xx + torch.sin(angle) * yy
    background = _rand(gen, n, 0.0, 0.4).view(n, 1, 1, 1) + _rand(gen, n, 0.0, 0.3).view(n, 1, 1, 1) * ramp
    noise = _rand(gen, n, 0.03, 0.2).view(n, 1, 1, 1) * torch.randn(n, 1, size, size, generator=gen)
    return (background + contrast * img.clamp(0, 1.5) + noise).float()


@lru_cache(maxsize=4)
def rendered_digits(size: int = DEFAULT_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All renderings (1797 * VARIANTS, 1, size, size) and labels, ordered variant-major: image
    ``v * 1797 + i`` is rendering ``v`` of source digit ``i``. Cached per process."""
    from oscqat.data import load_digits_tensors

    src, y = load_digits_tensors(None, 1)
    x = torch.cat([render(src, size, RENDER_SEED + v) for v in range(VARIANTS)])
    return x, y.repeat(VARIANTS)


def _expand(source_idx: torch.Tensor, n_sources: int) -> torch.Tensor:
    """Indices of every rendering of the given source digits."""
    return torch.cat([source_idx + v * n_sources for v in range(VARIANTS)])


def digits_hard_splits(image_size: int | None, in_chans: int, selection_fraction: float, seed: int):
    """(x_train, y_train, x_sel, y_sel, x_test, y_test), split over source digits (see module doc)."""
    from oscqat.data import three_way_split

    x, y = rendered_digits(image_size or DEFAULT_SIZE)
    n_src = len(x) // VARIANTS
    parts = []
    for idx in three_way_split(n_src, selection_fraction, seed):
        full = _expand(idx, n_src)
        xi = x[full]
        if in_chans != 1:
            xi = xi.expand(-1, in_chans, -1, -1).contiguous()
        parts += [xi, y[full]]
    return tuple(parts)
