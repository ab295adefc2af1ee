"""Range and k-NN search over every face of a photo library, on FAISS (numpy in, numpy out; no torch).

The catalogue holds every face of the library (1e6-1e7 of them) as an L2-normalised float32 vector with
an int64 face id. `find NAME` asks, for an enrolled person's few to few hundred pooled vectors, for every
library face whose cosine similarity to any of them is >= a bound (`range_search`); grouping asks for
the k nearest faces (`search`). Both indexes are inner-product ones over unit vectors, so inner product
== cosine similarity.

kind="flat": `IndexIDMap(IndexFlatIP)`, exact. Nothing to train: "building" is copying the vectors.
             (IndexIDMap, not IDMap2: IDMap2 rebuilds a hash map of all N ids on every load, which is
             only needed to reconstruct a vector by id, and nothing here does.)
kind="ivf":  `IndexIVFFlat` (inner product, spherical k-means), `nlist` ~ 4 sqrt(N) cells, trained on
             at most `train_per_list * nlist` sampled vectors; `nprobe` (cells searched per query) is
             calibrated at build time on the library itself: the smallest nprobe whose range-search
             recall, for a sample of the library's own vectors as queries at `calibrate_similarity`,
             is >= `target_recall` (measured against an exact numpy search of the same sample).

kind="ivfpq": `IndexPreTransform(OPQMatrix, IndexIVFPQ)` (inner product), for 1e7-1e8 faces where
             512 float32 bytes per face no longer fit: each face is kept as `pq_m` one-byte codes
             (default 16: 16 bytes, 32x smaller) of its residual to its cell centre, after an OPQ
             rotation (learnt on the residuals of the training sample; it balances the variance over
             the sub-quantisers, which halves the similarity error on face-like data). Same nlist rule
             and k-means sample as "ivf"; OPQ and PQ are trained on (a subsample of) that sample;
             faces are assigned and encoded in chunks of ADD_CHUNK rows (bounded extra memory).
             nprobe is calibrated on the *cells*: the smallest nprobe whose probed cells hold
             `target_recall` of the exact results (range pairs at `calibrate_similarity`, as for
             "ivf"), computed exactly from the cell ranks; what PQ then loses on top is measured and
             recorded in the header's calibration (end-to-end range recall, recall@10, similarity
             error). SIMILARITIES ARE APPROXIMATE (error sd ~0.03 at M=16 on face-like data):
             `range_search` keeps a face whose *estimated* similarity is >= the bound, so it can miss a
             face just above the bound and return one just below; `search` can order close neighbours
             wrongly. A caller that needs exact answers re-scores the candidates from the stored
             embeddings (the library's SQLite) with a lowered bound / a larger k: `search(q, k,
             rescore=ids -> vectors)` does that for k-NN (the index's top 20 k re-ranked exactly), so
             RAM keeps only the codes (range search is not re-scored here). Memory: pq_m bytes of
             code + 8 bytes of int64 id per face in the inverted lists, plus the centroids (nlist x D x 4).

kind="auto" picks by size (`choose_kind`): flat below IVF_MIN_FACES, IVF from there, IVF-PQ from
IVFPQ_MIN_FACES. The reasoning and the numbers behind the constants are beside them. `choose_kind`
walks a table of (minimum size, kind).

A rebuild may reuse a coarse quantiser: `build(..., centroids=C)` skips k-means, and `assignment=`
(the cell of every row under C, e.g. `other.cells()` for the same rows) also skips assigning the
faces (bench/bench_search_scale.py builds IVF-Flat and two IVF-PQ variants on one k-means this way).

Input vectors are validated, not repaired: a wrong shape, a NaN/inf, or a row whose norm is not 1
within NORM_TOLERANCE is a ValueError. A non-unit row means the caller handed over something other
than the catalogue's normalised embeddings (a bug worth surfacing), and silently rescaling would also
copy the whole library (512 MB at 1e6 faces). `unit_rows()` is there for callers that want to normalise.

On disk an index is one file (written atomically: a 0600 temp file beside it, fsync, os.replace):

    magic b"FVFSIDX\\0" | uint32 header length | JSON header | FAISS index bytes | trailer
    header:  format_version, n, dim, kind, key, metric, nlist, nprobe, created, calibration
             (+ pq_m, pq_bits, opq for kind "ivfpq": an addition, so format_version stays 1 and every
             older file loads; code older than "ivfpq" refuses such a file in one line as of an
             unknown kind)
    trailer: uint64 payload length, uint32 CRC-32 of the payload, b"FVFE"

`read_header` / `read_key` read only the first few hundred bytes, so a caller can tell a stale file
(the catalogue puts model fingerprint + a generation number into `key`) without loading N vectors.
`load` streams the payload into FAISS (no second in-memory copy) and checks its length and CRC, so a
truncated, corrupt or foreign file is a `FaceSearchError` (a ValueError) with one line naming it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import faiss
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("flat", "ivf", "ivfpq")
IVF_KINDS = ("ivf", "ivfpq")

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
DEFAULT_TRAIN_PER_LIST = 39  # k-means sample = 39 * nlist (FAISS would take 256 * nlist): see the note above
KMEANS_ITERATIONS = 20
DEFAULT_TARGET_RECALL = 0.99
DEFAULT_CALIBRATE_SIMILARITY = 0.5  # the `find` bound the product uses ~ the model's threshold
CALIBRATION_QUERIES = 200  # library vectors used as queries when calibrating nprobe
MIN_CALIBRATION_PAIRS = 50  # fewer range pairs than this: calibrate on k-NN recall@10 instead
CALIBRATION_K = 10

# ---- IVF-PQ parameters -----------------------------------------------------------------------------
DEFAULT_PQ_M = 16  # sub-quantisers = bytes of code per face (at 8 bits); 128-d -> 8 dims each
DEFAULT_PQ_BITS = 8  # 256 centroids per sub-quantiser: FAISS's fast path
DEFAULT_OPQ = True  # rotate before PQ (trained on the sample's residuals)
OPQ_ITERATIONS = 25  # FAISS default 50; measured: no recall gain past ~20 on the synthetic faces
ADD_CHUNK = 1 << 20  # rows assigned + encoded per step: 512 MB of float32 temporaries at 128-d
PQ_TRAIN_ROWS = 65_536  # PQ training rows (FAISS itself takes <= 256 per sub-quantiser centroid = 65,536)
OPQ_TRAIN_ROWS = 65_536  # residuals the OPQ rotation is learnt on

# search(rescore=): candidates re-scored per neighbour wanted. Top 200 for k=10: at 1e7 faces the 16-byte
# codes give recall@10 0.54 raw, 0.94 re-scored from the top 100, 0.97 from the top 200 (the bench's sweep).
RESCORE_SHORTLIST_PER_K = 20
_RESCORE_BLOCK = 1024  # queries per gathered (B, K', D) block when re-scoring

NORM_TOLERANCE = 1e-4  # |norm - 1| allowed; float32 normalisation leaves ~1e-7
_EXACT_BLOCK = 65_536  # library rows per matrix product in the exact calibration search

_MAGIC = b"FVFSIDX\x00"
_END = b"FVFE"
_PREFIX = struct.Struct("<8sI")  # magic, header length
_TRAILER = struct.Struct("<QI4s")  # payload length, crc32, end magic
_MAX_HEADER = 1 << 20
_READ_CHUNK = 1 << 22


class FaceSearchError(ValueError):
    """A face-search file that cannot be used (missing, corrupt, foreign, wrong version)."""


class StaleIndexError(FaceSearchError):
    """The file's key is not the one the caller expected (built from another model or generation)."""


