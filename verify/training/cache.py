"""Decode each image once into a uint8 cache file, memory-mapped by every later epoch and run.

The cache for a dataset and a crop geometry is one raw uint8 file of shape (N, S, S, 3) plus a small
JSON sidecar. Its name carries a hash of the geometry and of the sorted (path, size, mtime) list, so
any change to the images or the crop gives a new file, while the same images in another order map to
the same name (there is one file per dataset+geometry; rows are stored in the caller's order, which the
sidecar records, and a different order rebuilds it).

Resizing uses Pillow's LANCZOS filter on the crop box (`Image.resize(..., box=...)`, sub-pixel
accurate, antialiased when shrinking), the same in `decode_crop` and in the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from filelock import FileLock
from PIL import Image
from tqdm import tqdm

from verify.atomic import atomic_path, atomic_write_text
from verify.model.geometry import CropGeometry

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RESAMPLE = Image.Resampling.LANCZOS
_CHUNK = 64  # images per worker task: large enough to amortise IPC, small enough for a smooth bar
# fork starts workers in milliseconds (as torch's DataLoader does on Linux); spawn would re-import the
# caller's main module (often torch + torchvision, seconds per worker). Workers only run Pillow/numpy.
_START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def decode_crop(path: str | os.PathLike, geometry: CropGeometry) -> np.ndarray:
    """Load an image (any mode -> RGB), crop `geometry.box_for(w, h)` and resize to (S, S).

    Returns (S, S, 3) uint8. Raises OSError/ValueError for unreadable files.
    """
    with Image.open(path) as img:
        img = img.convert("RGB")  # also forces the full decode, so truncated files fail here
        box = geometry.box_for(*img.size)
        out = img.resize((geometry.size, geometry.size), RESAMPLE, box=box)
    return np.array(out, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)


def _decode_chunk(args: tuple[int, list[str], CropGeometry]) -> tuple[int, np.ndarray, list[tuple[int, str]]]:
    """Worker: decode a chunk; failures give a zero image and (index, reason), never an exception."""
    start, paths, geometry = args
    s = geometry.size
    out = np.zeros((len(paths), s, s, 3), dtype=np.uint8)
    failed: list[tuple[int, str]] = []
    for i, p in enumerate(paths):
        try:
            out[i] = decode_crop(p, geometry)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            failed.append((start + i, f"{type(e).__name__}: {e}"))
    return start, out, failed


def _geometry_key(geometry: CropGeometry) -> str:
    return hashlib.sha256(json.dumps(geometry.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


def _dataset_key(paths: Sequence[str], geometry: CropGeometry) -> tuple[str, str]:
    """(key of the sorted (path, size, mtime) list + geometry, digest of the caller's order)."""
    stats = []
    for p in paths:
        try:
            st = os.stat(p)
            stats.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((str(p), -1, -1))  # a vanished file is decoded as unreadable, consistently
    h = hashlib.sha256(json.dumps(geometry.to_dict(), sort_keys=True).encode())
    h.update(f"v{FORMAT_VERSION}".encode())
    for p, size, mtime in sorted(stats):
        h.update(f"{p}\0{size}\0{mtime}\n".encode())
    order = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()
    return h.hexdigest()[:20], order


@dataclass
class ImageCache:
    """`images`: (N, S, S, 3) uint8 memmap, row i is paths[i]; `ok`: (N,) bool, False where the file
    could not be read (that row is zeros)."""

    images: np.ndarray
    ok: np.ndarray
    geometry: CropGeometry
    path: Path

    def __len__(self) -> int:
        return len(self.ok)

    @classmethod
    def build_or_load(
        cls,
        paths: Sequence[str],
        geometry: CropGeometry,
        cache_dir: str | os.PathLike,
        name: str,
        workers: int | None = None,
        progress: bool = True,
    ) -> "ImageCache":
        """Load the cache for these images and geometry, building it first if needed.

        `workers`: decoding processes (default min(2, cpu count); 0 or 1 decodes in this process).
        """
        paths = [str(p) for p in paths]
        if not paths:
            raise ValueError(f"image cache {name!r}: no images given")
        if not name or any(c in name for c in "/\\\0"):
            raise ValueError(f"image cache name must be a plain file name, got {name!r}")
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        key, order = _dataset_key(paths, geometry)
        s = geometry.size
        data_path = cache_dir / f"{name}-{s}px-{_geometry_key(geometry)}-{key}.u8"
        meta_path = data_path.with_suffix(".json")
        with FileLock(str(data_path) + ".lock"):  # two runs on one dataset: one decodes, one waits
            cache = cls._try_load(data_path, meta_path, len(paths), geometry, order)
            if cache is None:
                cls._build(paths, geometry, data_path, meta_path, order, workers, progress, name)
                cache = cls._try_load(data_path, meta_path, len(paths), geometry, order)
                if cache is None:  # pragma: no cover - only if the disk lies
                    raise RuntimeError(f"image cache {data_path} was written but cannot be read back")
        return cache

    @classmethod
    def _try_load(
        cls, data_path: Path, meta_path: Path, n: int, geometry: CropGeometry, order: str
    ) -> "ImageCache | None":
        if not (data_path.is_file() and meta_path.is_file()):
            return None
        s = geometry.size
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            log.warning("image cache sidecar %s unreadable (%s): rebuilding", meta_path, e)
            return None
        expected_bytes = n * s * s * 3
        if (
            meta.get("version") != FORMAT_VERSION
            or meta.get("shape") != [n, s, s, 3]
            or meta.get("order") != order
            or data_path.stat().st_size != expected_bytes
        ):
            log.info("image cache %s does not match these images (order or size): rebuilding", data_path)
            return None
        images = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(n, s, s, 3))
        ok = np.ones(n, dtype=bool)
        ok[np.asarray(meta.get("unreadable", []), dtype=np.int64)] = False
        log.info("image cache %s: %d images loaded (%d unreadable)", data_path.name, n, int((~ok).sum()))
        return cls(images=images, ok=ok, geometry=geometry, path=data_path)

    @staticmethod
    def _build(
        paths: list[str],
        geometry: CropGeometry,
        data_path: Path,
        meta_path: Path,
        order: str,
        workers: int | None,
        progress: bool,
        name: str,
    ) -> None:
        n, s = len(paths), geometry.size
        if workers is None:
            workers = min(2, os.cpu_count() or 1)
        log.info("building image cache %s: decoding %d images (%d px, %d workers)", data_path.name, n, s, workers)
        tasks = [(i, paths[i : i + _CHUNK], geometry) for i in range(0, n, _CHUNK)]
        unreadable: list[int] = []
        with atomic_path(data_path, mode=0o644) as tmp:
            images = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, s, s, 3))
            bar = tqdm(total=n, desc=f"decoding {name}", unit="img", disable=not progress, leave=False)
            try:
                results: Iterable
                if workers > 1 and len(tasks) > 1:
                    ctx = mp.get_context(_START_METHOD)
                    with ctx.Pool(workers) as pool:
                        for start, block, failed in pool.imap_unordered(_decode_chunk, tasks):
                            images[start : start + len(block)] = block
                            unreadable += _note(failed, paths)
                            bar.update(len(block))
                else:
                    for task in tasks:
                        start, block, failed = _decode_chunk(task)
                        images[start : start + len(block)] = block
                        unreadable += _note(failed, paths)
                        bar.update(len(block))
                images.flush()
            finally:
                bar.close()
                del images  # close the map before the rename
        meta = {
            "version": FORMAT_VERSION,
            "name": name,
            "shape": [n, s, s, 3],
            "dtype": "uint8",
            "geometry": geometry.to_dict(),
            "resample": "LANCZOS",
            "order": order,
            "unreadable": sorted(unreadable),
        }
        atomic_write_text(meta_path, json.dumps(meta, indent=1), mode=0o644)  # written last: it marks the data complete
        if unreadable:
            log.warning("image cache %s: %d of %d images unreadable (ok=False)", data_path.name, len(unreadable), n)
        _remove_stale(data_path, f"{name}-{s}px-{_geometry_key(geometry)}-")


def _note(failed: list[tuple[int, str]], paths: list[str]) -> list[int]:
    for i, reason in failed:
        log.warning("skipping unreadable image %s (%s)", paths[i], reason)
    return [i for i, _ in failed]


def _remove_stale(current: Path, prefix: str) -> None:
    """Older caches of the same dataset name and geometry (built from other files) are dead weight.
    Their lock files stay: another process may hold one, and they are empty."""
    for old in current.parent.glob(f"{prefix}*.u8"):
        if old != current:
            log.info("removing stale image cache %s", old.name)
            for p in (old, old.with_suffix(".json")):
                p.unlink(missing_ok=True)
