"""kind="ivf": `IndexIVFFlat` (inner product, spherical k-means), exact vectors in `nlist` cells.

`nlist` ~ 4 sqrt(N) cells (policy.ivf_nlist), trained on at most `train_per_list * nlist` sampled
vectors; `nprobe` (cells searched per query) is calibrated at build time on the library itself
(calibration.calibrate_nprobe). A given coarse quantiser (`centroids`, and optionally the `assignment`
of every row to its cell) skips k-means (and assigning): `add_assigned` is shared with IVF-PQ.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from index.facesearch.calibration import calibrate_nprobe
from index.facesearch.header import IndexHeader, now_utc
from index.facesearch.policy import KMEANS_ITERATIONS, MIN_TRAIN_PER_LIST, check_ivf_args

log = logging.getLogger(__name__)

ADD_CHUNK = 1 << 20  # rows assigned + encoded per step: 512 MB of float32 temporaries at 128-d

Coarse = tuple[np.ndarray | None, np.ndarray | None]  # (centroids (nlist, D), assignment (N,)), either None


@dataclass(frozen=True)
class IvfSettings:
    """What both IVF kinds are built with (FaceSearch.build's arguments, checked there)."""

    nlist: int | None  # cells; None: policy.ivf_nlist(N)
    nprobe: int | None  # cells searched per query; None: calibrated
    train_per_list: int  # k-means sample per cell
    calibrate_similarity: float  # the range-search bound nprobe is calibrated at
    target_recall: float
    seed: int
    coarse: Coarse = (None, None)  # a given coarse quantiser (skips k-means, and with an assignment, assigning)


def add_assigned(ivf: faiss.IndexIVF, transform: faiss.VectorTransform | None, x: np.ndarray, ids: np.ndarray,
                 assignment: np.ndarray | None) -> float:
    """Add x (N, D) under ids to `ivf`, ADD_CHUNK rows at a time: rotate (OPQ), find each row's cell
    (or take it from `assignment`), encode. Extra memory: a few chunks of float32, not a copy of x.
    Returns the seconds spent finding the cells (the rest is rotating + encoding + copying)."""
    assign_s = 0.0
    for start in range(0, len(x), ADD_CHUNK):
        chunk = x[start : start + ADD_CHUNK]  # (B, D) view
        if transform is not None:
            chunk = np.ascontiguousarray(transform.apply(chunk), dtype=np.float32)
        if assignment is None:
            t0 = time.perf_counter()
            _, cell = ivf.quantizer.search(chunk, 1)  # (B, 1)
            cells = np.ascontiguousarray(cell[:, 0], dtype=np.int64)
            assign_s += time.perf_counter() - t0
        else:
            cells = np.ascontiguousarray(assignment[start : start + ADD_CHUNK], dtype=np.int64)
        chunk_ids = np.ascontiguousarray(ids[start : start + ADD_CHUNK], dtype=np.int64)
        # The arrays are named here: swig_ptr does not keep them alive.
        ivf.add_core(len(chunk), faiss.swig_ptr(chunk), faiss.swig_ptr(chunk_ids), faiss.swig_ptr(cells))
    return assign_s


def kmeans_sample_size(n: int, nlist: int, train_per_list: int) -> int:
    """Rows k-means is trained on. Its cost is niter * sample * nlist * D: we sample ourselves (FAISS
    would take 256 per list, 4x the time at 1e6 faces for no measured gain in recall; see the bench)."""
    return min(n, max(MIN_TRAIN_PER_LIST, int(train_per_list)) * nlist)


def _ivf_flat(dim: int, nlist: int, centroids: np.ndarray | None = None) -> faiss.IndexIVFFlat:
    """An empty IVF-Flat index over an inner-product quantiser (holding `centroids` when given)."""
    quantizer = faiss.IndexFlatIP(dim)
    if centroids is not None:
        quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()  # the IVF index frees it
    return index


def _train_kmeans(index: faiss.IndexIVFFlat, x: np.ndarray, n_train: int, seed: int,
                  rng: np.random.Generator) -> None:
    """Spherical k-means of the cells on `n_train` sampled rows of x (N, D)."""
    n, nlist = len(x), int(index.nlist)
    index.cp.spherical = True  # unit centroids: IP to a centroid is then a cosine too
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.seed = seed
    index.cp.max_points_per_centroid = max(1, -(-n_train // nlist))
    train = x if n_train >= n else x[np.sort(rng.choice(n, n_train, replace=False))]  # (T, D)
    index.train(train)


def build_ivf(
    x: np.ndarray,  # (N, D)
    ids: np.ndarray,  # (N,)
    key: str,
    settings: IvfSettings,
) -> tuple[faiss.IndexIVFFlat, IndexHeader]:
    """An IVF-Flat index of x under ids and its header (nprobe calibrated unless given)."""
    n, dim = x.shape
    nprobe, seed = settings.nprobe, settings.seed
    nlist = check_ivf_args("ivf", n, settings.nlist, nprobe, settings.target_recall)
    rng = np.random.default_rng(seed)
    centroids, assignment = settings.coarse
    index = _ivf_flat(dim, nlist, centroids)
    t0 = time.perf_counter()
    if centroids is not None:  # a given coarse quantiser: no k-means
        n_train = 0
        t1 = t0
        add_assigned(index, None, x, ids, assignment)
    else:
        n_train = kmeans_sample_size(n, nlist, settings.train_per_list)
        _train_kmeans(index, x, n_train, seed, rng)
        t1 = time.perf_counter()
        index.add_with_ids(x, ids)
    t2 = time.perf_counter()

    calibration: dict[str, Any] = {}
    if nprobe is None:
        nprobe, calibration = calibrate_nprobe(index, x, ids, settings.calibrate_similarity, settings.target_recall,
                                               rng)
    else:
        nprobe = int(nprobe)
    # Where the build time went (k-means, assigning every face to a cell, calibration), for the record.
    calibration["seconds"] = {"train": round(t1 - t0, 3), "add": round(t2 - t1, 3),
                              "calibrate": round(time.perf_counter() - t2, 3)}
    index.nprobe = nprobe
    header = IndexHeader(n=n, dim=dim, kind="ivf", key=key, nlist=nlist, nprobe=nprobe, created=now_utc(),
                         calibration=calibration)
    log.info("built IVF face index: %d x %d, nlist %d (trained on %d), nprobe %d %s", n, dim, nlist, n_train,
             nprobe, calibration)
    return index, header
