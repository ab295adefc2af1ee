"""The decoded-image cache: build, reuse without decoding, unreadable files, atomic writes, keys,
and the crop geometry of decode_crop."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import verify.training.cache as cache_mod
from verify.training.cache import ImageCache, decode_crop
from verify.model.geometry import CELEBA_FRAME, CropGeometry

GEOM = CropGeometry(size=48)


@pytest.fixture(scope="module")
def real_paths(celeba_root) -> list[str]:
    d = celeba_root / "img_align_celeba"
    return [str(d / n) for n in sorted(os.listdir(d))[:40]]


def _counting(monkeypatch) -> list[int]:
    """Count the images decoded in this process (workers=0 keeps decoding here)."""
    calls: list[int] = []
    real = cache_mod._decode_chunk

    def counted(task):
        calls.append(len(task[1]))
        return real(task)

    monkeypatch.setattr(cache_mod, "_decode_chunk", counted)
    return calls


def test_build_then_reuse_without_decoding(tmp_path, real_paths, monkeypatch):
    calls = _counting(monkeypatch)
    c = ImageCache.build_or_load(real_paths, GEOM, tmp_path, "real", workers=0, progress=False)
    assert sum(calls) == len(real_paths)
    assert c.images.shape == (40, 48, 48, 3) and c.images.dtype == np.uint8 and c.ok.all()
    for i in (0, 17, 39):
        np.testing.assert_array_equal(c.images[i], decode_crop(real_paths[i], GEOM))
    mtime = c.path.stat().st_mtime_ns
    again = ImageCache.build_or_load(real_paths, GEOM, tmp_path, "real", workers=0, progress=False)
    assert sum(calls) == len(real_paths), "the second call decoded images"
    assert again.path == c.path and again.path.stat().st_mtime_ns == mtime
    assert isinstance(again.images, np.memmap) and not again.images.flags.writeable
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(c.images))
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".lock", ".u8"]  # no temp file left


def test_worker_pool_builds_the_same(tmp_path, real_paths):
    one = ImageCache.build_or_load(real_paths, GEOM, tmp_path / "a", "real", workers=0, progress=False)
    many = real_paths * 2  # > one chunk, so the pool really splits the work
    two = ImageCache.build_or_load(many, GEOM, tmp_path / "b", "real", workers=2, progress=False)
    np.testing.assert_array_equal(np.asarray(two.images[:40]), np.asarray(one.images))
    np.testing.assert_array_equal(np.asarray(two.images[40:]), np.asarray(one.images))


def test_unreadable_images_are_skipped(tmp_path, real_paths, caplog):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    truncated = bad_dir / "truncated.jpg"
    truncated.write_bytes(Path(real_paths[0]).read_bytes()[:600])
    text = bad_dir / "text.jpg"
    text.write_text("not an image")
    gone = str(bad_dir / "vanished.jpg")
    paths = [real_paths[0], str(truncated), real_paths[1], str(text), gone]
    with caplog.at_level(logging.WARNING, logger="verify.training.cache"):
        c = ImageCache.build_or_load(paths, GEOM, tmp_path / "cache", "bad", workers=0, progress=False)
    assert c.ok.tolist() == [True, False, True, False, False]
    assert not c.images[1].any() and not c.images[3].any()
    np.testing.assert_array_equal(c.images[2], decode_crop(real_paths[1], GEOM))
    logged = caplog.text
    assert str(truncated) in logged and str(text) in logged and gone in logged
    # the unreadable flags survive a reload
    again = ImageCache.build_or_load(paths, GEOM, tmp_path / "cache", "bad", workers=0, progress=False)
    assert again.ok.tolist() == c.ok.tolist()


def test_failed_build_leaves_no_partial_file(tmp_path, real_paths, monkeypatch):
    real = cache_mod._decode_chunk
    monkeypatch.setattr(cache_mod, "_CHUNK", 8)

    def failing(task):
        if task[0] >= 16:
            raise RuntimeError("disk on fire")
        return real(task)

    monkeypatch.setattr(cache_mod, "_decode_chunk", failing)
    cache_dir = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk on fire"):
        ImageCache.build_or_load(real_paths, GEOM, cache_dir, "real", workers=0, progress=False)
    assert [p.suffix for p in cache_dir.iterdir()] == [".lock"]
    monkeypatch.setattr(cache_mod, "_decode_chunk", real)
    c = ImageCache.build_or_load(real_paths, GEOM, cache_dir, "real", workers=0, progress=False)
    assert c.ok.all() and c.images[39].any()


def test_key_follows_files_geometry_and_order(tmp_path, real_paths, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for p in real_paths[:6]:
        dst = src / Path(p).name
        dst.write_bytes(Path(p).read_bytes())
        paths.append(str(dst))
    cache_dir = tmp_path / "cache"
    first = ImageCache.build_or_load(paths, GEOM, cache_dir, "set", workers=0, progress=False)
    other_geom = ImageCache.build_or_load(paths, CropGeometry(size=32), cache_dir, "set", workers=0, progress=False)
    assert other_geom.path != first.path and other_geom.images.shape[1] == 32 and first.path.exists()

    # the same files in another order: same file name, rows follow the new order
    reordered = paths[::-1]
    rev = ImageCache.build_or_load(reordered, GEOM, cache_dir, "set", workers=0, progress=False)
    assert rev.path == first.path
    np.testing.assert_array_equal(rev.images[0], decode_crop(paths[-1], GEOM))

    # a changed file (new mtime) gives a new key; the stale cache of that name+geometry is removed
    os.utime(paths[2], ns=(1_000_000_000, 1_000_000_000))
    calls = _counting(monkeypatch)
    changed = ImageCache.build_or_load(paths, GEOM, cache_dir, "set", workers=0, progress=False)
    assert sum(calls) == len(paths) and changed.path != first.path
    assert not first.path.exists() and other_geom.path.exists()


def test_bad_arguments(tmp_path, real_paths):
    with pytest.raises(ValueError, match="no images"):
        ImageCache.build_or_load([], GEOM, tmp_path, "x")
    with pytest.raises(ValueError, match="plain file name"):
        ImageCache.build_or_load(real_paths[:1], GEOM, tmp_path, "../x")


# ---------------------------------------------------------------------------------------------------
# crop geometry: decode a ramp image whose red/green values are the pixel's x/y


def _ramp(width: int, height: int, path: Path) -> None:
    x = np.broadcast_to(np.arange(width, dtype=np.float64)[None, :], (height, width))
    y = np.broadcast_to(np.arange(height, dtype=np.float64)[:, None], (height, width))
    # the values are the coordinate in the 178x218 frame, so full and half size read alike
    img = np.stack([x * CELEBA_FRAME[0] / width, y * CELEBA_FRAME[1] / height / 1.0, np.zeros_like(x)], -1)
    Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8)).save(path)


@pytest.mark.parametrize("frame", [CELEBA_FRAME, (89, 109)])
def test_decode_crop_takes_the_geometry_box(tmp_path, frame):
    geom = CropGeometry(size=64, box=(25.0, 59.0, 153.0, 187.0))
    p = tmp_path / "ramp.png"
    _ramp(*frame, p)
    out = decode_crop(p, geom).astype(np.float64)  # (64, 64, 3)
    x0, y0, x1, y1 = geom.box
    centres = (np.arange(geom.size) + 0.5) / geom.size  # output pixel centres as a fraction of the box
    step_x, step_y = CELEBA_FRAME[0] / frame[0], CELEBA_FRAME[1] / frame[1]  # frame px per image px
    # an input pixel at continuous position u (in image px) holds value (u - 0.5) * step
    want_x = x0 + centres * (x1 - x0) - 0.5 * step_x
    want_y = y0 + centres * (y1 - y0) - 0.5 * step_y
    inner = slice(4, -4)  # the resampling kernel reaches past the box edge; compare the inside
    np.testing.assert_allclose(out[inner, inner, 0].mean(0), want_x[inner], atol=1.0)
    np.testing.assert_allclose(out[inner, inner, 1].mean(1), want_y[inner], atol=1.0)
    assert out.shape == (64, 64, 3)


def test_decode_crop_converts_grey_to_rgb(tmp_path):
    p = tmp_path / "grey.pgm"
    Image.fromarray(np.full((112, 92), 77, dtype=np.uint8)).save(p)
    out = decode_crop(p, GEOM)
    assert out.shape == (48, 48, 3) and (out == 77).all()
