"""The decision with many enrolled photos, measured: for every held-out CelebA identity (partition 2,
never seen in training), enroll its first N photos (each + augmented views), then ask whether its
remaining photos are accepted and whether photos of 300 other people (LFW DevTest people, disjoint
from the DevTrain people of the model's impostor cohort) are rejected. Uses exactly the scoring the
`enroll`/`verify` commands use (verify.identity.scoring), with the shipped model by default: the
per-source rule where the model ships cohort labels, and beside it (`pooled_*` figures) the pooled
cohort rule used before issue 28 and the per-source rule's VARIANTS (look-alike share, shift depth:
verify.identity.scoring.calibrate_identity), on the same vectors.

    .venv/bin/python scripts/scenario.py [--model M] [--enroll 12] [--strangers 300] [--views 8]

`--peer-vectors FILE.npz` scores another embedder's vectors (from scripts/peer_embeddings.py, e.g.
face_recognition's dlib ResNet) with the same rule, to tell the rule's limits from the model's: the
peer's impostor cohort is one face per LFW DevTrain person (the first image with a face, as
`faceverify calibrate` builds ours) and enrollment uses the photos only (no augmented views).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from verify.data.celeba import load_celeba
from verify.identity.embed import DEFAULT_VIEW_AUGMENT, augmented_view_crops
from verify.evaluation.evaluate import lfw_people_images
from verify.faces import DetectorConfig, FaceDetector, FacePipeline
from verify.model.file import Embedder
from verify.identity.scoring import calibrate_identity, identity_scores, pool_photos

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# variants of the per-source rule measured beside it (verify.identity.scoring.calibrate_identity keywords)
VARIANTS = {"shift10": {"shift_depth": 10.0}, "lookalike0.31": {"lookalike_share": 0.31},
            "lookalike0.31_shift10": {"lookalike_share": 0.31, "shift_depth": 10.0}}


class ModelVectors:
    """Faces through faceverify's pipeline (MTCNN, alignment, the model); views as `enroll` makes them
    (verify.identity.embed.augmented_view_crops: the region around the face augmented, re-detected, re-aligned)."""

    def __init__(self, emb: Embedder) -> None:
        self.emb = emb
        self.pipeline = FacePipeline(FaceDetector(DetectorConfig(min_face_size=40)), emb.geometry)

    def photos(self, paths: list[Path], keep_crops: bool = False) -> tuple[list | np.ndarray, int]:
        """(crop, image, box) of the photos with a face (keep_crops), else their vectors (N, D); and the failures."""
        out, failed = [], 0
        for res in self.pipeline.iter_process([str(p) for p in paths], keep_images=keep_crops):
            if res.ok and res.faces:
                out.append((res.faces[0].crop, res.image, res.faces[0].face.box))
            else:
                failed += 1
        return (out if keep_crops else self.vectors(out)), failed

    def vectors(self, items: list) -> np.ndarray:
        return self.emb.embed(np.stack([crop for crop, _, _ in items]))

    def views(self, item: tuple, n: int, gen: np.random.Generator) -> np.ndarray:
        crop, image, box = item
        crops = [crop] + augmented_view_crops(image, box, self.pipeline, n, gen, **DEFAULT_VIEW_AUGMENT)
        return self.emb.embed(np.stack(crops))

    def naive(self, queries: np.ndarray, enrolled: np.ndarray) -> np.ndarray:
        """Nearest of all enrolled vectors against the model's pair threshold."""
        return (queries @ enrolled.T).max(1) >= self.emb.similarity_threshold


def model_and_cohort(model: Path | None) -> tuple[ModelVectors, np.ndarray] | None:
    """The model's vectors and its impostor cohort (C, D), or None (with a message) when it has none."""
    emb = Embedder.load(model)
    cohort = (emb.meta.get("extra") or {}).get("cohort")
    if cohort is None:
        print("the model has no impostor cohort: run faceverify calibrate first", file=sys.stderr)
        return None
    return ModelVectors(emb), cohort.float().numpy()