@dataclass(frozen=True)
class IndexHeader:
    """What a saved index says about itself (read without loading the vectors)."""

    n: int
    dim: int
    kind: str
    key: str
    nlist: int | None = None
    nprobe: int | None = None
    created: str = ""
    format_version: int = FORMAT_VERSION
    calibration: dict[str, Any] = field(default_factory=dict)
    pq_m: int | None = None  # ivfpq only: sub-quantisers (bytes of code per face at 8 bits)
    pq_bits: int | None = None  # ivfpq only: bits per sub-quantiser code
    opq: bool | None = None  # ivfpq only: an OPQ rotation precedes the IVF-PQ

    def to_json(self) -> dict[str, Any]:
        obj = {
            "format_version": self.format_version,
            "n": self.n,
            "dim": self.dim,
            "kind": self.kind,
            "key": self.key,
            "metric": "ip",
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "created": self.created,
            "calibration": self.calibration,
        }
        if self.kind == "ivfpq":  # flat / ivf headers stay exactly what they were
            obj.update(pq_m=self.pq_m, pq_bits=self.pq_bits, opq=self.opq)
        return obj

    @property
    def code_bytes(self) -> float | None:
        """Bytes of PQ code per face (ivfpq), not counting the 8-byte id every IVF list keeps."""
        return None if self.pq_m is None or self.pq_bits is None else self.pq_m * self.pq_bits / 8


# ------------------------------------------------------------------------------------------------
# The size policy and input checks
# ------------------------------------------------------------------------------------------------


def _check_ivf_args(kind: str, n: int, nlist: int | None, nprobe: int | None, target_recall: float) -> int:
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


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a float32 copy); for callers whose vectors are not normalised yet."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)  # float64: no overflow
    if np.any(norms < 1e-12):
        raise ValueError("unit_rows: a row has zero norm")
    return (x / norms).astype(np.float32)


def _unit_matrix(x: Any, what: str, dim: int | None = None) -> np.ndarray:
    """Validate (N, D) finite unit float vectors; return them float32 C-contiguous (no copy if already)."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what}: expected a float array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] < 1 or (dim is not None and arr.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"{what}: expected shape {want}, got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)  # (N,)
    if not finite.all():
        raise ValueError(f"{what}: row {int(np.flatnonzero(~finite)[0])} has NaN or inf")
    sq = np.einsum("ij,ij->i", arr, arr, dtype=np.float64)  # (N,) squared norms
    bad = np.abs(np.sqrt(sq) - 1.0) > NORM_TOLERANCE
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what}: row {row} has norm {math.sqrt(sq[row]):.6g}, expected unit vectors "
                         f"(tolerance {NORM_TOLERANCE}; normalise them first, e.g. index.facesearch.unit_rows)")
    return arr


def _check_ids(ids: Any, n: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"ids: expected shape ({n},) to match the vectors, got {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids: expected integers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if n and arr.min() < 0:
        raise ValueError(f"ids: negative id {int(arr.min())} (-1 marks a missing neighbour)")
    if n and len(np.unique(arr)) != n:
        raise ValueError("ids: duplicated ids")
    return arr


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# Exact search (numpy), used to calibrate IVF's nprobe
# ------------------------------------------------------------------------------------------------


def _exact_range_pairs(vectors: np.ndarray, queries: np.ndarray, min_similarity: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (query row, library row) with similarity >= min_similarity, by blocked matrix products."""
    qs, rows = [], []
    for start in range(0, len(vectors), _EXACT_BLOCK):
        sims = queries @ vectors[start : start + _EXACT_BLOCK].T  # (Q, B)
        q, r = np.nonzero(sims >= np.float32(min_similarity))
        qs.append(q)
        rows.append(r + start)
    return np.concatenate(qs), np.concatenate(rows)


def _exact_topk_rows(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) library rows of the k most similar vectors (unordered), blocked over the library."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_r = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), _EXACT_BLOCK):
        sims = queries @ vectors[start : start + _EXACT_BLOCK].T  # (Q, B)
        s = np.concatenate([best_s, sims], axis=1)
        r = np.concatenate([best_r, np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)], axis=1)
        keep = np.argpartition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(s, keep, 1), np.take_along_axis(r, keep, 1)
    return best_r


# ------------------------------------------------------------------------------------------------
# FaceSearch
# ------------------------------------------------------------------------------------------------


