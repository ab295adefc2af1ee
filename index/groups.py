"""Group faces that match nobody enrolled into candidate people (numpy + FAISS; no torch).

`faceverify people` hands over the unit-norm embeddings of the unmatched faces; `group_faces` returns
one label per face: groups numbered 0, 1, 2, ... largest first (ties: the group whose smallest member
index is lower comes first), -1 = ungrouped. A group with fewer than `min_faces` members is ungrouped.
This is what Immich and PhotoPrism do (a density-based clustering with a "minimum faces" and a
"maximum distance"); the distance is the Euclidean distance between unit vectors, as everywhere in
the project (d^2 = 2 - 2 cos).

Methods:

- "graph":    connected components of the range graph "d <= max_distance" (an exact FAISS
              `IndexFlatL2` range search; FAISS L2 works on squared distances, so the radius is
              max_distance**2). Single linkage cut at max_distance: one stray edge between two people
              merges them ("chaining"), and the number of stray edges grows with the library.
- "whispers": Chinese whispers (Biemann 2006) over the same graph, self loops included, unweighted,
              ties to the smallest label: dlib's `chinese_whispers_clustering`, which face_recognition's
              users run. Sweeps in a seeded random order until one changes nothing (at most 100).
              A single bridge edge no longer merges two dense groups; a dense web of them still does.
- "dbscan":   scikit-learn's DBSCAN(eps=max_distance, min_samples=min_faces, metric="euclidean"): only
              faces with >= min_faces neighbours (themselves included) grow a group; min_faces=2 is
              exactly "graph".
- "hdbscan":  HDBSCAN (Campello et al. 2013; scikit-learn's, min_cluster_size=max(2, min_faces),
              min_samples the same): clusters that persist over a range of densities, no single cut.
              Run on the exact k-NN graph (FAISS, k=HDBSCAN_NEIGHBOURS, sparse precomputed distances,
              per connected component), not the dense feature matrix: the same labels as scikit-learn's
              HDBSCAN on the raw vectors for min_faces=2 (identical on all 3,061 LFW faces for both
              models; tests/test_groups.py checks it), while scikit-learn's own search is quadratic in
              time: 17 s for 10,000 faces and 70 s for 20,000, against 0.4 s, 1.2 s and 5.6 s here for
              10,000, 20,000 and 50,000 (2 cores; LFW vectors resampled with noise). For min_faces >= 3 the two can differ in which of two clusters a
              border face joins (equal mutual-reachability distances, broken in a different order by
              the two spanning-tree routines). HDBSCAN has no distance bound and attaches even a
              far-off face to some cluster, so max_distance is a cap applied afterwards: a face with no
              member of its cluster within max_distance among its k nearest neighbours is ungrouped.
              (cluster_selection_epsilon is not used: any value > 0 raises TypeError under NumPy 2,
              scikit-learn issue #33219.)

"dbscan", "hdbscan" and so "auto" need scikit-learn (imported only when used; without it they raise
ModuleNotFoundError saying so); "graph" and "whispers" need numpy and FAISS only.

"auto" is AUTO_METHOD = "hdbscan", chosen by measurement (bench/bench_groups.py): each method's
max_distance chosen on the CelebA selection set (3 photo-library-like draws of the 103 identities of
partitions 1+2, 2..8 photos each; grid 0.10..1.40 step 0.02; min_faces 2), then BCubed F on LFW
(3,062 photos of the 1,165 people with >= 2 photos), per model:

    method                  dlib imported       shipped            time to group 3,061 faces
    hdbscan                 0.925 (d 0.42)      0.777 (d 1.02)     0.08-0.15 s
    graph                   0.869 (d 0.34)      0.482 (d 0.84)     0.02-0.05 s
    whispers                0.840 (d 0.36)      0.368 (d 0.90)     0.04-0.10 s
    dbscan, min_faces 3     0.773 (d 0.34)      0.478 (d 0.84)     0.03-0.08 s
    baseline: face_recognition's vectors + dlib chinese_whispers 0.5: 0.898, 1.2 s

(The shipped column is not what today's bench measures for the shipped model b22a5359a93bfd59 with the
same hdbscan settings, d 1.02, min_faces 2: 0.880 on the same 3,062 photos (docs/people.md); the 0.777
was not reproduced.)

hdbscan is best for both models and, above all, the only method that survives the move from the
selection set to a bigger library: graph and whispers have a sharp optimum that moves to shorter
distances as the number of other people grows (103 identities in the selection set, 1,165 on LFW; on
LFW whispers' best F for the shipped model would be 0.72 at d 0.75, the selection set's optimum gives
0.37), while HDBSCAN's F is flat once max_distance is past the genuine distances (dlib: 0.925 from 0.40
to 1.40; shipped: 0.777 from 0.90 up), since the cap then rarely acts.

(The method table above was measured by bench_groups.py as of commit 810a8a7, which tuned every
method; the bench now compares `people`'s settings before and after issue 30 instead.)

Issue 30 retuned `faceverify people` for the shipped model on the selection sets (3 library-like draws
of CelebA partition 1, 2..8 photos per identity, and the LFW DevTrain people; each set weighs half):
DEFAULT_MAX_DISTANCE 1.2 (the smallest of 1.02 / 1.1 / 1.2 / 1.4 reaching the best F; from 1.2 up the
cap no longer acts), HDBSCAN_MIN_SAMPLES = min_cluster_size and HDBSCAN_SELECTION "eom" (min_samples 1
or 3 and "leaf" all scored lower), min_faces 2 in the bench. The second pass (merge_close_groups,
groups whose pooled vectors lie within DEFAULT_MERGE_DISTANCE) raises CelebA's recall but costs more
precision on LFW's 1,165 people (DevTrain F 0.891 -> 0.882 at 0.7, 0.846 at 0.8), so it is off (0). Two
further passes tried on the same sets and left out for the same reason: grouping the leftover faces
among themselves within d, and attaching a leftover face to the group of its nearest grouped
neighbour within d (both at d 0.6..1.0: selection F at best equal, LFW F lower). On LFW (3,062
photos), shipped model: F 0.880 before, 0.886 after (with the quality gate of index.quality); dlib's
imported network 0.925 -> 0.929; face_recognition's chinese whispers 0.898 (docs/people.md).

Issue 30's second round: `faceverify people` groups the vectors less the library's mean (library_mean
over every indexed face of the model, shrunk by N / (N + CENTRE_PRIOR_FACES), then centre_on;
DEFAULT_CENTRE). Shipped model on the 3,062 LFW photos: F 0.886 -> 0.892 (baseline 0.898: still
short); dlib's imported network 0.929 -> 0.931; CelebA partition 2 lower for both (0.633 -> 0.617,
0.787 -> 0.773). Whitening, rank-based distances (rank-order, k-reciprocal, local scaling) and
centring + merging were measured and left out: bench/bench_group_tries.py, docs/people.md.

Cost: hdbscan: a brute-force k-NN search, O(N^2 D) in FAISS, then near-linear; graph/whispers: a
brute-force range search, O(N^2 D), and whispers O(sweeps * edges) in Python.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)

METHODS = ("graph", "whispers", "dbscan", "hdbscan")
AUTO_METHOD = "hdbscan"
DEFAULT_MAX_DISTANCE: float = 1.2
DEFAULT_MERGE_DISTANCE: float = 0.0  # merge_close_groups' distance in `faceverify people`; 0 = no second pass
DEFAULT_CENTRE = True  # `faceverify people` subtracts the library's mean vector before grouping (centre_on)
CENTRE_PRIOR_FACES: float = 200.0  # library_mean's shrinkage: the mean weighs N / (N + this)
WHISPERS_SWEEPS = 100  # upper bound; a sweep that changes no label ends it earlier
WHISPERS_SEED = 0
HDBSCAN_NEIGHBOURS = 16  # k of the k-NN graph HDBSCAN runs on
HDBSCAN_MIN_SAMPLES: int | None = None  # None: min_cluster_size (scikit-learn's default)
HDBSCAN_SELECTION = "eom"  # scikit-learn's cluster_selection_method: "eom" or "leaf"


def group_faces(vectors: np.ndarray, *, max_distance: float, min_faces: int = 2, method: str = "auto",
                min_samples: int | None = None, selection: str | None = None) -> np.ndarray:
    """(N,) int64 group labels of `vectors` ((N, D) float32 unit rows): 0, 1, ... largest group first,
    -1 = ungrouped (in no group of >= min_faces faces)."""
    x = _check(vectors)
    if not (np.isfinite(max_distance) and max_distance > 0):
        raise ValueError(f"max_distance must be a positive number, got {max_distance!r}")
    if int(min_faces) < 1:
        raise ValueError(f"min_faces must be >= 1, got {min_faces!r}")
    name = AUTO_METHOD if method == "auto" else method
    if name not in METHODS:
        raise ValueError(f"unknown grouping method {method!r}; choose one of auto, {', '.join(METHODS)}")
    n = len(x)
    if n == 0:
        return np.zeros(0, np.int64)
    t0 = time.perf_counter()
    if name in ("graph", "whispers"):
        src, dst = range_edges(x, max_distance)
        raw = connected_components(n, src, dst) if name == "graph" else chinese_whispers(n, src, dst)
    elif name == "dbscan":
        raw = _dbscan(x, max_distance, int(min_faces))
    else:
        raw = _hdbscan(x, max_distance, int(min_faces), min_samples=min_samples, selection=selection)
    labels = relabel(raw, int(min_faces))
    log.info("grouped %d faces (%s, max_distance %.3f, min_faces %d): %d groups, %d ungrouped, %.2f s",
             n, name, max_distance, min_faces, int(labels.max()) + 1 if n else 0, int((labels < 0).sum()),
             time.perf_counter() - t0)
    return labels


def library_mean(vectors: np.ndarray, prior_faces: float = CENTRE_PRIOR_FACES) -> np.ndarray:
    """(D,) float32 offset for centre_on: the mean of a library's face vectors (N, D), shrunk toward 0 by
    N / (N + prior_faces). The mean of a few faces is their person rather than the library's shared
    direction (the mean of 2 faces of one person, subtracted, leaves them opposite), so a small
    library is hardly centred; a library of thousands almost fully."""
    x = np.asarray(vectors, np.float64)
    if x.ndim != 2 or len(x) == 0:
        return np.zeros(x.shape[-1] if x.ndim == 2 else 0, np.float32)
    n = len(x)
    return (x.mean(axis=0) * (n / (n + float(prior_faces)))).astype(np.float32)


def centre_on(vectors: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(N, D) float32: the unit rows of vectors - mean (a row equal to `mean` stays 0). Domain
    normalisation before grouping (the mean of a library's embeddings is a direction every face shares,
    not identity; subtracting it spreads apart the faces that crowd around it, the "hubs" that are
    near everyone: Suzuki et al. 2013, centering against hubness). Distances change scale, so
    max_distance holds in the centred space; measured: docs/people.md."""
    x = np.asarray(vectors, np.float32) - np.asarray(mean, np.float32)[None, :]  # (N, D)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def group_centres(vectors: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group ids (G,), unit centres (G, D)): each group's pooled vector (the normalised mean of its
    members; -1 is no group)."""
    x = np.asarray(vectors, np.float32)
    ids = np.unique(labels[labels >= 0])
    sums = np.zeros((len(ids), x.shape[1]), np.float64)  # (G, D)
    np.add.at(sums, np.searchsorted(ids, labels[labels >= 0]), x[labels >= 0])
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return ids, (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def group_spread(vectors: np.ndarray) -> float:
    """Mean Euclidean distance of one group's unit vectors (M, D) from their pooled centre: a mixed
    group (two people) has a larger one than a group of one person."""
    x = np.asarray(vectors, np.float64)
    centre = x.mean(axis=0)
    centre /= max(float(np.linalg.norm(centre)), 1e-12)
    return float(np.linalg.norm(x - centre, axis=1).mean())


def merge_close_groups(vectors: np.ndarray, labels: np.ndarray, merge_distance: float) -> np.ndarray:
    """A second pass over a grouping (as Immich's incremental clustering does): groups whose pooled
    vectors (group_centres) lie within `merge_distance` of each other become one (transitively);
    returns the labels renumbered largest first, -1 kept."""
    labels = np.asarray(labels, np.int64)
    if not (labels >= 0).any():
        return labels.copy()
    ids, centres = group_centres(vectors, labels)
    src, dst = range_edges(centres, merge_distance) if len(ids) > 1 else (np.zeros(0, np.int64),) * 2
    comp = connected_components(len(ids), src, dst)  # (G,) merged group of each group
    raw = labels.copy()
    grouped = labels >= 0
    raw[grouped] = comp[np.searchsorted(ids, labels[grouped])]
    out = np.full(len(labels), -1, np.int64)
    out[grouped] = relabel(raw[grouped], 1)
    if len(src):
        log.info("merged %d groups into %d (pooled vectors within %.3f)", len(ids), int(out.max()) + 1, merge_distance)
    return out


def _check(vectors: np.ndarray) -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim != 2:
        raise ValueError(f"vectors must be a 2-D (N, D) array, got shape {x.shape}")
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"vectors contain NaN or inf ({int((~np.isfinite(x)).any(axis=1).sum())} of {len(x)} rows)")
    return np.ascontiguousarray(x, dtype=np.float32)  # (N, D); FAISS wants C-contiguous float32


def range_edges(x: np.ndarray, max_distance: float, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) int64 of every ordered pair i != j with ||x_i - x_j|| <= max_distance (both
    directions), by an exact FAISS range search. Queries go in chunks to bound FAISS's result buffers."""
    import faiss

    n, d = x.shape
    index = faiss.IndexFlatL2(d)
    index.add(x)
    r2 = float(max_distance) ** 2
    # FAISS keeps d2 < radius (strict) on squared L2; widen by one ulp, then apply "<=" here.
    radius = float(np.nextafter(np.float32(r2), np.float32(np.inf)))
    srcs, dsts = [], []
    for start in range(0, n, chunk):
        lims, dist2, ids = index.range_search(x[start:start + chunk], radius)  # (q+1,), (E,), (E,)
        q = np.repeat(np.arange(start, start + len(lims) - 1, dtype=np.int64), np.diff(lims).astype(np.int64))  # (E,)
        keep = (dist2 <= r2) & (ids != q)
        srcs.append(q[keep])
        dsts.append(ids[keep].astype(np.int64))
    return np.concatenate(srcs), np.concatenate(dsts)


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(n,) int64 component id of each node (the smallest node index in its component), vectorised:
    hook each root onto the smaller root across an edge, then pointer-jump to the roots; every round
    at least halves the components that still have an edge between them, so O(log n) rounds."""
    parent = np.arange(n, dtype=np.int64)
    if len(src) == 0:
        return parent
    while True:
        ps, pd = parent[src], parent[dst]  # roots (parent is fully compressed here)
        cross = ps != pd
        if not cross.any():
            return parent
        lo, hi = np.minimum(ps[cross], pd[cross]), np.maximum(ps[cross], pd[cross])
        np.minimum.at(parent, hi, lo)  # parent[i] <= i always holds, so no cycles
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt


def chinese_whispers(n: int, src: np.ndarray, dst: np.ndarray, sweeps: int = WHISPERS_SWEEPS,
                     seed: int = WHISPERS_SEED) -> np.ndarray:
    """(n,) int64 labels by Chinese whispers over the undirected graph (src, dst), each node counting
    itself too (dlib's self loops). On a tie a node takes the smallest tied label, as dlib does (without
    that, the first sweep, where every label counts 1, would change nothing); the visiting order is a
    seeded permutation per sweep, so the result depends only on `seed`."""
    order = np.argsort(src, kind="stable")
    nbr = dst[order]  # (E,) neighbours grouped by source
    starts = np.searchsorted(src[order], np.arange(n + 1))  # (n+1,) CSR offsets
    labels = np.arange(n, dtype=np.int64)
    active = np.flatnonzero(np.diff(starts) > 0)  # isolated nodes never change
    rng = np.random.default_rng(seed)
    lab = labels.tolist()  # plain lists: per-node work is tiny, numpy call overhead would dominate
    adj = {int(i): nbr[starts[i]:starts[i + 1]].tolist() for i in active}
    for sweep in range(sweeps):
        changed = 0
        for i in rng.permutation(active).tolist():
            counts: dict[int, int] = {lab[i]: 1}  # the self loop
            for j in adj[i]:
                lj = lab[j]
                counts[lj] = counts.get(lj, 0) + 1
            best = max(counts.values())
            new = min(k for k, c in counts.items() if c == best)
            if new != lab[i]:
                lab[i] = new
                changed += 1
        if not changed:
            log.debug("chinese whispers converged after %d sweeps", sweep + 1)
            break
    else:
        log.debug("chinese whispers stopped after %d sweeps without converging", sweeps)
    return np.asarray(lab, np.int64)


def _sklearn_cluster(method: str):  # -> the sklearn.cluster module
    try:
        import sklearn.cluster
    except ImportError as exc:  # one clear line instead of a traceback into the grouping
        raise ModuleNotFoundError(f"grouping method {method!r} needs scikit-learn (pip install scikit-learn); "
                                  "method='whispers' or 'graph' work without it") from exc
    return sklearn.cluster


def _dbscan(x: np.ndarray, max_distance: float, min_faces: int) -> np.ndarray:
    DBSCAN = _sklearn_cluster("dbscan").DBSCAN

    # noise (-1) becomes singletons, which relabel() then ungroups
    raw = DBSCAN(eps=float(max_distance), min_samples=min_faces, metric="euclidean", algorithm="brute").fit_predict(x)
    return _noise_to_singletons(raw)


def _hdbscan(x: np.ndarray, max_distance: float, min_faces: int, neighbours: int = HDBSCAN_NEIGHBOURS,
             min_samples: int | None = None, selection: str | None = None) -> np.ndarray:
    """HDBSCAN over the exact k-NN graph (FAISS), then the max_distance cap (see the module docstring).
    `min_samples` (default: min_cluster_size, scikit-learn's; HDBSCAN_MIN_SAMPLES when set) counts the
    face itself; `selection` is scikit-learn's cluster_selection_method (default HDBSCAN_SELECTION)."""
    _sklearn_cluster("hdbscan")  # the clear line when scikit-learn is missing, before any FAISS work
    n = len(x)
    size = max(2, min_faces)  # min_cluster_size
    if n < size:
        return np.arange(n, dtype=np.int64)  # no group possible
    # sklearn's default min_samples = min_cluster_size counts the point itself; a sparse precomputed
    # graph stores no self distance, so the same core distance is the (size - 1)-th stored neighbour.
    if min_samples is None:
        min_samples = HDBSCAN_MIN_SAMPLES or size
    min_samples = max(1, int(min_samples) - 1)
    selection = selection or HDBSCAN_SELECTION
    k = min(n - 1, max(neighbours, min_samples))  # every row then holds >= min_samples entries
    src, dst, dist = knn_edges(x, k)
    return hdbscan_on_edges(n, src, dst, dist, size, min_samples, selection, cap_distance=dist, max_distance=max_distance)


def hdbscan_on_edges(n: int, src: np.ndarray, dst: np.ndarray, dist: np.ndarray, min_cluster_size: int,
                     min_samples: int, selection: str, *, cap_distance: np.ndarray, max_distance: float) -> np.ndarray:
    """(n,) raw cluster ids (noise: singletons) of scikit-learn's HDBSCAN over the undirected edges
    (src, dst) (each pair once) weighted by `dist`; `min_samples` counts stored neighbours (not the
    face itself). Then the cap: a member with no other member of its cluster joined by an edge whose
    `cap_distance` (E,) is <= max_distance leaves the cluster. `_hdbscan` passes the Euclidean k-NN
    distances as both; bench/bench_group_tries.py passes rank-based distances as `dist`."""
    HDBSCAN = _sklearn_cluster("hdbscan").HDBSCAN
    from scipy import sparse  # a scikit-learn dependency
    from scipy.sparse import csgraph

    graph = sparse.coo_matrix((np.r_[dist, dist], (np.r_[src, dst], np.r_[dst, src])), shape=(n, n)).tocsr()
    # HDBSCAN refuses a disconnected sparse graph: run it per component (components join only at
    # "infinity", above any max_distance)
    n_comp, comp = csgraph.connected_components(graph, directed=False)
    raw = np.full(n, -1, np.int64)
    next_id = 0
    for c in range(n_comp):
        members = np.flatnonzero(comp == c)  # >= k + 1 >= 2 of them: each row's k neighbours are inside
        lab = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, metric="precomputed",
                      cluster_selection_method=selection, copy=True).fit_predict(graph[members][:, members])
        ok = lab >= 0
        raw[members[ok]] = lab[ok] + next_id
        next_id += int(lab.max()) + 1 if ok.any() else 0
    # the cap: a member with no other member of its cluster among its k nearest neighbours within
    # max_distance leaves the cluster (HDBSCAN itself has no distance bound)
    close = (cap_distance <= max_distance) & (raw[src] == raw[dst]) & (raw[src] >= 0)
    has_mate = np.zeros(n, bool)
    has_mate[src[close]] = True
    has_mate[dst[close]] = True
    raw[~has_mate] = -1
    return _noise_to_singletons(raw)


def knn_edges(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected k-NN edges (src < dst, each pair once) with their Euclidean distance, floored at 1e-9
    so that duplicate faces stay stored entries in a sparse matrix. Exact (IndexFlatL2)."""
    import faiss

    n = len(x)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    d2, ids = index.search(x, k + 1)  # (N, k+1) squared distances; row i usually holds i itself
    src = np.repeat(np.arange(n, dtype=np.int64), k + 1)
    dst = ids.reshape(-1).astype(np.int64)
    dist = np.sqrt(np.maximum(d2.reshape(-1), 0)).astype(np.float64)
    keep = (dst >= 0) & (dst != src)
    a, b, dist = np.minimum(src, dst)[keep], np.maximum(src, dst)[keep], np.maximum(dist[keep], 1e-9)
    _, first = np.unique(a * n + b, return_index=True)  # i->j and j->i are one edge
    return a[first], b[first], dist[first]


def _noise_to_singletons(raw: np.ndarray) -> np.ndarray:
    out = np.asarray(raw, np.int64).copy()
    noise = out < 0
    out[noise] = out.max(initial=-1) + 1 + np.arange(int(noise.sum()))
    return out


def relabel(raw: np.ndarray, min_faces: int) -> np.ndarray:
    """Arbitrary cluster ids (N,) -> 0, 1, ... by size descending (ties: smallest member index first);
    clusters with fewer than min_faces members -> -1."""
    uniq, first, inverse, sizes = np.unique(raw, return_index=True, return_inverse=True, return_counts=True)
    rank = np.lexsort((first, -sizes))  # cluster order: size desc, then first member
    new = np.full(len(uniq), -1, np.int64)
    big = rank[sizes[rank] >= max(1, min_faces)]
    new[big] = np.arange(len(big))
    return new[inverse.reshape(-1)]


def bcubed(true_labels: np.ndarray, pred_labels: np.ndarray) -> tuple[float, float, float]:
    """BCubed (precision, recall, F) of a clustering (Bagga & Baldwin 1998; Amigo et al. 2009), each
    averaged over items: precision(i) = |pred(i) & true(i)| / |pred(i)|, recall(i) = the same over
    |true(i)|, F = 2PR / (P + R). A -1 in pred_labels is a singleton cluster of its own; every value in
    true_labels, -1 included, is a class."""
    t = np.asarray(true_labels).reshape(-1)
    p = np.asarray(pred_labels, np.int64).reshape(-1)
    if len(t) != len(p):
        raise ValueError(f"true_labels and pred_labels differ in length ({len(t)} != {len(p)})")
    if len(t) == 0:
        raise ValueError("bcubed of an empty labelling")
    p = p.copy()
    alone = p < 0
    p[alone] = p.max(initial=-1) + 1 + np.arange(int(alone.sum()))  # distinct ids for the singletons
    _, ti, t_size = np.unique(t, return_inverse=True, return_counts=True)
    _, pi, p_size = np.unique(p, return_inverse=True, return_counts=True)
    ti, pi = ti.reshape(-1), pi.reshape(-1)
    _, pair, both = np.unique(pi * len(t_size) + ti, return_inverse=True, return_counts=True)
    overlap = both[pair.reshape(-1)]  # (N,) |pred(i) & true(i)|
    precision = float(np.mean(overlap / p_size[pi]))
    recall = float(np.mean(overlap / t_size[ti]))
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f
