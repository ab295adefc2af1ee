"""The size policy: which index kind a library of N faces gets, and how many IVF cells.

kind="auto" picks by size (`choose_kind`): flat below IVF_MIN_FACES, IVF-Flat from there, IVF-PQ from
IVFPQ_MIN_FACES; `choose_kind` walks `kind_table()`, a table of (minimum size, kind). The reasoning and
the numbers behind the constants are beside them. Tests patch the constants on this module.
"""

from __future__ import annotations

import math

# ---- the size policy --------------------------------------------------------------------------
# Measured by bench/bench_facesearch.py (2 cores, 128-d, clustered faces; README "Library index"): a
# `find` (100 pooled vectors, range search at similarity >= 0.5) takes 0.11 s on a flat index of 1e5
# faces and 2.1 s at 1e6; IVF takes 0.02 / 0.18 s (range recall 0.99, a person's own faces 1.00) but
# costs 2.8 / 36 s to build. The IVF index is kept on disk (0.46 s to load at 1e6, and no need to read
# the embeddings out of SQLite), the flat one is rebuilt per question. Below 1e6 faces a flat find is
# cheaper than an IVF rebuild after each scan; from 1e6 on, a kept IVF index answers ~5x faster than
# flat and pays its build once per change of the library.
IVF_MIN_FACES = 1_000_000
# Measured by bench/bench_search_scale.py (2 cores, 128-d clustered faces; README "Search at scale"):
# IVF-Flat keeps 520 bytes per face (float32 vector + int64 id): 5.2 GB at 1e7 faces, and building it
# from the catalogue's N x 512-byte embeddings peaked at 13.3 GB at 1e7 (measured); 2e7 faces (1e7
# photos) would need ~26 GB: not on a 24 GB machine, let alone a 16 GB laptop. IVF-PQ (OPQ, 16
# one-byte codes + 8-byte id) keeps 24.7 B/face at 1e7 (0.25 GB; 2.4 GB at 1e8, extrapolated) and
# loads in 0.2 s, but its similarities are estimates (error sd 0.036): at 1e7, range recall at 0.5 is
# 0.71 (a person's own faces: 1.000) and recall@10 0.54 on the synthetic faces, whose 10 nearest are
# near-ties; `search(rescore=)` re-ranks the top 200 exactly from the stored embeddings: 0.97.
# So IVF-Flat stays up to where its build stops fitting comfortably, and IVF-PQ takes over from 1e7.
IVFPQ_MIN_FACES = 10_000_000

# ---- IVF parameters -----------------------------------------------------------------------------
NLIST_PER_SQRT_N = 4.0  # nlist = 4 sqrt(N): the usual rule, cells of ~sqrt(N)/4 vectors
MIN_TRAIN_PER_LIST = 39  # FAISS warns below 39 training points per centroid; nlist is capped to honour it
DEFAULT_TRAIN_PER_LIST = 39  # k-means sample = 39 * nlist (FAISS would take 256 * nlist): ivf.kmeans_sample_size
KMEANS_ITERATIONS = 20


def check_ivf_args(kind: str, n: int, nlist: int | None, nprobe: int | None, target_recall: float) -> int:
    """The cell count (default `ivf_nlist(n)`) after checking the IVF arguments; ValueError otherwise."""
    nlist = ivf_nlist(n) if nlist is None else int(nlist)
    if n < 1 or nlist < 1 or nlist > n:
        raise ValueError(f"{kind}: need 1 <= nlist <= N, got nlist={nlist} for N={n}")
    if nprobe is not None and not 1 <= int(nprobe) <= nlist:
        raise ValueError(f"{kind}: need 1 <= nprobe <= nlist={nlist}, got {nprobe}")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    return nlist


def kind_table() -> tuple[tuple[int, str], ...]:
    """(smallest N, kind) rows, ascending: flat, IVF-Flat from IVF_MIN_FACES, IVF-PQ from
    IVFPQ_MIN_FACES. Built at call time from the constants so tests can patch them."""
    return ((0, "flat"), (IVF_MIN_FACES, "ivf"), (IVFPQ_MIN_FACES, "ivfpq"))


def choose_kind(n: int) -> str:
    """The index kind for a library of `n` faces: the last row of `kind_table()` whose minimum is <= n."""
    kind = "flat"
    for minimum, name in kind_table():
        if n >= minimum:
            kind = name
    return kind


def ivf_nlist(n: int) -> int:
    """IVF cells for n vectors: round(4 sqrt(n)), capped so that every cell gets >= 39 training points."""
    return max(1, min(int(round(NLIST_PER_SQRT_N * math.sqrt(max(n, 1)))), n // MIN_TRAIN_PER_LIST))


