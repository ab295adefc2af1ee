"""How well are small faces recognised? LFW View 1 DevTest with every photo shrunk so that its face
is S pixels wide, for several S: the evidence behind the scan's smallest-face policy (README, "The
smallest face").

    .venv/bin/python scripts/face_size_study.py [--model M] [--sizes 0 80 60 40 30 20] [--json OUT]

Per photo, the face chosen at full size (the one nearest the centre among the large ones, as
`faceverify evaluate` chooses) has MTCNN box width W; the photo is shrunk by S / W (Pillow's Lanczos,
what a camera's or a phone's downscaling does to a small face) and detected again with the smallest
MTCNN window (12 px), so that detection is not what limits the size. Size 0 is the photo as it is.

Reported per size: photos where a face was found, AUC over the pairs (a photo without a face scores
-1), and at the model's own threshold (FAR 1e-3 on its impostor cohort) the true and false accepts.
ONNX Runtime only: no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from verify.evaluation.evaluate import choose_face  # noqa: E402
from verify.faces.detect import DetectorConfig, FaceDetector  # noqa: E402
from verify.faces.load import load_image  # noqa: E402
from verify.faces.pipeline import FacePipeline  # noqa: E402
from verify.model.runtimes import load_embedder  # noqa: E402
from verify.evaluation.metrics import auc, roc_curve  # noqa: E402
from verify.data.pairs import lfw_image_path, read_lfw_pairs  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"


def face_at(pipe: FacePipeline, image: np.ndarray) -> tuple[np.ndarray | None, float]:
    """(embedding of the chosen face or None, its box width in pixels)."""
    (result,) = pipe.analyse([image])
    if isinstance(result, str) or not result[0]:
        return None, 0.0
    faces, emb = result
    i = choose_face(faces, (image.shape[1], image.shape[0]))
    return emb[i], float(faces[i].face.width)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model file (default: the shipped model)")
    ap.add_argument("--pairs", type=Path, default=SHARED / "pairsDevTest.txt")
    ap.add_argument("--images", type=Path, default=SHARED / "lfw-deepfunneled")
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 80, 60, 40, 30, 20])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    pairs = read_lfw_pairs(args.pairs)
    embedder = load_embedder(args.model, "cpu", "onnx", threads=2)
    threshold = float(embedder.similarity_threshold)
    pipe = FacePipeline(FaceDetector(DetectorConfig(min_face_size=12, runtime="onnx")), embedder=embedder)
    keys = sorted({(r.name1, int(r.idx1)) for r in pairs.itertuples()} | {(r.name2, int(r.idx2)) for r in pairs.itertuples()})
    dim = int(embedder.meta["embedding_dim"])
    vectors = {s: np.full((len(keys), dim), np.nan, dtype=np.float32) for s in args.sizes}
    widths = {s: np.zeros(len(keys)) for s in args.sizes}
    for k, (name, idx) in enumerate(keys):
        image = load_image(lfw_image_path(args.images, name, idx))
        full, w0 = face_at(pipe, image)
        for s in args.sizes:
            if s == 0 or full is None:
                v, w = full, w0
            else:
                f = s / w0
                small = np.asarray(Image.fromarray(image).resize(
                    (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f))), Image.LANCZOS))
                v, w = face_at(pipe, small)
            if v is not None:
                vectors[s][k], widths[s][k] = v, w
        if (k + 1) % 500 == 0:
            print(f"{k + 1}/{len(keys)} photos", file=sys.stderr)
    pos = {key: i for i, key in enumerate(keys)}
    a = np.array([pos[(r.name1, int(r.idx1))] for r in pairs.itertuples()])
    b = np.array([pos[(r.name2, int(r.idx2))] for r in pairs.itertuples()])
    same = pairs["same"].to_numpy(dtype=bool)
    rows = []
    for s in args.sizes:
        v = vectors[s]
        found = ~np.isnan(v[:, 0])
        sim = np.where(found[a] & found[b], np.einsum("ij,ij->i", np.nan_to_num(v[a]), np.nan_to_num(v[b])), -1.0)
        far, tar, _ = roc_curve(sim, same)
        accepted = sim >= threshold
        rows.append({"face_px": s or "as is", "median_width_px": float(np.median(widths[s][found])) if found.any() else 0,
                     "photos_with_face": f"{found.sum()}/{len(keys)}", "auc": round(auc(far, tar), 4),
                     "true_accepts": round(float(accepted[same].mean()), 3),
                     "false_accepts": round(float(accepted[~same].mean()), 4)})
    print(f"model {embedder.fingerprint}, own threshold {threshold:.4f}; {len(pairs)} pairs, {len(keys)} photos")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---:" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps({"model": embedder.fingerprint, "threshold": threshold, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
