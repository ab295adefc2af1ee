"""The numpy enrollment views (verify.identity.views) against the torch batch augmentation they port."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from verify.identity.views import ViewParams, augment_views, sample_view_params, warp_view


@pytest.fixture
def image(rng) -> np.ndarray:
    # smooth content plus noise: bilinear differences show on edges and gradients alike
    h, w = 73, 91
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 2.5, yy * 3.1, (xx + yy) * 1.4], axis=-1)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def test_warp_matches_torch_grid_sample(image):
    torch = pytest.importorskip("torch")
    from verify.training.augment import AugmentParams, BatchAugment

    params = [ViewParams(False, 0.0, 1.0, (0.0, 0.0)), ViewParams(True, 0.0, 1.0, (0.0, 0.0)),
              ViewParams(True, 0.3, 1.15, (0.08, -0.05)), ViewParams(False, -0.35, 0.82, (-0.1, 0.1))]
    aug = BatchAugment(hflip=True, rotation=20, zoom=0.2, shift=0.1)
    n = len(params)
    p = AugmentParams(flip=torch.tensor([q.flip for q in params]), angle=torch.tensor([q.angle for q in params]),
                      scale=torch.tensor([q.scale for q in params]), shift=torch.tensor([q.shift for q in params]),
                      brightness=torch.ones(n), contrast=torch.ones(n))
    u = torch.from_numpy(image).permute(2, 0, 1)[None].float().expand(n, -1, -1, -1)
    ref = aug.apply_unit(u, p, hi=255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, q in enumerate(params):
        diff = np.abs(warp_view(image, q).astype(int) - ref[i].astype(int))
        assert diff.max() <= 1, (i, diff.max())  # rounding of float32 vs float64 arithmetic
    assert (warp_view(image, params[0]) == image).all()  # the identity is exact
    assert (warp_view(image, params[1]) == image[:, ::-1]).all()  # so is a flip


def test_views_are_seeded_and_drawn_within_the_ranges(image):
    a = augment_views(image, 6, np.random.default_rng(3))
    b = augment_views(image, 6, np.random.default_rng(3))
    assert a.shape == (6, *image.shape) and a.dtype == np.uint8 and (a == b).all()
    assert not (a == augment_views(image, 6, np.random.default_rng(4))).all()
    draws = sample_view_params(2000, np.random.default_rng(0), rotation=20, zoom=0.2, shift=0.1)
    angles = np.degrees([d.angle for d in draws])
    assert np.abs(angles).max() <= 20 and np.abs(angles).max() > 19
    assert 0.8 <= min(d.scale for d in draws) and max(d.scale for d in draws) <= 1.2
    assert 0.45 < np.mean([d.flip for d in draws]) < 0.55
    assert not any(d.flip for d in sample_view_params(50, np.random.default_rng(0), hflip=False))
    with pytest.raises(ValueError, match="zoom"):
        sample_view_params(1, np.random.default_rng(0), zoom=1.5)


def test_no_torch_import():
    code = "import sys, numpy as np, verify.identity.views as v; v.augment_views(np.zeros((8, 8, 3), np.uint8), 2, np.random.default_rng(0)); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
