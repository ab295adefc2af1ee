"""Embed photos with the face_recognition package (dlib's 128-d ResNet) for scripts/scenario.py.

Runs in the peer's own venv (see bench/README.md), never in faceverify's: it imports nothing from
faceverify. Per photo: HOG detection (upsample 1, as the face_recognition CLI), the largest face,
its 128-d encoding (1 jitter). Writes an .npz with `paths` (as given) and `vectors` (N, 128) float32,
NaN rows for photos without a face or unreadable.

    /tmp/frenv/bin/python scripts/peer_embeddings.py LIST.txt OUT.npz [--processes 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

import numpy as np


def _embed(path: str) -> np.ndarray:
    import face_recognition

    out = np.full(128, np.nan, dtype=np.float32)
    try:
        img = face_recognition.load_image_file(path)
        boxes = face_recognition.face_locations(img, number_of_times_to_upsample=1)
        if boxes:
            top, right, bottom, left = max(boxes, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))
            out[:] = face_recognition.face_encodings(img, known_face_locations=[(top, right, bottom, left)])[0]
    except Exception as exc:  # noqa: BLE001 - one bad photo is a NaN row, not a crash
        print(f"{path}: {exc}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", help="text file, one image path per line")
    ap.add_argument("out", help="output .npz")
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    with open(args.paths, encoding="utf-8") as f:
        paths = [line.rstrip("\n") for line in f if line.strip()]
    with mp.Pool(args.processes) as pool:
        vecs = pool.map(_embed, paths, chunksize=16)
    np.savez(args.out, paths=np.array(paths), vectors=np.stack(vecs).astype(np.float32))
    found = int(np.isfinite(np.stack(vecs)[:, 0]).sum())
    print(f"{args.out}: {len(paths)} photos, a face in {found}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