class FaceSearch:
    """A searchable index of a photo library's faces. Build with `build`, or `load` a saved one."""

    def __init__(self, index: faiss.Index, header: IndexHeader) -> None:
        # Use FaceSearch.build / FaceSearch.load.
        self._index = index
        self.header = header

    # ---------------------------------------------------------------- properties

    @property
    def n(self) -> int:
        return self.header.n

    @property
    def dim(self) -> int:
        return self.header.dim

    @property
    def kind(self) -> str:
        return self.header.kind

    @property
    def key(self) -> str:
        return self.header.key

    @property
    def nlist(self) -> int | None:
        return self.header.nlist

    @property
    def nprobe(self) -> int | None:
        return self.header.nprobe

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self.kind in IVF_KINDS else ""
        if self.kind == "ivfpq":
            extra += f", pq={self.header.pq_m}x{self.header.pq_bits}{', opq' if self.header.opq else ''}"
        return f"FaceSearch(kind={self.kind!r}, n={self.n}, dim={self.dim}{extra}, key={self.key!r})"

    # ---------------------------------------------------------------- building

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray,
        kind: str = "auto",
        key: str = "",
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        train_per_list: int = DEFAULT_TRAIN_PER_LIST,
        calibrate_similarity: float = DEFAULT_CALIBRATE_SIMILARITY,
        target_recall: float = DEFAULT_TARGET_RECALL,
        seed: int = 0,
        pq_m: int | None = None,
        pq_bits: int | None = None,
        opq: bool | None = None,
        centroids: np.ndarray | None = None,
        assignment: np.ndarray | None = None,
    ) -> FaceSearch:
        """Index `vectors` (N, D) float32 unit rows under catalogue `ids` (N,) int64 (unique, >= 0).

        kind: "flat", "ivf", "ivfpq" or "auto" (`choose_kind(N)`). For "ivf"/"ivfpq": `nlist` cells
        (default `ivf_nlist(N)`), k-means on `train_per_list * nlist` sampled vectors, and `nprobe`
        (default: calibrated, see the module doc, to `target_recall` at `calibrate_similarity`).
        For "ivfpq": `pq_m` sub-quantisers of `pq_bits` bits (default 16 x 8 = 16 bytes per face;
        pq_m must divide D) after an OPQ rotation unless `opq=False`.
        `centroids` (nlist, D) unit rows: reuse this coarse quantiser instead of k-means (e.g.
        `other.centroids()`); `assignment` (N,) int: the cell of every row under those centroids
        (e.g. from `other.cells()`), which also skips assigning the faces. `key` is stored as is
        (the catalogue's model fingerprint + generation).
        """
        if not isinstance(key, str):
            raise ValueError(f"key must be a str, got {type(key).__name__}")
        x = _unit_matrix(vectors, "vectors")  # (N, D)
        n, dim = x.shape
        id_arr = _check_ids(ids, n)  # (N,)
        if kind == "auto":
            kind = choose_kind(n)
        if kind not in KINDS:
            raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
        if kind != "ivfpq" and (pq_m is not None or pq_bits is not None or opq is not None):
            raise ValueError("pq_m/pq_bits/opq only apply to kind='ivfpq'")
        if kind == "flat":
            if nlist is not None or nprobe is not None or centroids is not None or assignment is not None:
                raise ValueError("nlist/nprobe/centroids/assignment only apply to kind='ivf' or 'ivfpq'")
            index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
            index.add_with_ids(x, id_arr)
            header = IndexHeader(n=n, dim=dim, kind="flat", key=key, created=_now())
            log.info("built flat face index: %d x %d", n, dim)
            return cls(index, header)
        coarse = _check_coarse(centroids, assignment, n, dim, nlist)
        if coarse[0] is not None:
            nlist = len(coarse[0])
        if kind == "ivfpq":
            return cls._build_ivfpq(x, id_arr, key, nlist, nprobe, train_per_list, calibrate_similarity,
                                    target_recall, seed, pq_m, pq_bits, opq, coarse)
        return cls._build_ivf(x, id_arr, key, nlist, nprobe, train_per_list, calibrate_similarity, target_recall, seed,
                              coarse)

    @classmethod
    def _build_ivf(
        cls,
        x: np.ndarray,  # (N, D)
        ids: np.ndarray,  # (N,)
        key: str,
        nlist: int | None,
        nprobe: int | None,
        train_per_list: int,
        calibrate_similarity: float,
        target_recall: float,
        seed: int,
        coarse: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
    ) -> FaceSearch:
        n, dim = x.shape
        nlist = _check_ivf_args("ivf", n, nlist, nprobe, target_recall)
        rng = np.random.default_rng(seed)
        centroids, assignment = coarse
        if centroids is not None:  # a given coarse quantiser: no k-means
            quantizer = faiss.IndexFlatIP(dim)
            quantizer.add(centroids)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.own_fields = True
            quantizer.this.disown()
            t0 = t1 = time.perf_counter()
            _add_assigned(index, None, x, ids, assignment)
            t2 = time.perf_counter()
            n_train = 0
            return cls._finish_ivf(index, x, ids, key, nlist, nprobe, n_train, calibrate_similarity, target_recall,
                                   rng, t0, t1, t2)

        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()  # the IVF index frees it
        index.cp.spherical = True  # unit centroids: IP to a centroid is then a cosine too
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.seed = seed
        # k-means cost is niter * sample * nlist * D: sample ourselves (FAISS would take 256 per list,
        # 4x the time at 1e6 faces for no measured gain in recall; see the bench).
        n_train = min(n, max(MIN_TRAIN_PER_LIST, int(train_per_list)) * nlist)
        index.cp.max_points_per_centroid = max(1, -(-n_train // nlist))
        t0 = time.perf_counter()
        train = x if n_train >= n else x[np.sort(rng.choice(n, n_train, replace=False))]  # (T, D)
        index.train(train)
        del train
        t1 = time.perf_counter()
        index.add_with_ids(x, ids)
        t2 = time.perf_counter()
        return cls._finish_ivf(index, x, ids, key, nlist, nprobe, n_train, calibrate_similarity, target_recall, rng,
                               t0, t1, t2)

    @classmethod
    def _finish_ivf(cls, index: faiss.IndexIVFFlat, x: np.ndarray, ids: np.ndarray, key: str, nlist: int,
                    nprobe: int | None, n_train: int, calibrate_similarity: float, target_recall: float,
                    rng: np.random.Generator, t0: float, t1: float, t2: float) -> FaceSearch:
        n, dim = x.shape
        calibration: dict[str, Any] = {}
        if nprobe is None:
            nprobe, calibration = _calibrate_nprobe(index, x, ids, calibrate_similarity, target_recall, rng)
        else:
            nprobe = int(nprobe)
        # Where the build time went (k-means, assigning every face to a cell, calibration), for the record.
        calibration["seconds"] = {"train": round(t1 - t0, 3), "add": round(t2 - t1, 3),
                                  "calibrate": round(time.perf_counter() - t2, 3)}
        index.nprobe = nprobe
        header = IndexHeader(n=n, dim=dim, kind="ivf", key=key, nlist=nlist, nprobe=nprobe, created=_now(),
                             calibration=calibration)
        log.info("built IVF face index: %d x %d, nlist %d (trained on %d), nprobe %d %s", n, dim, nlist, n_train,
                 nprobe, calibration)
        return cls(index, header)

    @classmethod
    def _build_ivfpq(
        cls,
        x: np.ndarray,  # (N, D)
        ids: np.ndarray,  # (N,)
        key: str,
        nlist: int | None,
        nprobe: int | None,
        train_per_list: int,
        calibrate_similarity: float,
        target_recall: float,
        seed: int,
        pq_m: int | None,
        pq_bits: int | None,
        opq: bool | None,
        coarse: tuple[np.ndarray | None, np.ndarray | None],
    ) -> FaceSearch:
        n, dim = x.shape
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
        nlist = _check_ivf_args("ivfpq", n, nlist, nprobe, target_recall)
        ksub = 1 << bits
        if n < ksub:
            raise ValueError(f"ivfpq: {bits}-bit codes need at least {ksub} vectors to train on, got {n}")
        rng = np.random.default_rng(seed)
        centroids, assignment = coarse
        seconds: dict[str, float] = {}

        # One random sample: the k-means part (train_per_list per cell, as "ivf") and, for OPQ and PQ, at
        # least PQ_TRAIN_ROWS rows (FAISS trains each 256-centroid sub-quantiser on <= 65,536 of them).
        n_train = min(n, max(MIN_TRAIN_PER_LIST, int(train_per_list)) * nlist)
        n_sample = min(n, max(n_train, PQ_TRAIN_ROWS))
        perm = rng.choice(n, n_sample, replace=False) if n_sample < n else rng.permutation(n)
        sample = x[np.sort(perm)] if n_sample < n else x  # (S, D)
        t0 = time.perf_counter()
        if centroids is None:
            cp = faiss.ClusteringParameters()
            cp.spherical = True  # unit centroids: IP to a centroid is a cosine
            cp.niter = KMEANS_ITERATIONS
            cp.seed = seed
            cp.max_points_per_centroid = max(1, -(-n_train // nlist))
            clus = faiss.Clustering(dim, nlist, cp)
            kmeans_rows = x[np.sort(perm[:n_train])] if n_train < n else x  # (T, D)
            clus.train(kmeans_rows, faiss.IndexFlatIP(dim))
            del kmeans_rows
            centroids = faiss.vector_to_array(clus.centroids).reshape(nlist, dim).astype(np.float32)
        else:
            n_train = 0
        seconds["kmeans"] = time.perf_counter() - t0

        # OPQ on the residuals the PQ will encode (a rotation: inner products are unchanged, so the
        # rotated centroids assign every face to the same cell).
        t0 = time.perf_counter()
        transform = None
        cq = faiss.IndexFlatIP(dim)
        if use_opq:
            flat_c = faiss.IndexFlatIP(dim)
            flat_c.add(centroids)
            pq_rows = sample[rng.choice(len(sample), min(len(sample), OPQ_TRAIN_ROWS), replace=False)]
            _, cell = flat_c.search(pq_rows, 1)  # (P, 1)
            transform = faiss.OPQMatrix(dim, m)
            transform.niter = OPQ_ITERATIONS
            with _one_thread():
                transform.train(np.ascontiguousarray(pq_rows - centroids[cell[:, 0]]))
            del pq_rows, flat_c
            cq.add(transform.apply(centroids))
        else:
            cq.add(centroids)
        seconds["opq"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ivfpq = faiss.IndexIVFPQ(cq, dim, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
        ivfpq.own_fields = True
        cq.this.disown()
        ivfpq.by_residual = True  # codes of x - centre: finer than codes of x for the same bytes
        # The quantiser is trained (nlist centroids): this trains the PQ only, on residuals of the sample.
        pq_rows = sample[np.sort(rng.choice(len(sample), min(len(sample), PQ_TRAIN_ROWS), replace=False))]
        ivfpq.train(transform.apply(pq_rows) if transform is not None else pq_rows)
        del sample, pq_rows
        seconds["pq"] = time.perf_counter() - t0

        if transform is not None:
            index = faiss.IndexPreTransform(transform, ivfpq)
            index.own_fields = True
            transform.this.disown()
            ivfpq.this.disown()
        else:
            index = ivfpq
        t0 = time.perf_counter()
        seconds["assign"] = _add_assigned(ivfpq, transform, x, ids, assignment)
        index.ntotal = ivfpq.ntotal
        seconds["add"] = time.perf_counter() - t0  # assign + rotate + encode

        t0 = time.perf_counter()
        nprobe, calibration = _calibrate_ivfpq(index, ivfpq, transform, x, ids, calibrate_similarity, target_recall,
                                               rng, None if nprobe is None else int(nprobe))
        seconds["calibrate"] = time.perf_counter() - t0
        seconds["train"] = seconds["kmeans"] + seconds["opq"] + seconds["pq"]
        calibration["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        calibration["trained_on"] = {"kmeans": n_train, "opq": min(n_sample, OPQ_TRAIN_ROWS) if use_opq else 0,
                                     "pq": min(n_sample, PQ_TRAIN_ROWS)}
        ivfpq.nprobe = nprobe
        header = IndexHeader(n=n, dim=dim, kind="ivfpq", key=key, nlist=nlist, nprobe=nprobe, created=_now(),
                             calibration=calibration, pq_m=m, pq_bits=bits, opq=bool(use_opq))
        log.info("built IVF-PQ face index: %d x %d, nlist %d, PQ %dx%d%s, nprobe %d %s", n, dim, nlist, m, bits,
                 " + OPQ" if use_opq else "", nprobe, calibration)
        return cls(index, header)

    # ---------------------------------------------------------------- the coarse quantiser

    def _ivf(self) -> faiss.IndexIVF:
        if self.kind not in IVF_KINDS:
            raise ValueError(f"a {self.kind} index has no cells")
        return faiss.extract_index_ivf(self._index)

    def _transform(self) -> faiss.VectorTransform | None:
        if isinstance(self._index, faiss.IndexPreTransform):
            return faiss.downcast_VectorTransform(self._index.chain.at(0))
        return None

    def centroids(self) -> np.ndarray:
        """The coarse centroids (nlist, D) float32 unit rows, in the space of the input vectors (an OPQ
        rotation undone): what `build(..., centroids=)` takes to skip k-means."""
        ivf = self._ivf()
        c = ivf.quantizer.reconstruct_n(0, ivf.nlist)  # (nlist, D)
        transform = self._transform()
        if transform is not None:
            c = transform.reverse_transform(c)  # orthonormal: the transpose
        return unit_rows(c)

    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,) int64, cells (N,) int64): the cell every face is stored in, read from the inverted
        lists (no search). With the rows' order restored, `build(..., assignment=)` takes it."""
        ivf = self._ivf()
        invlists = ivf.invlists
        id_parts, cell_parts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for cell in range(ivf.nlist):
            size = invlists.list_size(cell)
            if size:
                id_parts.append(faiss.rev_swig_ptr(invlists.get_ids(cell), size).astype(np.int64))
                cell_parts.append(np.full(size, cell, np.int64))
        return np.concatenate(id_parts), np.concatenate(cell_parts)

    # ---------------------------------------------------------------- searching

    def _queries(self, queries: Any) -> np.ndarray:
        return _unit_matrix(queries, "queries", self.dim)

    def _params(self, nprobe: int | None) -> faiss.SearchParameters | None:
        if self.kind not in IVF_KINDS:
            if nprobe is not None:
                raise ValueError("nprobe only applies to an ivf or ivfpq index")
            return None
        nprobe = self.nprobe if nprobe is None else int(nprobe)
        if not 1 <= nprobe <= int(self.nlist or 0):
            raise ValueError(f"nprobe must be in 1..{self.nlist}, got {nprobe}")
        return faiss.SearchParametersIVF(nprobe=nprobe)

    def range_search(
        self, queries: np.ndarray, min_similarity: float, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every library face with cosine similarity >= `min_similarity` to each query (Q, D).

        Returns FAISS-style (lims (Q+1,) int64, ids (M,) int64 catalogue ids, similarities (M,) float32):
        query i's results are ids[lims[i]:lims[i+1]], most similar first. `nprobe` overrides the
        stored one (ivf, ivfpq). An IVF index may miss a few results (recall ~ the calibrated target).
        An IVF-PQ index compares *estimated* similarities with the bound and returns them (error sd
        ~0.03 at 16 bytes/face, see `header.calibration["similarity_error"]`): it misses some faces just
        above the bound and returns some just below; re-score from the stored embeddings for exact ones.
        """
        q = self._queries(queries)  # (Q, D)
        bound = float(min_similarity)
        if not math.isfinite(bound):
            raise ValueError(f"min_similarity must be finite, got {min_similarity!r}")
        params = self._params(nprobe)
        # FAISS keeps inner products strictly above the radius; the float32 just below the bound
        # makes that ">= bound" exactly.
        radius = float(np.nextafter(np.float32(bound), np.float32(-np.inf)))
        if self.n == 0 or len(q) == 0:
            return np.zeros(len(q) + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        lims, sims, ids = self._index.range_search(q, radius, params=params)
        lims = lims.astype(np.int64)  # (Q+1,)
        ids = ids.astype(np.int64, copy=False)  # (M,)
        sims = sims.astype(np.float32, copy=False)  # (M,)
        # Most similar first within each query (FAISS returns them in storage order).
        qidx = np.repeat(np.arange(len(q)), np.diff(lims))  # (M,)
        order = np.lexsort((ids, -sims, qidx))
        return lims, ids[order], sims[order]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None = None,
        *,
        rescore: Callable[[np.ndarray], np.ndarray] | None = None,
        shortlist: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar library faces per query (Q, D): (similarities (Q, k) float32, ids (Q, k)
        int64), best first; where fewer than k are found, id -1 and similarity -inf.

        `rescore`: a callable that takes catalogue ids (M,) int64 (unique, ascending) and returns their
        stored embeddings (M, D) unit float32 rows in that order (e.g. read from the library's SQLite).
        The index's top `shortlist` (default RESCORE_SHORTLIST_PER_K * k) per query are then re-ranked by
        their exact similarities, which are what is returned: for IVF-PQ, whose codes order close
        neighbours wrongly, this recovers the recall the codes lose (bench/bench_search_scale.py at 1e7
        faces, 16-byte codes: recall@10 0.54 raw, 0.97 re-scored from the top 200) while RAM holds only
        the codes and ids; the caller's reads of shortlist x Q vectors (fewer: each id once) are the cost.
        """
        q = self._queries(queries)  # (Q, D)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        k = int(k)
        if rescore is None:
            if shortlist is not None:
                raise ValueError("shortlist only applies with rescore")
            kk = k
        else:
            if not callable(rescore):
                raise ValueError(f"rescore must be a callable ids -> vectors, got {type(rescore).__name__}")
            kk = RESCORE_SHORTLIST_PER_K * k if shortlist is None else shortlist
            if isinstance(kk, bool) or not isinstance(kk, (int, np.integer)) or kk < k:
                raise ValueError(f"shortlist must be an int >= k={k}, got {shortlist!r}")
            kk = int(kk)
        params = self._params(nprobe)
        if self.n == 0 or len(q) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        sims, ids = self._index.search(q, kk, params=params)  # (Q, kk) each
        ids = ids.astype(np.int64, copy=False)
        sims = np.where(ids >= 0, sims, np.float32(-np.inf)).astype(np.float32)
        if rescore is None:
            return sims, ids
        return _rescored(q, ids, rescore, k)

    # ---------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike, key: str | None = None) -> None:
        """Write the index to `path` atomically (0600 temp file beside it, fsync, rename).

        `key` replaces the stored key when given (the catalogue's fingerprint + generation).
        """
        if key is not None:
            if not isinstance(key, str):
                raise ValueError(f"key must be a str, got {type(key).__name__}")
            self.header = IndexHeader(**{**self.header.__dict__, "key": key})
        path = Path(path)
        header = json.dumps(self.header.to_json(), sort_keys=True).encode("utf-8")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_PREFIX.pack(_MAGIC, len(header)))
                f.write(header)
                state = {"crc": 0, "size": 0}

                def write(chunk: bytes) -> None:
                    state["crc"] = zlib.crc32(chunk, state["crc"])
                    state["size"] += len(chunk)
                    f.write(chunk)

                # Streamed: no second in-memory copy of a 512 MB index.
                writer = faiss.PyCallbackIOWriter(write, _READ_CHUNK)
                faiss.write_index(self._index, writer)
                del writer  # flushes its buffer into `write`
                f.write(_TRAILER.pack(state["size"], state["crc"], _END))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        log.info("saved %s to %s (%d bytes)", self, path, path.stat().st_size)

    @staticmethod
    def read_header(path: str | os.PathLike) -> IndexHeader:
        """The header of a saved index (n, dim, kind, key, nlist, nprobe, ...), without loading it."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                return _read_header(f, path)
        except OSError as e:
            raise FaceSearchError(f"{path}: cannot read face-search index ({e.strerror or e})") from None

    @staticmethod
    def read_key(path: str | os.PathLike) -> str:
        """The key stored with a saved index (cheap: reads the header only)."""
        return FaceSearch.read_header(path).key

    @classmethod
    def load(cls, path: str | os.PathLike, expected_key: str | None = None) -> FaceSearch:
        """Load a saved index. `expected_key` given and different -> StaleIndexError (before reading the
        vectors). Missing, truncated, corrupt or foreign file -> FaceSearchError (both ValueErrors)."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                header = _read_header(f, path)
                if expected_key is not None and header.key != expected_key:
                    raise StaleIndexError(f"{path}: stale face-search index (key {header.key!r}, expected "
                                          f"{expected_key!r})")
                index = _read_payload(f, path)
        except OSError as e:
            raise FaceSearchError(f"{path}: cannot read face-search index ({e.strerror or e})") from None
        _check_index(index, header, path)
        if header.kind in IVF_KINDS:
            faiss.extract_index_ivf(index).nprobe = header.nprobe
        log.debug("loaded %s from %s", header.kind, path)
        return cls(index, header)


# ------------------------------------------------------------------------------------------------
# File helpers
# ------------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_header(f: BinaryIO, path: Path) -> IndexHeader:
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or not prefix.startswith(_MAGIC):
        raise FaceSearchError(f"{path}: not a faceverify face-search index (bad magic)")
    _, length = _PREFIX.unpack(prefix)
    if length > _MAX_HEADER:
        raise FaceSearchError(f"{path}: corrupt face-search index (header length {length})")
    raw = f.read(length)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FaceSearchError(f"{path}: corrupt face-search index (unreadable header)") from None
    if not isinstance(obj, dict):
        raise FaceSearchError(f"{path}: corrupt face-search index (header is not an object)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise FaceSearchError(f"{path}: face-search index format {obj.get('format_version')!r} not supported "
                              f"(this code reads {FORMAT_VERSION})")
    try:
        header = IndexHeader(
            n=_typed(obj, "n", int), dim=_typed(obj, "dim", int), kind=_typed(obj, "kind", str),
            key=_typed(obj, "key", str), nlist=obj.get("nlist"), nprobe=obj.get("nprobe"),
            created=str(obj.get("created", "")), calibration=dict(obj.get("calibration") or {}),
            pq_m=obj.get("pq_m"), pq_bits=obj.get("pq_bits"), opq=obj.get("opq"),
        )
    except (KeyError, TypeError, ValueError):
        raise FaceSearchError(f"{path}: corrupt face-search index (header fields missing or mistyped)") from None
    ivf_ok = isinstance(header.nlist, int) and isinstance(header.nprobe, int) and 1 <= header.nprobe <= header.nlist
    pq_ok = (isinstance(header.pq_m, int) and isinstance(header.pq_bits, int) and isinstance(header.opq, bool)
             and header.pq_m >= 1 and 1 <= header.pq_bits <= 16)
    if header.kind not in KINDS or obj.get("metric") != "ip" or header.n < 0 or header.dim < 1 or (
        header.kind in IVF_KINDS and not ivf_ok) or (header.kind == "ivfpq" and not pq_ok
    ):
        raise FaceSearchError(f"{path}: corrupt face-search index (kind {header.kind!r}, n {header.n}, "
                              f"dim {header.dim}, nlist {header.nlist}, nprobe {header.nprobe})")
    return header


def _typed(obj: dict[str, Any], name: str, typ: type) -> Any:
    value = obj[name]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise TypeError(name)
    return value


def _read_payload(f: BinaryIO, path: Path) -> faiss.Index:
    """Stream the FAISS bytes after the header into FAISS, checking length and CRC from the trailer."""
    start = f.tell()
    end = f.seek(0, os.SEEK_END)
    if end - start < _TRAILER.size:
        raise FaceSearchError(f"{path}: truncated face-search index")
    f.seek(end - _TRAILER.size)
    size, crc, magic = _TRAILER.unpack(f.read(_TRAILER.size))
    if magic != _END or start + size + _TRAILER.size != end:
        raise FaceSearchError(f"{path}: truncated or corrupt face-search index (trailer does not match the file)")
    f.seek(start)
    state = {"crc": 0, "left": size}

    def read(n: int) -> bytes:
        chunk = f.read(min(n, state["left"]))  # never past the payload into the trailer
        state["left"] -= len(chunk)
        state["crc"] = zlib.crc32(chunk, state["crc"])
        return chunk

    try:
        index = faiss.read_index(faiss.PyCallbackIOReader(read, _READ_CHUNK))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise FaceSearchError(f"{path}: corrupt face-search index (FAISS: {reason[:200]})") from None
    if state["left"]:
        state["crc"] = zlib.crc32(f.read(state["left"]), state["crc"])  # extra bytes FAISS did not want
        raise FaceSearchError(f"{path}: corrupt face-search index ({state['left']} stray payload bytes)")
    if state["crc"] != crc:
        raise FaceSearchError(f"{path}: corrupt face-search index (checksum mismatch)")
    return index


def _check_index(index: faiss.Index, header: IndexHeader, path: Path) -> None:
    """The FAISS index must be what the header says (a well-formed file written by something else is foreign)."""
    if header.kind == "flat":
        ok = isinstance(index, faiss.IndexIDMap) and isinstance(faiss.downcast_index(index.index), faiss.IndexFlatIP)
    elif header.kind == "ivf":
        ok = isinstance(index, faiss.IndexIVFFlat) and index.nlist == header.nlist
    else:
        inner = index
        if isinstance(index, faiss.IndexPreTransform):
            inner = faiss.downcast_index(index.index)
            ok = (header.opq is True and index.chain.size() == 1
                  and isinstance(faiss.downcast_VectorTransform(index.chain.at(0)), faiss.LinearTransform))
        else:
            ok = header.opq is False
        ok = ok and (isinstance(inner, faiss.IndexIVFPQ) and inner.nlist == header.nlist and inner.pq.M == header.pq_m
                     and inner.pq.nbits == header.pq_bits and inner.metric_type == faiss.METRIC_INNER_PRODUCT
                     and inner.ntotal == header.n)
    if not ok or index.d != header.dim or index.ntotal != header.n or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise FaceSearchError(f"{path}: face-search index does not match its header ({type(index).__name__}, "
                              f"{index.ntotal} x {index.d}; header says {header.kind}, {header.n} x {header.dim})")


def _rescored(q: np.ndarray, cand: np.ndarray, rescore: Callable[[np.ndarray], np.ndarray],
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidate ids (Q, K') by exact similarity to q (Q, D) with the vectors `rescore(ids)`
    returns: (similarities (Q, k), ids (Q, k)), best first, -inf / -1 where fewer than k candidates."""
    uniq = np.unique(cand[cand >= 0])  # (M,) ascending
    vec = _unit_matrix(np.asarray(rescore(uniq.copy())), "rescore vectors", q.shape[1])
    if len(vec) != len(uniq):
        raise ValueError(f"rescore vectors: expected {len(uniq)} rows, one per id asked for, got {len(vec)}")
    valid = cand >= 0
    pos = np.searchsorted(uniq, np.where(valid, cand, uniq[0] if len(uniq) else 0))  # (Q, K')
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    for start in range(0, len(q), _RESCORE_BLOCK):
        b = slice(start, start + _RESCORE_BLOCK)
        sims = np.einsum("qd,qkd->qk", q[b], vec[pos[b]]) if len(uniq) else np.zeros(cand[b].shape, np.float32)
        sims = np.where(valid[b], sims, np.float32(-np.inf)).astype(np.float32)  # (B, K')
        top = np.lexsort((cand[b], -sims), axis=-1)[:, :k] if sims.shape[1] else sims.astype(np.int64)
        s = np.take_along_axis(sims, top, 1)
        i = np.where(np.isfinite(s), np.take_along_axis(cand[b], top, 1), -1)
        out_s[b, : s.shape[1]], out_i[b, : i.shape[1]] = s, i
    return out_s, out_i


# ------------------------------------------------------------------------------------------------
# nprobe calibration
# ------------------------------------------------------------------------------------------------


def _calibrate_nprobe(
    index: faiss.IndexIVFFlat,
    x: np.ndarray,  # (N, D)
    ids: np.ndarray,  # (N,)
    min_similarity: float,
    target_recall: float,
    rng: np.random.Generator,
) -> tuple[int, dict[str, Any]]:
    """The smallest nprobe whose recall on a sample of the library's own vectors reaches the target.

    Recall = found / exact pairs, the query's own face left out (IVF always finds it: its own cell is
    probed first). Range pairs at `min_similarity`; a library with too few of them (e.g. every face a
    different person) is calibrated on k-NN recall@10 instead. Recall grows with nprobe (the cells
    searched at nprobe p are a subset of those at p+1), so a binary search over 1..nlist finds it.
    The exact search costs one flat pass of CALIBRATION_QUERIES queries: small next to k-means.
    """
    n = len(x)
    rows = np.sort(rng.choice(n, min(CALIBRATION_QUERIES, n), replace=False))  # (C,)
    q = x[rows]  # (C, D)
    qrow, lrow = _exact_range_pairs(x, q, min_similarity)
    keep = lrow != rows[qrow]  # not the query itself
    qrow, lrow = qrow[keep], lrow[keep]
    n_range_pairs = len(qrow)

    if n_range_pairs >= MIN_CALIBRATION_PAIRS:
        how = f"range recall at similarity >= {min_similarity}"
        exact = [ids[lrow[qrow == i]] for i in range(len(q))]  # per query: catalogue ids that must be found
        radius = float(np.nextafter(np.float32(min_similarity), np.float32(-np.inf)))

        def found_ids(nprobe: int) -> list[np.ndarray]:
            lims, _, found = index.range_search(q, radius, params=faiss.SearchParametersIVF(nprobe=nprobe))
            return [found[lims[i] : lims[i + 1]] for i in range(len(q))]
    else:
        k = min(CALIBRATION_K, n - 1)
        how = f"k-NN recall@{k} (only {n_range_pairs} range pairs at similarity >= {min_similarity})"
        if k < 1:
            return 1, {"method": how, "queries": len(q), "recall": 1.0}
        top = _exact_topk_rows(x, q, k + 1)  # (C, k+1): k neighbours + the query itself
        exact = [ids[r[r != rows[i]][:k]] for i, r in enumerate(top)]

        def found_ids(nprobe: int) -> list[np.ndarray]:
            _, found = index.search(q, k + 1, params=faiss.SearchParametersIVF(nprobe=nprobe))
            return list(found)

    total = sum(len(e) for e in exact)

    def recall(nprobe: int) -> float:
        hits = sum(int(np.isin(f, e).sum()) for f, e in zip(found_ids(nprobe), exact))
        return hits / max(1, total)

    lo, hi = 1, int(index.nlist)  # at nprobe = nlist every cell is searched: exact
    measured: dict[int, float] = {}
    while lo < hi:
        mid = (lo + hi) // 2
        measured[mid] = recall(mid)
        if measured[mid] >= target_recall:
            hi = mid
        else:
            lo = mid + 1
    got = measured[lo] if lo in measured else recall(lo)
    return lo, {"method": how, "queries": len(q), "pairs": total, "target": target_recall, "recall": round(got, 4)}


# ------------------------------------------------------------------------------------------------
# Coarse quantiser reuse, chunked adding, IVF-PQ calibration
# ------------------------------------------------------------------------------------------------


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


def _check_coarse(centroids: Any, assignment: Any, n: int, dim: int,
                  nlist: int | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Validate a given coarse quantiser: (centroids (nlist, D) float32 unit rows, assignment (N,) int64
    cells in 0..nlist-1), either None."""
    if centroids is None:
        if assignment is not None:
            raise ValueError("assignment needs the centroids it was computed with")
        return None, None
    c = _unit_matrix(centroids, "centroids", dim)  # (nlist, D)
    if not 1 <= len(c) <= max(n, 1) or (nlist is not None and int(nlist) != len(c)):
        raise ValueError(f"centroids: {len(c)} rows for N={n} vectors and nlist={nlist}")
    if assignment is None:
        return c, None
    a = np.asarray(assignment)
    if a.shape != (n,) or (n and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"assignment: expected ({n},) ints, one cell per vector, got {a.shape} {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.int64)
    if n and (a.min() < 0 or a.max() >= len(c)):
        raise ValueError(f"assignment: cells must be in 0..{len(c) - 1}")
    return c, a


def _add_assigned(ivf: faiss.IndexIVF, transform: faiss.VectorTransform | None, x: np.ndarray, ids: np.ndarray,
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


def _calibrate_ivfpq(
    index: faiss.Index,
    ivf: faiss.IndexIVFPQ,
    transform: faiss.VectorTransform | None,
    x: np.ndarray,  # (N, D)
    ids: np.ndarray,  # (N,)
    min_similarity: float,
    target_recall: float,
    rng: np.random.Generator,
    nprobe: int | None,
) -> tuple[int, dict[str, Any]]:
    """nprobe for an IVF-PQ index: the smallest whose probed cells hold `target_recall` of the exact
    pairs, then what the index really returns at that nprobe (PQ included).

    The pairs are those of `_calibrate_nprobe` (a sample of the library's own vectors as queries, range
    pairs at `min_similarity`, else the 10 nearest; the query itself left out). The cell part is exact and
    needs no search: a pair is found at nprobe p iff its library face's cell is among the query's p
    best cells, so recall(p) = fraction of pairs whose cell rank is < p, for every p at once. PQ then
    loses pairs whose *estimated* similarity falls below the bound (and adds some from just below it):
    `range_recall` / `range_precision` (range pairs) and `knn_recall@10` measure that, and
    `similarity_error` is estimated minus exact similarity over the returned neighbours.
    """
    n, nlist = len(x), int(ivf.nlist)
    rows = np.sort(rng.choice(n, min(CALIBRATION_QUERIES, n), replace=False))  # (C,)
    q = x[rows]  # (C, D)
    qrow, lrow = _exact_range_pairs(x, q, min_similarity)
    keep = lrow != rows[qrow]  # not the query itself
    qrow, lrow = qrow[keep], lrow[keep]
    k = max(1, min(CALIBRATION_K, n - 1))
    top = _exact_topk_rows(x, q, k + 1)  # (C, k+1): k neighbours + the query itself
    knn_rows = [r[r != rows[i]][:k] for i, r in enumerate(top)]
    if len(qrow) >= MIN_CALIBRATION_PAIRS:
        how = f"cell recall of the range pairs at similarity >= {min_similarity}"
        pair_q, pair_l = qrow, lrow
    else:
        how = f"cell recall of the {k} nearest (only {len(qrow)} range pairs at similarity >= {min_similarity})"
        pair_q = np.concatenate([np.full(len(r), i) for i, r in enumerate(knn_rows)])
        pair_l = np.concatenate(knn_rows)

    def rotated(v: np.ndarray) -> np.ndarray:
        return v if transform is None else np.ascontiguousarray(transform.apply(v), dtype=np.float32)

    # Rank of every cell for every query (what IVF probes first), and the cell of each pair's face.
    _, order = ivf.quantizer.search(rotated(q), nlist)  # (C, nlist) cells, best first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(nlist), order.shape), axis=1)
    uniq, inverse = np.unique(pair_l, return_inverse=True)
    _, cell = ivf.quantizer.search(rotated(x[uniq]), 1)  # (U, 1)
    pair_rank = np.sort(rank[pair_q, cell[inverse, 0]]) if len(pair_q) else np.zeros(0, np.int64)
    if nprobe is None:
        need = math.ceil(target_recall * len(pair_rank))
        nprobe = 1 if need == 0 else int(pair_rank[need - 1]) + 1
    cell_recall = float(np.mean(pair_rank < nprobe)) if len(pair_rank) else 1.0
    params = faiss.SearchParametersIVF(nprobe=nprobe)

    # End to end at that nprobe.
    sorter = np.argsort(ids)

    def row_of(found: np.ndarray) -> np.ndarray:
        return sorter[np.searchsorted(ids, found, sorter=sorter)]

    out: dict[str, Any] = {"method": how, "queries": len(q), "pairs": int(len(pair_rank)), "target": target_recall,
                           "cell_recall": round(cell_recall, 4)}
    radius = float(np.nextafter(np.float32(min_similarity), np.float32(-np.inf)))
    lims, _, found = index.range_search(q, radius, params=params)
    hits = returned = true_returned = 0
    for i in range(len(q)):
        f = row_of(found[lims[i] : lims[i + 1]])
        f = f[f != rows[i]]
        exact_i = lrow[qrow == i]
        hits += int(np.isin(exact_i, f).sum())
        returned += len(f)
        true_returned += int((x[f] @ q[i] >= np.float32(min_similarity)).sum())
    out["range_recall"] = round(hits / max(1, len(qrow)), 4) if len(qrow) else None
    out["range_precision"] = round(true_returned / returned, 4) if returned else None
    sims, got = index.search(q, k + 1, params=params)  # (C, k+1)
    knn_hits, errors = 0, []
    for i in range(len(q)):
        valid = got[i] >= 0
        f, s = row_of(got[i][valid]), sims[i][valid]
        not_self = f != rows[i]
        f, s = f[not_self][:k], s[not_self][:k]
        knn_hits += int(np.isin(knn_rows[i], f).sum())
        errors.append(s - x[f] @ q[i])
    err = np.concatenate(errors).astype(np.float64)
    out[f"knn_recall@{k}"] = round(knn_hits / max(1, sum(len(r) for r in knn_rows)), 4)
    out["recall"] = out["range_recall"] if len(qrow) >= MIN_CALIBRATION_PAIRS else out[f"knn_recall@{k}"]
    out["similarity_error"] = {"mean": round(float(err.mean()), 4), "sd": round(float(err.std()), 4),
                               "p99_abs": round(float(np.quantile(np.abs(err), 0.99)), 4)} if len(err) else {}
    return nprobe, out
