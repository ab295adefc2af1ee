"""What was tried to close the shipped model's recall gap in `faceverify people` (issue 30): vector
transforms and rank-based distances before the same HDBSCAN grouping, on the selection and report sets.

    .venv/bin/python bench/bench_group_tries.py [--dlib-model /tmp/dlib.pt] [--cache DIR] [--subsets 20]

Reads the faces bench_groups.py caches (run it first; the same --cache and --dlib-model). Every try
groups one face per photo with `people`'s other settings (hdbscan, min_faces 2, max_distance 1.2 as a
cap on the Euclidean distance, quality gate 0.1, no merge unless named), for both models. Prints:

1. BCubed F per try and set, and its difference to "none" (today's grouping before centring) in the
   same run. Selection sets (where settings are chosen): CelebA partition 1 (3 library-like draws of
   2..8 photos per identity, as bench_groups.py; and all 780 photos, ~30 per identity) and the LFW
   DevTrain people; "selection" = the mean of the draws' mean and DevTrain (bench_groups' objective).
   Report sets: the 3,062 LFW photos, LFW DevTest's people, CelebA partition 2.
2. The chosen try against "none", and the best runner-up against the chosen (PAIRED), on --subsets
   paired subsets of the selection sets (random halves of the DevTrain people; CelebA partition 1
   draws with another seed): mean difference in F, its standard error, and how many subsets got
   better / worse.
3. Why grouping alone cannot close the gap: on the LFW DevTrain people's faces (the photo's largest,
   gate passed) that have another photo of their person, the share whose nearest other face is that
   person, and the share of genuine pairs accepted at a false accept rate of 1e-3 and 1e-4 over all
   pairs, per model, and the length of the mean of these faces' unit vectors (1: all alike, ~0: no
   shared direction). And the time of the centring itself on 100,000 random 128-d unit vectors.
4. Small libraries, where the mean is the people rather than the domain: 10 libraries each of all the
   photos of 1 and of 2 CelebA partition 1 identities (~30 per identity), BCubed F of none, the
   centring (prior 200) and the full mean.
5. max_distance re-chosen in the centred space: the selection objective of the centring at caps
   0.9..1.4 (distances between centred vectors are larger than between the model's).

Tries: the library's mean subtracted (index.groups.library_mean + centre_on; shrunk by N / (N + 200),
or the full mean), PCA whitening with shrinkage of the library's covariance, the top principal
direction removed after centring, local scaling (distance / sqrt(sigma_a sigma_b), sigma = distance to
the 8th neighbour), the approximate rank-order distance (Otto et al. 2018) and the k-reciprocal
Jaccard distance (Zhong et al. 2017) as HDBSCAN's distance, and centring + the merge pass.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_groups as bg  # noqa: E402
from common import SHARED_DATA, print_table  # noqa: E402

CAP = 1.2  # max_distance, on the Euclidean distance of the model's (or the transformed) vectors
K_GRAPH = 16  # index.groups.HDBSCAN_NEIGHBOURS


# --------------------------------------------------------------------------------------------
# Transforms and distances
# --------------------------------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def whiten(x: np.ndarray, library: np.ndarray, shrink: float, shrunk_mean: bool = False) -> np.ndarray:
    """PCA whitening by the library's covariance shrunk toward its mean variance: (1-a) C + a tr(C)/D I;
    the mean subtracted is the library's, or (shrunk_mean) index.groups.library_mean's, as the centring."""
    from index.groups import library_mean

    y = library - library.mean(axis=0)
    mu = library_mean(library) if shrunk_mean else library.mean(axis=0)
    cov = y.T @ y / len(y)  # (D, D)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    w, u = np.linalg.eigh(cov)
    return unit((x - mu) @ u @ np.diag(w ** -0.5) @ u.T)


def drop_top_direction(x: np.ndarray, library: np.ndarray, n: int = 1) -> np.ndarray:
    """Centre on the library's mean, then remove its top n principal directions (Mu & Viswanath 2018)."""
    mu = library.mean(axis=0)
    _, _, vt = np.linalg.svd(library - mu, full_matrices=False)
    y = x - mu
    return unit(y - (y @ vt[:n].T) @ vt[:n])


def knn_lists(x: np.ndarray, k: int) -> np.ndarray:
    """(N, k+1) each face's k nearest faces, itself first (exact)."""
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, ids = index.search(x, k + 1)
    for i in np.flatnonzero(ids[:, 0] != np.arange(len(x))):  # a duplicate may come before the face itself
        ids[i] = [i, *[j for j in ids[i] if j != i][:k]]
    return ids


