"""Decoding big photos for a scan: JPEG decoded at reduced scale (libjpeg DCT scaling) vs full decode.

    .venv/bin/python bench/bench_decode.py [--images 12] [--size 4032x3024] [--max-side 1600] [--repeats 3]

Photos: `--images` LFW photos, each upscaled (bicubic) into a `--size` frame (default: a 12-megapixel
phone photo), with sensor-like grain (Gaussian noise, sigma 4) so that the JPEG carries the fine
detail a real photo has (smooth upscaled data would flatter reduced decoding), saved at quality 92.
Both paths return the same thing, the photo at the detector's size (longer side `--max-side`):

- baseline: `load_image` (full decode, EXIF, RGB) then `shrink` (antialiased bilinear), the scan's
  path before reduced decoding;
- faceverify: `load_for_detection` (the scan's path): decode at 1/2, 1/4 or 1/8 scale, never below
  max-side, then the same shrink.

The table gives ms per photo (median of `--repeats` passes; Pillow decodes on one thread, as in a scan
worker) and the
mean absolute pixel difference between the two results.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, median_rate, parse_size, print_table, ratio  # noqa: E402

from verify.faces import load_for_detection, load_image, shrink  # noqa: E402


def upscale_photo(src: Path, dst: Path, size: tuple[int, int], rng: np.random.Generator) -> None:
    """The photo upscaled (bicubic) into the middle of a `size` (W, H) frame, with sensor-like grain,
    saved as JPEG quality 92."""
    w, h = size
    side = min(w, h)
    face = Image.open(src).convert("RGB").resize((side, side), Image.BICUBIC)
    frame = Image.new("RGB", (w, h), (90, 110, 130))
    frame.paste(face, ((w - side) // 2, (h - side) // 2))
    pixels = np.asarray(frame, dtype=np.float32) + rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(dst, quality=92)


def make_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    lfw = SHARED_DATA / "lfw" / "lfw-deepfunneled"
    sources = sorted(lfw.glob("*/*.jpg"))[:: 97][:n]
    if len(sources) < n:
        raise SystemExit(f"{lfw}: not enough LFW photos (see ../shared/data/README.md)")
    rng = np.random.default_rng(seed)
    out = []
    for i, src in enumerate(sources):
        out.append(folder / f"photo_{i:03d}.jpg")
        upscale_photo(src, out[-1], size, rng)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--size", default="4032x3024", help="WxH of the photos")
    ap.add_argument("--max-side", type=int, default=1600, help="the detector's max_side")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        paths = make_photos(Path(tmp), args.images, size)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6

        def full() -> None:
            for p in paths:
                shrink(load_image(p), args.max_side)

        def reduced() -> None:
            for p in paths:
                load_for_detection(p, args.max_side)

        diff = np.mean([np.abs(shrink(load_image(p), args.max_side)[0].astype(np.int16)
                               - load_for_detection(p, args.max_side)[0].astype(np.int16)).mean() for p in paths])
        shape = load_for_detection(paths[0], args.max_side)[0].shape
        print(f"# {len(paths)} photos {size[0]}x{size[1]} JPEG q92 ({mb:.1f} MB each, LFW faces upscaled + grain), "
              f"to {shape[1]}x{shape[0]}, median of {args.repeats}")
        rows, base = [], None
        for name, fn in (("full decode + shrink (baseline)", full), ("load_for_detection (reduced decode)", reduced)):
            rate, sec = median_rate(fn, len(paths), args.repeats)
            base = base or rate
            rows.append((name, f"{1000 * sec / len(paths):.1f}", f"{rate:.1f}", ratio(rate, base)))
        print_table(("path", "ms/photo", "photos/s", "ratio"), rows, right=[False, True, True, True])
        print(f"mean absolute pixel difference between the two results: {diff:.2f} (of 255)")


if __name__ == "__main__":
    main()
