"""The decision with many enrolled photos, measured: for every held-out CelebA identity (partition 2,
never seen in training), enroll its first N photos (each + augmented views), then ask whether its
remaining photos are accepted and whether photos of 300 other people (LFW DevTest people, disjoint
from the DevTrain people of the model's impostor cohort) are rejected. Uses exactly the scoring the
`enroll`/`verify` commands use (verify.scoring), with the shipped model by default.

    .venv/bin/python scripts/scenario.py [--model M] [--enroll 12] [--strangers 300] [--views 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from verify.augment import augment_views
from verify.celeba import load_celeba
from verify.enroll import DEFAULT_VIEW_AUGMENT
from verify.evaluate import lfw_people_images
from verify.faces import DetectorConfig, FaceDetector, FacePipeline
from verify.model_file import Embedder
from verify.scoring import calibrate_identity, identity_scores, pool_photos

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def crops(pipeline: FacePipeline, paths: list[Path]) -> tuple[list[np.ndarray | None], int]:
    out, failed = [], 0
    for res in pipeline.iter_process([str(p) for p in paths]):
        if res.ok and res.faces:
            out.append(res.faces[0].crop)
        else:
            out.append(None)
            failed += 1
    return out, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--celeba", type=Path, default=DATA / "celeba")
    ap.add_argument("--lfw", type=Path, default=DATA / "lfw")
    ap.add_argument("--enroll", type=int, default=12)
    ap.add_argument("--strangers", type=int, default=300)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--target-far", type=float, default=1e-3)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    t0 = time.time()
    emb = Embedder.load(args.model)
    cohort = (emb.meta.get("extra") or {}).get("cohort")
    if cohort is None:
        print("the model has no impostor cohort: run faceverify calibrate first", file=sys.stderr)
        return 2
    cohort = cohort.float().numpy()
    pipeline = FacePipeline(FaceDetector(DetectorConfig(min_face_size=40)), emb.geometry)
    table = load_celeba([args.celeba], need_attributes=False).table
    test = table[table["partition"] == 2]
    strangers_all = lfw_people_images(args.lfw / "pairsDevTest.txt", args.lfw / "lfw-deepfunneled")
    seen, strangers = set(), []
    for p in strangers_all:  # one photo per person
        if p.parent.name not in seen:
            seen.add(p.parent.name)
            strangers.append(p)
    strangers = strangers[: args.strangers]
    s_crops, s_failed = crops(pipeline, strangers)
    s_vec = emb.embed(np.stack([c for c in s_crops if c is not None]))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for ident, g in test.groupby("identity"):
        paths = [Path(p) for p in g.sort_values("image")["path"]]
        c, failed = crops(pipeline, paths)
        ok = [x for x in c if x is not None]
        enr, probe = ok[: args.enroll], ok[args.enroll :]
        views = [emb.embed(augment_views(x, 1 + args.views, generator=gen, **DEFAULT_VIEW_AUGMENT)) for x in enr]
        vecs = np.concatenate(views)
        keys = np.repeat(np.arange(len(views)), 1 + args.views)
        _, pooled = pool_photos(vecs, keys)
        cal = calibrate_identity(pooled, cohort, target_far=args.target_far, top_k=args.top_k)
        p_vec = emb.embed(np.stack(probe))
        ta = int((identity_scores(p_vec, pooled, args.top_k) >= cal.threshold).sum())
        fa = int((identity_scores(s_vec, pooled, args.top_k) >= cal.threshold).sum())
        # the naive rule for comparison: nearest of all enrolled vectors vs the model's pair threshold
        nn_p = (p_vec @ vecs.T).max(1) >= emb.threshold
        nn_s = (s_vec @ vecs.T).max(1) >= emb.threshold
        rows.append({"identity": int(ident), "enrolled": len(enr), "probes": len(probe), "true_accepts": ta,
                     "false_accepts": fa, "strangers": len(s_vec), "no_face": failed, "threshold": cal.threshold,
                     "naive_true_accepts": int(nn_p.sum()), "naive_false_accepts": int(nn_s.sum())})
    n_p = sum(r["probes"] for r in rows)
    n_s = sum(r["strangers"] for r in rows)
    ta = sum(r["true_accepts"] for r in rows)
    fa = sum(r["false_accepts"] for r in rows)
    nta = sum(r["naive_true_accepts"] for r in rows)
    nfa = sum(r["naive_false_accepts"] for r in rows)
    meet = sum(r["true_accepts"] >= r["probes"] - 1 and r["false_accepts"] <= 1 for r in rows)
    print(f"{'identity':>9} {'enrolled':>8} {'accepted':>9} {'strangers accepted':>19}   naive rule")
    for r in rows:
        print(f"{r['identity']:>9} {r['enrolled']:>8} {r['true_accepts']:>4}/{r['probes']:<4} "
              f"{r['false_accepts']:>11}/{r['strangers']:<7}   {r['naive_true_accepts']}/{r['probes']}, "
              f"{r['naive_false_accepts']}/{r['strangers']}")
    summary = {
        "identities": len(rows), "true_accept_rate": ta / n_p, "false_accept_rate": fa / n_s,
        "naive_true_accept_rate": nta / n_p, "naive_false_accept_rate": nfa / n_s,
        "identities_meeting_target": meet, "stranger_photos_without_face": s_failed,
        "target": ">= 17/18 true accepts with <= 1/300 false accepts", "seconds": round(time.time() - t0, 1),
        "enroll": args.enroll, "views": args.views, "target_far": args.target_far, "top_k": args.top_k,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
