"""Batch augmentation on tensors: shapes, determinism, identity when off, exact flips, rigid
rotations, shifts, colour jitter, and N views of one image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from verify.training.augment import BatchAugment, augment_views, batch_to_tensor, to_float


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=_gen(1))


def test_to_float_range_and_layout():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    np.testing.assert_allclose(to_float(x).flatten().numpy(), [-1.0, 1.0, 51 / 127.5 - 1], atol=1e-6)
    with pytest.raises(TypeError):
        to_float(x.float())
    hwc = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    chw = batch_to_tensor(hwc)
    assert chw.shape == (2, 3, 4, 5) and chw[1, 2, 3, 4] == hwc[1, 3, 4, 2]


def test_shapes_range_and_determinism(batch):
    aug = BatchAugment(hflip=True, rotation=20, zoom=0.2, shift=0.1, brightness=0.2, contrast=0.2)
    a = aug(batch, _gen(7))
    assert a.shape == batch.shape and a.dtype == torch.float32
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6
    torch.testing.assert_close(aug(batch, _gen(7)), a, rtol=0, atol=0)
    assert not torch.allclose(aug(batch, _gen(8)), a)
    assert not torch.allclose(a, to_float(batch))
    f = aug(to_float(batch), _gen(7))  # float input (already normalised) gives the same result
    torch.testing.assert_close(f, a, atol=1e-5, rtol=0)


def test_identity_when_off(batch):
    off = BatchAugment(hflip=False, rotation=0, zoom=0, shift=0, brightness=0, contrast=0)
    assert not off.active
    torch.testing.assert_close(off(batch, _gen(0)), to_float(batch), rtol=0, atol=0)
    x = to_float(batch)
    assert torch.equal(off(x), x)


def test_flip_only_is_exact(batch):
    aug = BatchAugment(hflip=True, rotation=0, zoom=0, shift=0)
    p = aug.sample(len(batch), _gen(3))
    assert 0 < int(p.flip.sum()) < len(batch)  # the seed gives both cases
    out = aug(batch, params=p)
    x = to_float(batch)
    for i in range(len(batch)):
        want = x[i].flip(-1) if p.flip[i] else x[i]
        assert torch.equal(out[i], want)


def test_flip_through_grid_sample_matches(batch):
    # a tiny rotation forces the resampling path; it must flip the same way
    aug = BatchAugment(hflip=True, rotation=1e-6, zoom=0, shift=0)
    p = aug.sample(len(batch), _gen(3))
    out = aug(batch, params=p)
    want = torch.where(p.flip.view(-1, 1, 1, 1), to_float(batch).flip(-1), to_float(batch))
    torch.testing.assert_close(out, want, atol=1e-4, rtol=0)


def test_rotation_90_on_a_square_is_rot90():
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=_gen(2))
    aug = BatchAugment(hflip=False, rotation=90, zoom=0, shift=0)
    p = aug.sample(1, _gen(0))
    p.angle[:] = math.pi / 2
    out = aug(x, params=p)
    rotated = [torch.rot90(to_float(x), k, (2, 3)) for k in (1, 3)]
    assert any(torch.allclose(out, r, atol=1e-4) for r in rotated)


def test_rotation_is_rigid_on_non_square_images():
    aug = BatchAugment(hflip=False, rotation=30, zoom=0, shift=0)
    p = aug.sample(1, _gen(0))
    p.angle[:] = math.radians(30)
    h, w = 20, 60
    grid = F.affine_grid(aug.theta(p, h, w), [1, 3, h, w], align_corners=False)[0]  # (H,W,2) normalised
    px = torch.stack([grid[..., 0] * w / 2, grid[..., 1] * h / 2], -1)  # back to pixels
    # neighbouring output pixels one step apart sample input points one pixel apart, in both axes
    dx = (px[:, 1:] - px[:, :-1]).norm(dim=-1)
    dy = (px[1:] - px[:-1]).norm(dim=-1)
    torch.testing.assert_close(dx, torch.ones_like(dx), atol=1e-4, rtol=0)
    torch.testing.assert_close(dy, torch.ones_like(dy), atol=1e-4, rtol=0)
    v1, v2 = px[0, 1] - px[0, 0], px[1, 0] - px[0, 0]
    assert abs(float(v1 @ v2)) < 1e-4  # still perpendicular


def test_shift_and_zoom_move_content_by_the_right_amount():
    x = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)
    x[..., 10] = 255  # one bright column at x = 10
    aug = BatchAugment(hflip=False, rotation=0, zoom=0.5, shift=0.5)
    p = aug.sample(1, _gen(0))
    p.scale[:], p.shift[:] = 1.0, torch.tensor([[0.25, 0.0]])
    col = int(aug(x, params=p)[0, 0].mean(0).argmax())
    assert abs(col - 10) == 10  # a quarter of 40 px
    p.shift[:], p.scale[:] = 0.0, 0.5
    col = int(aug(x, params=p)[0, 0].mean(0).argmax())
    assert col in (14, 15)  # 10 px left of the centre (19.5) halves to 5 px left


def test_brightness_and_contrast():
    x = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    x[:, :, :2] = 200
    aug = BatchAugment(hflip=False, rotation=0, zoom=0, shift=0, brightness=0.5, contrast=0.5)
    p = aug.sample(2, _gen(0))
    p.brightness[:] = torch.tensor([1.2, 1.0])
    p.contrast[:] = torch.tensor([1.0, 0.0])
    u = (aug(x, params=p) + 1) / 2 * 255
    torch.testing.assert_close(u[0], (x[0].float() * 1.2).clamp(max=255), atol=1e-3, rtol=0)
    torch.testing.assert_close(u[1], torch.full_like(u[1], 150.0), atol=1e-3, rtol=0)  # contrast 0: the mean


def test_from_config():
    aug = BatchAugment.from_config({"hflip": False, "rotation": 10.0, "zoom": 0.1, "shift": 0.05, "color": 0.1})
    assert (aug.hflip, aug.rotation, aug.zoom, aug.shift, aug.brightness, aug.contrast) == (
        False, 10.0, 0.1, 0.05, 0.1, 0.1)  # fmt: skip
    with pytest.raises(ValueError, match="rotation"):
        BatchAugment(rotation=-1)


def test_augment_views():
    img = np.random.default_rng(0).integers(0, 256, (30, 24, 3), dtype=np.uint8)
    views = augment_views(img, 6, _gen(5), rotation=15, zoom=0.1, shift=0.05)
    assert views.shape == (6, 30, 24, 3) and views.dtype == np.uint8
    assert np.array_equal(views[0], img)
    assert all(not np.array_equal(v, img) for v in views[1:])
    np.testing.assert_array_equal(augment_views(img, 6, _gen(5), rotation=15, zoom=0.1, shift=0.05), views)
    plain = augment_views(img, 3, _gen(5), include_original=False, hflip=False, rotation=0, zoom=0, shift=0)
    assert all(np.array_equal(v, img) for v in plain)  # uint8 -> float -> uint8 round trip is exact
    with pytest.raises(ValueError, match="uint8"):
        augment_views(img.astype(np.float32), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_draw_on_gpu(batch):
    aug = BatchAugment(hflip=True, rotation=20, zoom=0.2, shift=0.1, brightness=0.2, contrast=0.2)
    cpu = aug(batch, _gen(4))
    gpu = aug(batch.cuda(), _gen(4)).cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0)
