"""Labelled training vectors for a learned grouping transform (issue 30, bench/bench_group_transform.py).

    PYTHONPATH=. .venv/bin/python scripts/grouping_train_vectors.py [--data ../shared/data]
        [--model verify/model/shipped/default.pt] [--cache /tmp/i30f] [--per-identity 30] [--source celeba]

Embeds labelled photos of people in neither the selection sets (CelebA partition 1, LFW DevTrain) nor
the report sets (CelebA partition 2, LFW) through the product's pipeline (MTCNN, alignment to the
model's crop, the model; the largest face of each photo) and caches (vectors, identity) in
--cache/train-<source>-<fingerprint>-<photos>.npz (resumed if cut short):

- celeba: CelebA partition 0 (training identities) from the roots celeba, celeba_wild, celeba_half
  (first root wins per file, as training read them), identities with 2 or more photos, at most
  --per-identity each. The shipped model was trained on these very identities.
- orl: the 40 people of AT&T (ORL), 10 grey photos each: people no model here was trained on.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("fit_grouping_transform")
ROOTS = ("celeba", "celeba_wild", "celeba_half")


def orl_photos(data: Path) -> tuple[list[Path], np.ndarray]:
    """(photos, (N,) person number) of AT&T (ORL): orl/att_faces/sN/M.pgm."""
    paths = sorted((data / "orl" / "att_faces").glob("s*/*.pgm"))
    return paths, np.asarray([int(p.parent.name[1:]) for p in paths], np.int64)


def training_photos(data: Path, per_identity: int, seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """(photos, (N,) identity): CelebA partition 0 identities with >= 2 photos present, at most
    per_identity photos each (a seeded draw), in a seeded order that interleaves identities (so a cache
    cut short still holds many identities)."""
    from verify.data.celeba import load_celeba

    table = load_celeba([data / r for r in ROOTS], need_attributes=False).table
    table = table[table["partition"] == 0]
    counts = table["identity"].value_counts()
    table = table[table["identity"].isin(counts.index[counts >= 2])]
    rng = np.random.default_rng(seed)
    chosen = []
    for _, rows in table.groupby("identity"):
        idx = rows.index.to_numpy()
        chosen.append(rng.permutation(idx)[:per_identity])
    # round-robin over identities: the k-th photo of every identity before any (k+1)-th
    order = [ix for k in range(per_identity) for c in rng.permutation(len(chosen)) if k < len(chosen[c])
             for ix in [chosen[c][k]]]
    sub = table.loc[order]
    return [Path(p) for p in sub["path"]], sub["identity"].to_numpy(np.int64)


def embed_photos(paths: list[Path], identity: np.ndarray, model: Path, cache: Path, source: str,
                 save_every: int = 500) -> dict:
    """{"vectors": (M, D), "identity": (M,), "photo": (M,) index into "paths" (n,)} of each photo's
    largest face, cached (and resumed) in cache/train-<source>-<fingerprint>-<n>.npz, saved every
    save_every photos."""
    from verify.identity.enroll import face_pipeline
    from verify.model.file import read_model_file
    from verify.model.runtimes import load_embedder

    fp = read_model_file(model)["fingerprint"]
    out = cache / f"train-{source}-{fp}-{len(paths)}.npz"
    got = dict(np.load(out)) if out.is_file() else {"vectors": np.zeros((0, 128), np.float32),
                                                     "identity": np.zeros(0, np.int64), "photo": np.zeros(0, np.int64),
                                                     "done": np.array(0)}
    start = int(got["done"])
    if start >= len(paths):
        return {**got, "paths": np.array([str(p) for p in paths])}
    pipe = face_pipeline(load_embedder(model, device="cpu"), min_face=20)
    vecs, ids, photos = [got["vectors"]], [got["identity"]], [got["photo"]]
    t0 = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)

    def save(done: int) -> dict:
        res = {"vectors": np.concatenate(vecs).astype(np.float32), "identity": np.concatenate(ids),
               "photo": np.concatenate(photos), "done": np.array(done),
               "paths": np.array([str(p) for p in paths])}
        np.savez(out.with_suffix(".tmp.npz"), **res)
        out.with_suffix(".tmp.npz").replace(out)
        return res

    for i, res in enumerate(pipe.iter_process([str(p) for p in paths[start:]]), start):
        if res.ok and res.faces:
            vecs.append(res.embeddings[:1].astype(np.float32))  # (1, D) the largest face
            ids.append(identity[i:i + 1])
            photos.append(np.array([i]))
        if (i + 1) % save_every == 0:
            save(i + 1)
            log.info("%d / %d photos, %.0f s", i + 1, len(paths), time.perf_counter() - t0)
    return save(len(paths))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--model", default=str(REPO / "verify" / "model" / "shipped" / "default.pt"))
    ap.add_argument("--cache", default="/tmp/i30f")
    ap.add_argument("--source", default="celeba", choices=("celeba", "orl"))
    ap.add_argument("--per-identity", type=int, default=30)
    ap.add_argument("--max-photos", type=int, default=0, help="embed only the first N of the drawn photos (0: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = Path(args.data)
    paths, identity = orl_photos(data) if args.source == "orl" else training_photos(data, args.per_identity)
    if args.max_photos:
        paths, identity = paths[:args.max_photos], identity[:args.max_photos]
    log.info("%d photos of %d %s people", len(paths), len(np.unique(identity)), args.source)
    got = embed_photos(paths, identity, Path(args.model), Path(args.cache), args.source)
    log.info("%d faces embedded of %d people -> %s", len(got["vectors"]), len(np.unique(got["identity"])), args.cache)


if __name__ == "__main__":
    main()
