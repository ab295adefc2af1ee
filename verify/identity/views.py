"""Augmented views of one photo region for enrollment, in numpy (no torch): the product path enrolls
without the training stack.

The same transform as `verify.training.augment.BatchAugment` (random horizontal flip, rotation, zoom and shift
as one affine map per view; bilinear resampling with border padding, i.e. `F.grid_sample(...,
padding_mode="border", align_corners=False)`), drawn from a numpy Generator. Given the same
parameters the two agree to rounding (tests/test_view_augment.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ViewParams:
    """One view's draw: flip (bool), angle (radians), scale (> 1 magnifies), shift (x, y) as a
    fraction of the width / height."""

    flip: bool
    angle: float
    scale: float
    shift: tuple[float, float]


def sample_view_params(n: int, rng: np.random.Generator, *, hflip: bool = True, rotation: float = 20.0,
                       zoom: float = 0.2, shift: float = 0.1) -> list[ViewParams]:
    """`n` random draws: flip with probability 1/2 (when `hflip`), rotation U(+-rotation) degrees,
    scale 1 + U(+-zoom), shift U(+-shift) of each side."""
    for name, v, hi in (("rotation", rotation, 180.0), ("zoom", zoom, 0.99), ("shift", shift, 1.0)):
        if not 0.0 <= v <= hi:
            raise ValueError(f"augment {name} must be in [0, {hi}], got {v}")
    flips = rng.random(n) < 0.5
    angles = (rng.random(n) * 2 - 1) * math.radians(rotation)
    scales = 1 + (rng.random(n) * 2 - 1) * zoom
    shifts = (rng.random((n, 2)) * 2 - 1) * shift
    return [ViewParams(bool(flips[i] and hflip), float(angles[i]), float(scales[i]), (float(shifts[i, 0]), float(shifts[i, 1])))
            for i in range(n)]


def warp_view(image: np.ndarray, p: ViewParams) -> np.ndarray:
    """(H, W, 3) uint8 -> the same size, transformed by `p`: each output pixel samples the input at
    R(angle)/scale @ flip(out) + shift (in normalised coordinates, aspect-corrected), bilinear,
    coordinates clamped to the border."""
    h, w = image.shape[:2]
    cos, sin = math.cos(p.angle) / p.scale, math.sin(p.angle) / p.scale
    f = -1.0 if p.flip else 1.0
    # affine_grid's theta (output -> input, normalised [-1, 1] coordinates), as BatchAugment.theta
    t00, t01, t02 = cos * f, -sin * (h / w), p.shift[0] * 2
    t10, t11, t12 = sin * f * (w / h), cos, p.shift[1] * 2
    xn = (2 * np.arange(w, dtype=np.float64) + 1) / w - 1  # (W,) output pixel centres, align_corners=False
    yn = (2 * np.arange(h, dtype=np.float64) + 1) / h - 1  # (H,)
    gx = t00 * xn[None, :] + t01 * yn[:, None] + t02  # (H, W) input x, normalised
    gy = t10 * xn[None, :] + t11 * yn[:, None] + t12
    x = np.clip(((gx + 1) * w - 1) / 2, 0, w - 1)  # border padding: clamp to the edge pixels
    y = np.clip(((gy + 1) * h - 1) / 2, 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(np.intp), w - 2 if w > 1 else 0)
    y0 = np.minimum(np.floor(y).astype(np.intp), h - 2 if h > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]  # (H, W, 1)
    img = image.astype(np.float32)
    top = img[y0, x0] * (1 - wx) + img[y0, x1] * wx  # (H, W, 3)
    bottom = img[y1, x0] * (1 - wx) + img[y1, x1] * wx
    out = top * (1 - wy) + bottom * wy
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def augment_views(image: np.ndarray, n: int, rng: np.random.Generator, *, hflip: bool = True,
                  rotation: float = 20.0, zoom: float = 0.2, shift: float = 0.1) -> np.ndarray:
    """`n` augmented uint8 views (n, H, W, 3) of one uint8 image (H, W, 3)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"augment_views expects a uint8 (H, W, 3) image, got {arr.dtype} {arr.shape}")
    if n < 1:
        raise ValueError(f"augment_views needs n >= 1, got {n}")
    params = sample_view_params(n, rng, hflip=hflip, rotation=rotation, zoom=zoom, shift=shift)
    return np.stack([warp_view(arr, p) for p in params])