class PeerVectors:
    """Precomputed vectors of another embedder, looked up by path; no augmented views."""

    def __init__(self, path: Path) -> None:
        data = np.load(path)
        vecs = data["vectors"].astype(np.float32)  # raw (norms ~1.2-1.7); the rule normalises
        ok = np.isfinite(vecs).all(1)
        self.table = {str(Path(p).resolve()): v for p, v, good in zip(data["paths"], vecs, ok) if good}
        self.known = {str(Path(p).resolve()) for p in data["paths"]}

    def _get(self, p: Path) -> np.ndarray | None:
        key = str(Path(p).resolve())
        if key not in self.known:
            raise SystemExit(f"{p}: not in the peer vectors file (embed it with scripts/peer_embeddings.py)")
        return self.table.get(key)

    def photos(self, paths: list[Path], keep_crops: bool = False) -> tuple[list | np.ndarray, int]:
        got = [self._get(p) for p in paths]
        ok = [v for v in got if v is not None]
        return (ok if keep_crops else np.stack(ok)), len(got) - len(ok)

    def vectors(self, vecs: list) -> np.ndarray:
        return np.stack(vecs)

    def views(self, vec: np.ndarray, n: int, gen: np.random.Generator) -> np.ndarray:
        return vec[None]

    def naive(self, queries: np.ndarray, enrolled: np.ndarray) -> np.ndarray:
        """face_recognition's CLI rule: any enrolled vector within Euclidean 0.6 (its default tolerance)."""
        d2 = (queries**2).sum(1)[:, None] - 2 * queries @ enrolled.T + (enrolled**2).sum(1)[None]  # (Q, E)
        return d2.min(1) <= 0.6**2

    def cohort(self, paths: list[Path]) -> np.ndarray:
        first: dict[str, np.ndarray] = {}
        for p in sorted(paths):
            v = self._get(p)
            if v is not None and p.parent.name not in first:
                first[p.parent.name] = v
        return np.stack(list(first.values()))