def rank_order(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Approximate rank-order distance (Otto, Wang & Jain 2018) on the k-NN edges: d(a, b) = the number
    of a's neighbours up to b's rank in a's list that are not in b's top k, D = (d(a,b) + d(b,a)) /
    min(rank of b for a, rank of a for b). Returns (src, dst, D) with src < dst, each pair once."""
    ids = knn_lists(x, k)
    pos = [dict(zip(row.tolist(), range(k + 1))) for row in ids]
    seen: dict[tuple[int, int], float] = {}
    for a in range(len(x)):
        for oa in range(1, k + 1):
            b = int(ids[a, oa])
            key = (min(a, b), max(a, b))
            if key in seen:
                continue
            ob = pos[b].get(a, k + 1)
            dab = sum(f not in pos[b] for f in ids[a, :oa + 1].tolist())
            dba = sum(f not in pos[a] for f in ids[b, :min(ob, k) + 1].tolist())
            seen[key] = (dab + dba) / max(min(oa, ob), 1)
    pairs = np.array(list(seen), np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1], np.fromiter(seen.values(), float, len(seen))


def k_reciprocal(x: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """(N, N) re-ranked distance of Zhong et al. 2017 (the set against itself): Jaccard distance of the
    k-reciprocal neighbour sets (Gaussian-weighted, expanded, averaged over k2 neighbours) mixed with the
    original distance by lam. Dense: for the report sets' few thousand faces only."""
    from scipy import sparse

    n = len(x)
    orig = np.maximum(2 - 2 * (x.astype(np.float64) @ x.T), 0)
    orig = (orig / orig.max(axis=0)).T
    rank = np.argsort(orig, axis=1)
    v = np.zeros((n, n))
    half = int(np.around(k1 / 2))
    for i in range(n):
        fwd = rank[i, :k1 + 1]
        recip = fwd[np.flatnonzero((rank[fwd, :k1 + 1] == i).any(axis=1))]
        expanded = [recip]
        for c in recip:
            cf = rank[c, :half + 1]
            cr = cf[np.flatnonzero((rank[cf, :half + 1] == c).any(axis=1))]
            if len(np.intersect1d(cr, recip)) > 2 / 3 * len(cr):
                expanded.append(cr)
        members = np.unique(np.concatenate(expanded))
        w = np.exp(-orig[i, members])
        v[i, members] = w / w.sum()
    if k2 > 1:
        v = v[rank[:, :k2]].mean(axis=1)
    vc = sparse.csc_matrix(v)
    both = np.zeros((n, n))  # sum_j min(v_i j, v_k j)
    for j in range(n):
        rows, vals = vc.indices[vc.indptr[j]:vc.indptr[j + 1]], vc.data[vc.indptr[j]:vc.indptr[j + 1]]
        if len(rows):
            both[np.ix_(rows, rows)] += np.minimum.outer(vals, vals)
    return (1 - both / (2 - both)) * (1 - lam) + orig * lam


def hdbscan_with(x: np.ndarray, src: np.ndarray, dst: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """index.groups' HDBSCAN (min_faces 2) over the edges (src, dst) weighted by `dist`, capped at CAP on
    the Euclidean distance."""
    from index.groups import hdbscan_on_edges, relabel

    euclid = np.linalg.norm(x[src] - x[dst], axis=1)
    raw = hdbscan_on_edges(len(x), src, dst, np.maximum(dist, 1e-9), 2, 1, "eom", cap_distance=euclid, max_distance=CAP)
    return relabel(raw, 2)


def top_k_edges(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each face's k nearest under a dense (N, N) distance, as undirected edges (src < dst, once)."""
    n = len(dist)
    d = dist.copy()
    np.fill_diagonal(d, np.inf)
    nb = np.argpartition(d, k, axis=1)[:, :k]
    a, b = np.repeat(np.arange(n), k), nb.reshape(-1)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    _, first = np.unique(lo * n + hi, return_index=True)
    return lo[first], hi[first], d[lo[first], hi[first]]


def local_scaling(x: np.ndarray, k: int) -> np.ndarray:
    """Self-tuning distance (Zelnik-Manor & Perona 2004): d(a, b) / sqrt(sigma_a sigma_b), sigma = the
    distance to the k-th neighbour, over the same k-NN graph."""
    from index.groups import knn_edges

    src, dst, dist = knn_edges(x, min(len(x) - 1, K_GRAPH))
    ids = knn_lists(x, k)
    sigma = np.maximum(np.linalg.norm(x - x[ids[:, k]], axis=1), 1e-6)
    return hdbscan_with(x, src, dst, dist / np.sqrt(sigma[src] * sigma[dst]))


def rank_order_times_euclid(x: np.ndarray, k: int) -> np.ndarray:
    """HDBSCAN on the rank-order distance times the Euclidean one (ties among equal ranks broken by it)."""
    src, dst, rank = rank_order(x, k)
    return hdbscan_with(x, src, dst, rank * np.linalg.norm(x[src] - x[dst], axis=1))


def plain(x: np.ndarray) -> np.ndarray:
    from index.groups import group_faces

    return group_faces(x, max_distance=CAP, min_faces=2, method="hdbscan")


def centred(x: np.ndarray, library: np.ndarray, prior: float | None = None, merge: float = 0.0) -> np.ndarray:
    from index.groups import CENTRE_PRIOR_FACES, centre_on, library_mean, merge_close_groups

    space = centre_on(x, library_mean(library, CENTRE_PRIOR_FACES if prior is None else prior))
    labels = plain(space)
    return merge_close_groups(space, labels, merge) if merge > 0 else labels


# name -> f(x: the faces grouped (N, D), library: every face of the library (L, D)) -> (N,) labels
TRIES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "none": lambda x, lib: plain(x),
    "centre (prior 200, the new default)": lambda x, lib: centred(x, lib),
    "centre, full mean (prior 0)": lambda x, lib: centred(x, lib, prior=0),
    "centre + merge 0.6": lambda x, lib: centred(x, lib, merge=0.6),
    "whiten, shrinkage 0.5": lambda x, lib: plain(whiten(x, lib, 0.5)),
    "whiten, shrinkage 0.95": lambda x, lib: plain(whiten(x, lib, 0.95)),
    "whiten, shrinkage 0.95, shrunk mean": lambda x, lib: plain(whiten(x, lib, 0.95, shrunk_mean=True)),
    "centre, top direction removed": lambda x, lib: plain(drop_top_direction(x, lib)),
    "local scaling, k 8": lambda x, lib: local_scaling(x, 8),
    "rank-order x Euclidean, k 8": lambda x, lib: rank_order_times_euclid(x, 8),
    "rank-order, k 6": lambda x, lib: hdbscan_with(x, *rank_order(x, 6)),
    "k-reciprocal, k1 20 k2 6 lambda 0.3": lambda x, lib: hdbscan_with(x, *top_k_edges(k_reciprocal(x, 20, 6, 0.3), K_GRAPH)),
    "k-reciprocal, k1 10 k2 3 lambda 0.6": lambda x, lib: hdbscan_with(x, *top_k_edges(k_reciprocal(x, 10, 3, 0.6), K_GRAPH)),
}
CHOSEN = "centre (prior 200, the new default)"
PAIRED = ((CHOSEN, "none"), ("whiten, shrinkage 0.95, shrunk mean", CHOSEN))  # (try, against) on paired subsets


# --------------------------------------------------------------------------------------------
# Sets and the run
# --------------------------------------------------------------------------------------------


def separation(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """How well unit vectors x (N, D) of people y (N,) separate them: (N,) has another face of its
    person, (N,) its nearest other face is its person's, and the share of genuine pairs accepted at a
    false accept rate of 1e-3 and 1e-4 (all pairs)."""
    sim = x @ x.T  # (N, N) cosine
    np.fill_diagonal(sim, -np.inf)
    same = y[:, None] == y[None, :]
    np.fill_diagonal(same, False)
    has_mate = same.any(axis=1)
    nn_right = same[np.arange(len(x)), sim.argmax(axis=1)]
    iu = np.triu_indices(len(x), 1)
    genuine, impostor = sim[iu][same[iu]], sim[iu][~same[iu]]
    return has_mate, nn_right, [float((genuine > np.quantile(impostor, 1 - far)).mean()) for far in (1e-3, 1e-4)]


def paired_subsets(sets: dict, selection: dict, n: int) -> tuple[list, list]:
    """The selection sets' paired subsets, each a view (tag, photo indices): `n` random halves of the LFW
    DevTrain people (seed 7) and `n` CelebA partition-1 draws (seed 2)."""
    lfw_train, p1 = selection["LFW DevTrain"][1], selection["CelebA p1, all photos"][1]
    rng = np.random.default_rng(7)
    people = sets["lfw"]["y"][lfw_train]
    halves = [("lfw", lfw_train[np.isin(people, rng.choice(np.unique(people), len(np.unique(people)) // 2, replace=False))])
              for _ in range(n)]
    draws = [("celeba", p1[d]) for d in bg.selection_draws(sets["celeba"]["y"][p1], n, seed=2)]
    return halves, draws


def load_sets(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(faces per tag, selection views, report views); a view = (tag, photo indices)."""
    from index.quality import quality_scores

    data = Path(args.data)
    lfw, lfw_y, _ = bg.lfw_photos(data / "lfw" / "lfw-deepfunneled")
    cel, cel_y = bg.celeba_selection(data)
    sets = {}
    for tag, paths, y in (("lfw", lfw, lfw_y), ("celeba", cel, cel_y)):
        faces = bg.photo_faces(paths, Path(args.dlib_model), args.min_face, Path(args.cache), False, tag)
        sets[tag] = dict(paths=paths, y=y, faces=faces, quality=quality_scores(bg.face_signals_of(faces)))
    person = np.array([p.parent.name for p in lfw])
    train = np.flatnonzero(np.isin(person, list(bg.lfw_pair_people(data, "pairsDevTrain.txt"))))
    test = np.flatnonzero(np.isin(person, list(bg.lfw_pair_people(data, "pairsDevTest.txt"))))
    part = bg.celeba_partition(data)
    p1 = np.flatnonzero([part[p.name] == 1 for p in cel])
    p2 = np.flatnonzero([part[p.name] == 2 for p in cel])
    selection = {f"CelebA p1 draw {i + 1}": ("celeba", p1[d]) for i, d in enumerate(bg.selection_draws(cel_y[p1], 3))}
    selection["CelebA p1, all photos"] = ("celeba", p1)
    selection["LFW DevTrain"] = ("lfw", train)
    report = {"LFW, 3,062 photos": ("lfw", np.arange(len(lfw))), "LFW DevTest": ("lfw", test), "CelebA p2": ("celeba", p2)}
    return sets, selection, report


def f_of(sets: dict, view: tuple[str, np.ndarray], key: str, name: str) -> float:
    """BCubed F of try `name` on one view, one face per photo (the largest), the gate at index.quality's
    default, the library = every face found in the view's photos."""
    from index.groups import bcubed
    from index.quality import DEFAULT_MIN_QUALITY

    s = sets[view[0]]
    keep = np.zeros(len(s["paths"]), bool)
    keep[view[1]] = True
    vecs, idx = bg.per_photo(s["faces"], key, len(s["paths"]))
    q = np.where(idx >= 0, s["quality"][np.maximum(idx, 0)], np.nan)[keep]
    x = vecs[keep]
    ok = np.isfinite(x[:, 0]) & ~(q < DEFAULT_MIN_QUALITY)
    labels = np.full(len(x), -1, np.int64)
    labels[ok] = TRIES[name](np.ascontiguousarray(x[ok]), s["faces"][key][keep[s["faces"]["photo"]]])
    return bcubed(s["y"][keep], labels)[2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--dlib-model", default="/tmp/dlib.pt")
    ap.add_argument("--cache", default=str(bg.CACHE))
    ap.add_argument("--min-face", type=int, default=40)
    ap.add_argument("--subsets", type=int, default=20, help="paired subsets per selection set for the second table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sets, selection, report = load_sets(args)
    views = {**selection, **report}
    for key, model in (("v_shipped", "shipped"), ("v_dlib", "dlib imported")):
        rows, base = [], None
        for name in TRIES:
            f = {v: f_of(sets, views[v], key, name) for v in views}
            f["selection"] = (np.mean([f[v] for v in selection if "draw" in v]) + f["LFW DevTrain"]) / 2
            base = base or f
            cols = ["selection", "CelebA p1, all photos", "LFW DevTrain", *report]
            rows.append([name, *(f"{f[c]:.3f} ({f[c] - base[c]:+.3f})" if name != "none" else f"{f[c]:.3f}" for c in cols)])
        print(f"\n{model}: BCubed F (difference to none)")
        print_table(["try", "selection", "CelebA p1 all (sel.)", "LFW DevTrain (sel.)", *(f"{r} (report)" for r in report)], rows,
                    right=[False, *[True] * 6])
    # the chosen try on paired subsets of the selection sets
    lfw_train, p1 = selection["LFW DevTrain"][1], selection["CelebA p1, all photos"][1]
    halves, draws = paired_subsets(sets, selection, args.subsets)
    rows = []
    for name, against in PAIRED:
        for key, model in (("v_shipped", "shipped"), ("v_dlib", "dlib imported")):
            for label, subsets in (("LFW DevTrain, random halves of the people", halves), ("CelebA p1 draws (seed 2)", draws)):
                d = np.array([f_of(sets, v, key, name) - f_of(sets, v, key, against) for v in subsets])
                rows.append([f"{name} against {against}", model, label, len(d), f"{d.mean():+.4f}",
                             f"{d.std(ddof=1) / np.sqrt(len(d)):.4f}", int((d > 0).sum()), int((d < 0).sum())])
    print("\npaired subsets of the selection sets")
    print_table(["try against", "model", "subsets", "n", "mean difference in F", "standard error", "better", "worse"], rows,
                right=[False, False, False, True, True, True, True, True])
    separability(sets, lfw_train)
    rows = []
    ids = np.unique(sets["celeba"]["y"][p1])
    for n_people in (1, 2):
        rng = np.random.default_rng(n_people)
        libs = [("celeba", p1[np.isin(sets["celeba"]["y"][p1], rng.choice(ids, n_people, replace=False))]) for _ in range(10)]
        for key, model in (("v_shipped", "shipped"), ("v_dlib", "dlib imported")):
            rows.append([n_people, model, *(f"{np.mean([f_of(sets, v, key, name) for v in libs]):.3f}"
                                            for name in ("none", CHOSEN, "centre, full mean (prior 0)"))])
    print("\nsmall libraries: all the photos of 1 or 2 CelebA partition 1 identities, mean BCubed F of 10 libraries")
    print_table(["identities", "model", "none", "centre, prior 200", "centre, full mean"], rows, right=[True, False, True, True, True])
    global CAP  # every try reads the cap from the module (plain, hdbscan_with); swept here, then restored
    caps, rows = (0.9, 1.0, 1.1, 1.2, 1.3, 1.4), []
    for key, model in (("v_shipped", "shipped"), ("v_dlib", "dlib imported")):
        row = [model]
        for CAP in caps:
            f = {v: f_of(sets, selection[v], key, CHOSEN) for v in selection}
            row.append(f"{(np.mean([f[v] for v in selection if 'draw' in v]) + f['LFW DevTrain']) / 2:.4f}")
        rows.append(row)
    CAP = 1.2
    print(f"\n{CHOSEN}: the selection objective by max_distance")
    print_table(["model", *(f"max_distance {c}" for c in caps)], rows, right=[False, *[True] * len(caps)])


def separability(sets: dict, photos: np.ndarray) -> None:
    """3. Nearest-face accuracy and genuine acceptance at fixed false accept rates, per model; the
    centring's own time."""
    import time

    from index.groups import centre_on, library_mean
    from index.quality import DEFAULT_MIN_QUALITY

    s = sets["lfw"]
    rows = []
    for key, model in (("v_shipped", "shipped"), ("v_dlib", "dlib imported")):
        vecs, idx = bg.per_photo(s["faces"], key, len(s["paths"]))
        q = np.where(idx >= 0, s["quality"][np.maximum(idx, 0)], np.nan)
        keep = photos[np.isfinite(vecs[photos, 0]) & ~(q[photos] < DEFAULT_MIN_QUALITY)]
        x, y = vecs[keep].astype(np.float64), s["y"][keep]
        has_mate, nn_right, tar = separation(x, y)
        rows.append([model, int(has_mate.sum()), f"{nn_right[has_mate].mean():.3f}", f"{tar[0]:.3f}", f"{tar[1]:.3f}",
                     f"{np.linalg.norm(x.mean(axis=0)):.2f}"])
    print("\nLFW DevTrain people, one face per photo: how well each model separates people")
    print_table(["model", "faces with another photo of their person", "nearest other face is that person",
                 "genuine pairs accepted at FAR 1e-3", "at FAR 1e-4", "length of their mean vector"], rows,
                right=[False, True, True, True, True, True])
    x = np.random.default_rng(0).normal(size=(100_000, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t0 = time.perf_counter()
    centre_on(x, library_mean(x))
    print(f"centring 100,000 128-d vectors (library_mean + centre_on): {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
