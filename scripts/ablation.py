"""Ablations at one identity-training budget, evaluated the same way: CelebA partition-2 identities
(all pairs; 10-fold accuracy on a balanced sample) and LFW View 1 DevTest (detect + align,
detections shared by all models; AUC, EER and the best-threshold accuracy, which is optimistic and
only used to compare the arms).

`--arms teacher` (default): what the teacher brings, on configs/identity-cpu.yaml's data and crop:
no teacher (the earlier recipe: triplet + CosFace at weight 1), teacher only (distillation, no
triplet or CosFace), triplet + CosFace + teacher (the shipped recipe's weights), and the latter from
random init instead of the attribute-pretrained backbone.
`--arms init`: does attribute pre-training help without a teacher (resnet pretrained / random,
seed-cnn random).

    .venv/bin/python scripts/ablation.py [--arms teacher|init] [--epochs 3] [--batches 80]
        [--out runs/ablation] [--stage1 runs/attributes-cpu] [--teacher runs/dlib.pt] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from verify.config import load_config
from verify.evaluation.evaluate import choose_face, pair_scores
from verify.faces import DetectorConfig, FaceDetector, FacePipeline
from verify.evaluation.metrics import best_accuracy_threshold, summarise_verification
from verify.model.file import Embedder
from verify.data.pairs import lfw_image_path, read_lfw_pairs
from verify.training import fit

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def lfw_crops(pairs_file: Path, root: Path, size_model: Embedder):
    pairs = read_lfw_pairs(pairs_file)
    p1 = [lfw_image_path(root, n, i) for n, i in zip(pairs["name1"], pairs["idx1"])]
    p2 = [lfw_image_path(root, n, i) for n, i in zip(pairs["name2"], pairs["idx2"])]
    uniq = sorted(set(p1) | set(p2))
    pipe = FacePipeline(FaceDetector(DetectorConfig(min_face_size=40)), size_model.geometry)
    crops, ok = {}, 0
    for res in pipe.iter_process([str(p) for p in uniq]):
        if res.ok and res.faces:
            crops[res.source] = res.faces[choose_face(res.faces, res.image_size)].crop
            ok += 1
    return pairs, p1, p2, crops, len(uniq) - ok


def lfw_metrics(emb: Embedder, pairs, p1, p2, crops) -> dict:
    keys = sorted(crops)
    vec = dict(zip(keys, emb.embed(np.stack([crops[k] for k in keys]))))
    nan = np.full(emb.dim, np.nan, np.float32)
    a = np.stack([vec.get(str(p), nan) for p in p1])
    b = np.stack([vec.get(str(p), nan) for p in p2])
    s, y = pair_scores(a, b), pairs["same"].to_numpy()
    summ = summarise_verification(s, y)
    _, acc = best_accuracy_threshold(s, y)
    return {"auc": summ["auc"], "eer": summ["eer"], "best_threshold_accuracy": acc}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", choices=("teacher", "init"), default="teacher")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=None, help="optim.batches_per_epoch of every arm (default: a pass)")
    ap.add_argument("--teacher", type=Path, default=REPO / "runs" / "dlib.pt")
    ap.add_argument("--threads", type=int, default=None, help="num_threads of every arm (default: the config's)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "ablation")
    ap.add_argument("--stage1", type=Path, default=REPO / "runs" / "attributes-cpu")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "identity-cpu.yaml")
    ap.add_argument("--ema", type=float, default=0.0, help="optim.ema of every arm (the README table: 0, off)")
    ap.add_argument("--also", type=Path, nargs="*", default=[], help="extra model files to evaluate alongside")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    no_teacher = {"identity.teacher": None}
    if args.arms == "init":
        arms = {
            "resnet, attribute-pretrained init": {"identity.init": str(args.stage1), **no_teacher},
            "resnet, random init": {"identity.init": None, **no_teacher},
            "seed-cnn, random init": {"identity.init": None, "model.backbone": "seed-cnn", **no_teacher},
        }
    else:
        teacher = {"identity.teacher": str(args.teacher)}
        arms = {
            "no teacher (triplet + CosFace), pretrained": {"identity.init": str(args.stage1), **no_teacher,
                                                           "identity.triplet_weight": 1.0, "identity.cls_weight": 1.0},
            "teacher only, pretrained": {"identity.init": str(args.stage1), **teacher,
                                         "identity.triplet_weight": 0.0, "identity.cls_weight": 0.0},
            "triplet + CosFace + teacher, pretrained": {"identity.init": str(args.stage1), **teacher},
            "triplet + CosFace + teacher, random init": {"identity.init": None, **teacher},
        }
    rows = {}
    for name, over in arms.items():
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        out = args.out / slug
        model = out / "model.pt"
        if not model.exists():
            base = {"out": str(out), "optim.epochs": args.epochs, "optim.ema": args.ema,
                    "optim.batches_per_epoch": args.batches, "num_threads": args.threads}
            cfg = load_config(args.config, base)
            cfg = load_config(None, {**_flat(cfg.to_dict()), **base, **over})  # None values override too
            t = time.time()
            fit(cfg, resume=(out / "ckpt_last.pt").exists())
            rows[name] = {"train_seconds": round(time.time() - t)}
        rows.setdefault(name, {})["model"] = model
    for extra in args.also:
        rows[f"{extra} (for reference)"] = {"model": extra}
    lfw = DATA / "lfw"
    first = Embedder.load(next(iter(rows.values()))["model"])
    pairs, p1, p2, crops, failed = lfw_crops(lfw / "pairsDevTest.txt", lfw / "lfw-deepfunneled", first)
    for name, r in rows.items():
        emb = Embedder.load(r["model"])
        prov = emb.meta["provenance"]
        r["celeba_test"] = {k: prov["celeba_test"][k] for k in ("auc", "eer", "accuracy")}
        r["epochs"] = prov["config"]["optim"]["epochs"]
        r["lfw_devtest"] = lfw_metrics(emb, pairs, p1, p2, crops)
        r["model"] = str(r["model"])
    print(f"\nLFW DevTest: {len(pairs)} pairs, {failed} images without a detected face (their pairs score lowest)")
    print(f"{'arm':<45} {'epochs':>6} {'CelebA-p2 AUC':>13} {'acc':>6} {'LFW AUC':>8} {'EER':>6} {'best-thr acc':>12}")
    for name, r in rows.items():
        c, l = r["celeba_test"], r["lfw_devtest"]
        print(f"{name:<45} {r['epochs']:>6} {c['auc']:>13.4f} {c['accuracy']:>6.4f} {l['auc']:>8.4f} {l['eer']:>6.4f} "
              f"{l['best_threshold_accuracy']:>12.4f}")
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=1, default=float))
    return 0


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


if __name__ == "__main__":
    raise SystemExit(main())
