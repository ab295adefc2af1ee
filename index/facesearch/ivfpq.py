"""kind="ivfpq": `IndexPreTransform(OPQMatrix, IndexIVFPQ)` (inner product), for 1e7-1e8 faces.

Where 512 float32 bytes per face no longer fit, each face is kept as `pq_m` one-byte codes (default 16:
16 bytes, 32x smaller) of its residual to its cell centre, after an OPQ rotation (learnt on the
residuals of the training sample; it balances the variance over the sub-quantisers, which halves the
similarity error on face-like data). Same nlist rule and k-means sample as "ivf"; OPQ and PQ are
trained on (a subsample of) that sample; faces are assigned and encoded in chunks of ADD_CHUNK rows
(bounded extra memory). nprobe is calibrated on the *cells* and what PQ then loses on top is measured
and recorded in the header (calibration.calibrate_ivfpq).

The build, step by step: check the PQ settings -> draw one training sample -> k-means of the cells
(unless centroids are given) -> OPQ rotation on the residuals -> PQ codebooks -> assign + encode every
face -> calibrate nprobe.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

import faiss
import numpy as np

from index.facesearch.calibration import calibrate_ivfpq
from index.facesearch.header import IndexHeader, now_utc
from index.facesearch.ivf import IvfSettings, add_assigned, kmeans_sample_size
from index.facesearch.policy import KMEANS_ITERATIONS, check_ivf_args

log = logging.getLogger(__name__)

DEFAULT_PQ_M = 16  # sub-quantisers = bytes of code per face (at 8 bits); 128-d -> 8 dims each
DEFAULT_PQ_BITS = 8  # 256 centroids per sub-quantiser: FAISS's fast path
DEFAULT_OPQ = True  # rotate before PQ (trained on the sample's residuals)
OPQ_ITERATIONS = 25  # FAISS default 50; measured: no recall gain past ~20 on the synthetic faces
PQ_TRAIN_ROWS = 65_536  # PQ training rows (FAISS itself takes <= 256 per sub-quantiser centroid = 65,536)
OPQ_TRAIN_ROWS = 65_536  # residuals the OPQ rotation is learnt on


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run FAISS single-threaded for a while. OPQ training is thousands of tiny k-means steps (256
    centroids in 8 dimensions); with 2 OpenMP threads on a busy 2-core machine they spend their time in
    barriers (measured: 25-68 s with 2 threads, 15-17 s with 1, for 65,536 rows at 128-d, M=16)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _pq_settings(pq_m: int | None, pq_bits: int | None, opq: bool | None, dim: int) -> tuple[int, int, bool]:
    """(sub-quantisers, bits per code, OPQ or not), defaults filled in; ValueError when unusable."""
    m = DEFAULT_PQ_M if pq_m is None else pq_m
    bits = DEFAULT_PQ_BITS if pq_bits is None else pq_bits
    use_opq = DEFAULT_OPQ if opq is None else opq
    for name, value in (("pq_m", m), ("pq_bits", bits)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"ivfpq: {name} must be an int, got {value!r}")
    m, bits = int(m), int(bits)
    if m < 1 or dim % m:
        raise ValueError(f"ivfpq: pq_m must divide the dimension {dim}, got {m}")
    if not 1 <= bits <= 16:
        raise ValueError(f"ivfpq: pq_bits must be in 1..16, got {bits}")
    if not isinstance(use_opq, (bool, np.bool_)):
        raise ValueError(f"ivfpq: opq must be a bool, got {opq!r}")
    return m, bits, bool(use_opq)


def _kmeans_centroids(x: np.ndarray, perm: np.ndarray, n_train: int, nlist: int, seed: int) -> np.ndarray:
    """(nlist, D) unit centroids: spherical k-means on the first `n_train` rows of the sample `perm`."""
    n, dim = x.shape
    cp = faiss.ClusteringParameters()
    cp.spherical = True  # unit centroids: IP to a centroid is a cosine
    cp.niter = KMEANS_ITERATIONS
    cp.seed = seed
    cp.max_points_per_centroid = max(1, -(-n_train // nlist))
    clus = faiss.Clustering(dim, nlist, cp)
    kmeans_rows = x[np.sort(perm[:n_train])] if n_train < n else x  # (T, D)
    clus.train(kmeans_rows, faiss.IndexFlatIP(dim))
    return faiss.vector_to_array(clus.centroids).reshape(nlist, dim).astype(np.float32)


def _coarse_quantizer(centroids: np.ndarray, sample: np.ndarray, m: int, use_opq: bool,
                      rng: np.random.Generator) -> tuple[faiss.IndexFlatIP, faiss.OPQMatrix | None]:
    """(the coarse quantiser, the OPQ rotation or None). OPQ is learnt on the residuals the PQ will
    encode; a rotation leaves inner products unchanged, so the rotated centroids assign every face to
    the same cell."""
    dim = centroids.shape[1]
    cq = faiss.IndexFlatIP(dim)
    if not use_opq:
        cq.add(centroids)
        return cq, None
    flat_c = faiss.IndexFlatIP(dim)
    flat_c.add(centroids)
    opq_rows = sample[rng.choice(len(sample), min(len(sample), OPQ_TRAIN_ROWS), replace=False)]  # (P, D)
    _, cell = flat_c.search(opq_rows, 1)  # (P, 1)
    transform = faiss.OPQMatrix(dim, m)
    transform.niter = OPQ_ITERATIONS
    with _one_thread():
        transform.train(np.ascontiguousarray(opq_rows - centroids[cell[:, 0]]))
    cq.add(transform.apply(centroids))
    return cq, transform


def _trained_ivfpq(cq: faiss.IndexFlatIP, transform: faiss.OPQMatrix | None, sample: np.ndarray, nlist: int,
                   m: int, bits: int, rng: np.random.Generator) -> faiss.IndexIVFPQ:
    """An empty IVF-PQ index over the trained quantiser `cq`, its PQ trained on residuals of the sample."""
    dim = sample.shape[1]
    ivfpq = faiss.IndexIVFPQ(cq, dim, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
    ivfpq.own_fields = True
    cq.this.disown()
    ivfpq.by_residual = True  # codes of x - centre: finer than codes of x for the same bytes
    # The quantiser is trained (nlist centroids): this trains the PQ only.
    pq_rows = sample[np.sort(rng.choice(len(sample), min(len(sample), PQ_TRAIN_ROWS), replace=False))]
    ivfpq.train(transform.apply(pq_rows) if transform is not None else pq_rows)
    return ivfpq


def _with_rotation(ivfpq: faiss.IndexIVFPQ, transform: faiss.OPQMatrix | None) -> faiss.Index:
    """The index searched: the OPQ rotation in front of the IVF-PQ (which it then owns), or the IVF-PQ."""
    if transform is None:
        return ivfpq
    index = faiss.IndexPreTransform(transform, ivfpq)
    index.own_fields = True
    transform.this.disown()
    ivfpq.this.disown()
    return index


def build_ivfpq(
    x: np.ndarray,  # (N, D)
    ids: np.ndarray,  # (N,)
    key: str,
    settings: IvfSettings,
    *,
    pq_m: int | None,
    pq_bits: int | None,
    opq: bool | None,
) -> tuple[faiss.Index, IndexHeader]:
    """An IVF-PQ index of x under ids and its header (nprobe calibrated unless given, PQ's loss measured)."""
    n, dim = x.shape
    m, bits, use_opq = _pq_settings(pq_m, pq_bits, opq, dim)
    nprobe, seed = settings.nprobe, settings.seed
    nlist = check_ivf_args("ivfpq", n, settings.nlist, nprobe, settings.target_recall)
    if n < 1 << bits:
        raise ValueError(f"ivfpq: {bits}-bit codes need at least {1 << bits} vectors to train on, got {n}")
    rng = np.random.default_rng(seed)
    centroids, assignment = settings.coarse
    seconds: dict[str, float] = {}

    # One random sample: the k-means part (train_per_list per cell, as "ivf") and, for OPQ and PQ, at
    # least PQ_TRAIN_ROWS rows (FAISS trains each 256-centroid sub-quantiser on <= 65,536 of them).
    n_train = kmeans_sample_size(n, nlist, settings.train_per_list)
    n_sample = min(n, max(n_train, PQ_TRAIN_ROWS))
    perm = rng.choice(n, n_sample, replace=False) if n_sample < n else rng.permutation(n)
    sample = x[np.sort(perm)] if n_sample < n else x  # (S, D)
    t0 = time.perf_counter()
    if centroids is None:
        centroids = _kmeans_centroids(x, perm, n_train, nlist, seed)
    else:
        n_train = 0
    seconds["kmeans"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cq, transform = _coarse_quantizer(centroids, sample, m, use_opq, rng)
    seconds["opq"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ivfpq = _trained_ivfpq(cq, transform, sample, nlist, m, bits, rng)
    del sample
    seconds["pq"] = time.perf_counter() - t0

    index = _with_rotation(ivfpq, transform)
    t0 = time.perf_counter()
    seconds["assign"] = add_assigned(ivfpq, transform, x, ids, assignment)
    index.ntotal = ivfpq.ntotal
    seconds["add"] = time.perf_counter() - t0  # assign + rotate + encode

    t0 = time.perf_counter()
    nprobe, calibration = calibrate_ivfpq(index, ivfpq, transform, x, ids, settings.calibrate_similarity,
                                          settings.target_recall, rng, None if nprobe is None else int(nprobe))
    seconds["calibrate"] = time.perf_counter() - t0
    seconds["train"] = seconds["kmeans"] + seconds["opq"] + seconds["pq"]
    calibration["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    calibration["trained_on"] = _trained_on(n_train, n_sample, use_opq)
    ivfpq.nprobe = nprobe
    header = IndexHeader(n=n, dim=dim, kind="ivfpq", key=key, nlist=nlist, nprobe=nprobe, created=now_utc(),
                         calibration=calibration, pq_m=m, pq_bits=bits, opq=use_opq)
    log.info("built IVF-PQ face index: %d x %d, nlist %d, PQ %dx%d%s, nprobe %d %s", n, dim, nlist, m, bits,
             " + OPQ" if use_opq else "", nprobe, calibration)
    return index, header


def _trained_on(n_kmeans: int, n_sample: int, use_opq: bool) -> dict[str, int]:
    """Rows each trained part saw, for the header's record."""
    return {"kmeans": n_kmeans, "opq": min(n_sample, OPQ_TRAIN_ROWS) if use_opq else 0,
            "pq": min(n_sample, PQ_TRAIN_ROWS)}