def write_peer_list(args: argparse.Namespace) -> int:
    table = load_celeba([args.celeba], need_attributes=False).table
    paths = sorted(str(p) for p in table[table["partition"] == 2]["path"])
    for pairs in ("pairsDevTest.txt", "pairsDevTrain.txt"):
        paths += [str(p) for p in lfw_people_images(args.lfw / pairs, args.lfw / "lfw-deepfunneled")]
    paths = list(dict.fromkeys(paths))
    args.write_peer_list.write_text("\n".join(paths) + "\n", encoding="utf-8")
    print(f"{args.write_peer_list}: {len(paths)} photo paths")
    return 0


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
    ap.add_argument("--peer-vectors", type=Path, default=None,
                    help="score these precomputed vectors (scripts/peer_embeddings.py) instead of the model's")
    ap.add_argument("--write-peer-list", type=Path, default=None,
                    help="write the paths of every photo the scenario uses (input of peer_embeddings.py) and exit")
    args = ap.parse_args()
    if args.write_peer_list is not None:
        return write_peer_list(args)
    if args.peer_vectors is not None:
        args.views = 0

    t0 = time.time()
    strangers_all = lfw_people_images(args.lfw / "pairsDevTest.txt", args.lfw / "lfw-deepfunneled")
    seen, strangers = set(), []
    for p in strangers_all:  # one photo per person
        if p.parent.name not in seen:
            seen.add(p.parent.name)
            strangers.append(p)
    strangers = strangers[: args.strangers]
    table = load_celeba([args.celeba], need_attributes=False).table
    test = table[table["partition"] == 2]
    if args.peer_vectors is not None:
        source = PeerVectors(args.peer_vectors)
        cohort = source.cohort(lfw_people_images(args.lfw / "pairsDevTrain.txt", args.lfw / "lfw-deepfunneled"))
    else:
        loaded = model_and_cohort(args.model)
        if loaded is None:
            return 2
        source, cohort = loaded
    labels = source.emb.cohort_sources if args.peer_vectors is None else None
    same = source.emb.similarity_threshold if args.peer_vectors is None else None
    s_vec, s_failed = source.photos(strangers)
    gen = np.random.default_rng(0)
    rows = []
    for ident, g in test.groupby("identity"):
        paths = [Path(p) for p in g.sort_values("image")["path"]]
        ok, failed = source.photos(paths, keep_crops=True)
        enr, probe = ok[: args.enroll], ok[args.enroll :]
        views = [source.views(x, args.views, gen) for x in enr]
        vecs = np.concatenate(views)
        keys = np.repeat(np.arange(len(views)), [len(v) for v in views])
        _, pooled = pool_photos(vecs, keys)
        # the product's rule (per source, with the model's cohort labels) and today's pooled one, side by side
        cal = calibrate_identity(pooled, cohort, target_far=args.target_far, top_k=args.top_k, sources=labels,
                                 same_person_similarity=same)
        old = calibrate_identity(pooled, cohort, target_far=args.target_far, top_k=args.top_k)
        variants = {name: calibrate_identity(pooled, cohort, target_far=args.target_far, top_k=args.top_k,
                                             sources=labels, same_person_similarity=same, **kw)
                    for name, kw in VARIANTS.items()} if labels is not None else {}
        p_vec = source.vectors(probe)
        p_sc, s_sc = identity_scores(p_vec, pooled, args.top_k), identity_scores(s_vec, pooled, args.top_k)
        ta, fa = int((p_sc >= cal.similarity_threshold).sum()), int((s_sc >= cal.similarity_threshold).sum())
        pta, pfa = int((p_sc >= old.similarity_threshold).sum()), int((s_sc >= old.similarity_threshold).sum())
        var = {f"{name}_{what}": int((sc >= v.similarity_threshold).sum())
               for name, v in variants.items() for what, sc in (("true_accepts", p_sc), ("false_accepts", s_sc))}
        # the naive rule for comparison: nearest enrolled vector against a single-pair threshold
        nn_p, nn_s = source.naive(p_vec, vecs), source.naive(s_vec, vecs)
        rows.append({"identity": int(ident), "enrolled": len(enr), "probes": len(probe), "true_accepts": ta,
                     "false_accepts": fa, "strangers": len(s_vec), "no_face": failed, "threshold": cal.similarity_threshold,
                     "threshold_source": cal.threshold_source, "pooled_threshold": old.similarity_threshold,
                     "pooled_true_accepts": pta, "pooled_false_accepts": pfa,
                     **var,
                     "naive_true_accepts": int(nn_p.sum()), "naive_false_accepts": int(nn_s.sum())})
    n_p = sum(r["probes"] for r in rows)
    n_s = sum(r["strangers"] for r in rows)
    ta = sum(r["true_accepts"] for r in rows)
    fa = sum(r["false_accepts"] for r in rows)
    nta = sum(r["naive_true_accepts"] for r in rows)
    nfa = sum(r["naive_false_accepts"] for r in rows)
    meet = sum(r["true_accepts"] >= r["probes"] - 1 and r["false_accepts"] <= 1 for r in rows)
    pmeet = sum(r["pooled_true_accepts"] >= r["probes"] - 1 and r["pooled_false_accepts"] <= 1 for r in rows)
    pta, pfa = sum(r["pooled_true_accepts"] for r in rows), sum(r["pooled_false_accepts"] for r in rows)
    var = {}
    for name in (VARIANTS if rows and f"{next(iter(VARIANTS))}_true_accepts" in rows[0] else {}):
        var[f"{name}_true_accept_rate"] = sum(r[f"{name}_true_accepts"] for r in rows) / n_p
        var[f"{name}_false_accept_rate"] = sum(r[f"{name}_false_accepts"] for r in rows) / n_s
        var[f"{name}_identities_meeting_target"] = sum(r[f"{name}_true_accepts"] >= r["probes"] - 1
                                                       and r[f"{name}_false_accepts"] <= 1 for r in rows)
    naive_meet = sum(r["naive_true_accepts"] >= r["probes"] - 1 and r["naive_false_accepts"] <= 1 for r in rows)
    print(f"{'identity':>9} {'enrolled':>8} {'accepted':>9} {'strangers accepted':>19}   naive rule")
    for r in rows:
        print(f"{r['identity']:>9} {r['enrolled']:>8} {r['true_accepts']:>4}/{r['probes']:<4} "
              f"{r['false_accepts']:>11}/{r['strangers']:<7}   {r['naive_true_accepts']}/{r['probes']}, "
              f"{r['naive_false_accepts']}/{r['strangers']}")
    summary = {
        "identities": len(rows), "true_accept_rate": ta / n_p, "false_accept_rate": fa / n_s,
        "rule": "hardest-source" if labels is not None else "pooled",
        "pooled_true_accept_rate": pta / n_p, "pooled_false_accept_rate": pfa / n_s,
        "pooled_identities_meeting_target": pmeet,
        **var,
        "naive_true_accept_rate": nta / n_p, "naive_false_accept_rate": nfa / n_s,
        "identities_meeting_target": meet, "naive_identities_meeting_target": naive_meet, "stranger_photos_without_face": s_failed,
        "target": ">= 17/18 true accepts with <= 1/300 false accepts", "seconds": round(time.time() - t0, 1),
        "vectors": str(args.peer_vectors or "faceverify model"), "enroll": args.enroll, "views": args.views, "target_far": args.target_far, "top_k": args.top_k,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
