"""Face detection speed: verify.faces.mtcnn's driver vs facenet-pytorch's MTCNN.detect, same weights, same photos.

    .venv/bin/python bench/bench_detect.py [--images 64] [--batch 16] [--threads 2] [--min-face 40] [--repeats 3]
    .venv/bin/python bench/bench_detect.py --photo-size 4032x3024 --images 8 --batch 8 --min-face 20

Photos: the first `--images` LFW deep-funneled photos (250x250) in sorted order, detected in batches
of `--batch` equal-sized images, as `faceverify scan` does. With `--photo-size`: phone-sized JPEGs
made from LFW photos (bench_decode.py's, upscaled with grain), loaded as a scan worker loads them
(`load_for_detection`: shrunk to the detector's 1600 px). Both drivers run the same P/R/O networks
with the same thresholds; the table also says how many faces each found (they must agree).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, median_rate, parse_size, print_table, ratio  # noqa: E402

from verify.faces import DetectorConfig, load_for_detection, load_image  # noqa: E402
from verify.faces.mtcnn import detect_faces  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-face", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--photo-size", default=None, help="WxH: big photos instead of LFW's 250x250")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from facenet_pytorch import MTCNN

    cfg = DetectorConfig(min_face_size=args.min_face)
    if args.photo_size:
        from bench_decode import make_photos

        size = parse_size(args.photo_size)
        with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
            paths = make_photos(Path(tmp), args.images, size)
            imgs = np.stack([load_for_detection(p, cfg.max_side)[0] for p in paths])  # (N, h, w, 3)
        what = f"{len(imgs)} photos {size[0]}x{size[1]} (LFW upscaled + grain) at {imgs.shape[2]}x{imgs.shape[1]}"
    else:
        lfw = SHARED_DATA / "lfw" / "lfw-deepfunneled"
        paths = sorted(lfw.glob("*/*.jpg"))[: args.images]
        if not paths:
            raise SystemExit(f"{lfw}: no LFW photos (see ../shared/data/README.md)")
        imgs = np.stack([load_image(p) for p in paths])  # (N, 250, 250, 3)
        what = f"{len(imgs)} LFW photos 250x250"  # the thresholds and pyramid step the scan uses
    m = MTCNN(min_face_size=cfg.min_face_size, keep_all=True, thresholds=list(cfg.thresholds), factor=cfg.factor)
    chunks = [imgs[i : i + args.batch] for i in range(0, len(imgs), args.batch)]

    def facenet() -> int:
        return sum(0 if b is None else len(b) for c in chunks for b in m.detect(c, landmarks=True)[0])

    def ours() -> int:
        return sum(len(b) for c in chunks for b, _ in detect_faces(c, m.pnet, m.rnet, m.onet, m.min_face_size,
                                                                   m.thresholds, m.factor))

    print(f"# {what}, batches of {args.batch}, {args.threads} threads, "
          f"min face {args.min_face} px, median of {args.repeats}")
    rows = []
    base = None
    for name, fn in (("facenet-pytorch MTCNN.detect", facenet), ("verify.faces.mtcnn.detect_faces", ours)):
        faces = fn()
        rate, sec = median_rate(fn, len(imgs), args.repeats)
        base = base or rate
        rows.append((name, f"{1000 * sec / len(imgs):.1f}", f"{rate:.1f}", faces, ratio(rate, base)))
    print_table(("driver", "ms/img", "img/s", "faces", "ratio"), rows, right=[False, True, True, True, True])


if __name__ == "__main__":
    main()
