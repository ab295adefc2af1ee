"""Decisions of the light path (ONNX Runtime) against PyTorch on LFW View 1 DevTest.

    .venv/bin/python scripts/parity_runtimes.py [--model verify/model/shipped/default.pt] [--model /tmp/dlib.pt]

Per model: `evaluate_pairs` on pairsDevTest.txt (threshold chosen on pairsDevTrain.txt, as the README's
model card) once with each runtime (detector and embedder both), keeping every pair's similarity. Prints
accuracy per runtime, the largest similarity difference over the 1,000 pairs, and how many pairs get a
different decision at the DevTrain threshold and at the model's own threshold.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from verify.evaluation.evaluate import evaluate_pairs
from verify.faces import DetectorConfig
from verify.model.runtimes import load_embedder

DATA = Path(os.environ.get("FACEVERIFY_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=None)
    args = ap.parse_args()
    lfw = DATA / "lfw"
    for model in args.model or ["verify/model/shipped/default.pt"]:
        out = {}
        for runtime in ("onnx", "torch"):
            emb = load_embedder(model, "cpu", runtime)
            r = evaluate_pairs(lfw / "pairsDevTest.txt", lfw / "lfw-deepfunneled", emb, progress=False,
                               threshold_from=lfw / "pairsDevTrain.txt", keep_scores=True,
                               detector_config=DetectorConfig(min_face_size=40, device="cpu", runtime=runtime))
            out[runtime] = (r, emb.similarity_threshold)
        (ro, own), (rt, _) = out["onnx"], out["torch"]
        so, st = np.asarray(ro["scores"]), np.asarray(rt["scores"])
        thr = float(ro["threshold"])
        print(f"{model}: {len(so)} pairs; accuracy onnx {ro['accuracy']:.4f} torch {rt['accuracy']:.4f}; "
              f"AUC {ro['auc']:.4f} / {rt['auc']:.4f}; max |similarity difference| {np.abs(so - st).max():.2e}; "
              f"decisions differing at the DevTrain threshold {thr:.4f} (onnx run's): {int(((so >= thr) != (st >= thr)).sum())}, "
              f"at the model's threshold {own:.4f}: {int(((so >= own) != (st >= own)).sum())}; "
              f"images without a face onnx {ro['failed_images']} torch {rt['failed_images']}")


if __name__ == "__main__":
    main()
