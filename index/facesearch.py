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

kind="auto" picks by size (`choose_kind`): flat below IVF_MIN_FACES, IVF from there. The reasoning and
the numbers behind the constant are beside it. `choose_kind` walks a table of (minimum size, kind) so
a later kind (IVF-PQ for 1e7-1e8 faces) is one more row.

Input vectors are validated, not repaired: a wrong shape, a NaN/inf, or a row whose norm is not 1
within NORM_TOLERANCE is a ValueError. A non-unit row means the caller handed over something other
than the catalogue's normalised embeddings (a bug worth surfacing), and silently rescaling would also
copy the whole library (512 MB at 1e6 faces). `unit_rows()` is there for callers that want to normalise.

On disk an index is one file (written atomically: a 0600 temp file beside it, fsync, os.replace):

    magic b"FVFSIDX\\0" | uint32 header length | JSON header | FAISS index bytes | trailer
    header:  format_version, n, dim, kind, key, metric, nlist, nprobe, created, calibration
    trailer: uint64 payload length, uint32 CRC-32 of the payload, b"FVFE"

`read_header` / `read_key` read only the first few hundred bytes, so a caller can tell a stale file
(the catalogue puts model fingerprint + a generation number into `key`) without loading N vectors.
`load` streams the payload into FAISS (no second in-memory copy) and checks its length and CRC, so a
truncated, corrupt or foreign file is a `FaceSearchError` (a ValueError) with one line naming it.
"""

from __future__ import annotations

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
from typing import Any, BinaryIO

import faiss
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("flat", "ivf")

# ---- the size policy --------------------------------------------------------------------------
# Measured by bench/bench_facesearch.py (2 cores, 128-d, clustered faces; README "Library index"): a
# `find` (100 pooled vectors, range search at similarity >= 0.5) takes 0.11 s on a flat index of 1e5
# faces and 2.1 s at 1e6; IVF takes 0.02 / 0.18 s (range recall 0.99, a person's own faces 1.00) but
# costs 2.8 / 36 s to build. The IVF index is kept on disk (0.46 s to load at 1e6, and no need to read
# the embeddings out of SQLite), the flat one is rebuilt per question. Below 1e6 faces a flat find is
# cheaper than an IVF rebuild after each scan; from 1e6 on, a kept IVF index answers ~5x faster than
# flat and pays its build once per change of the library.
IVF_MIN_FACES = 1_000_000

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

    def to_json(self) -> dict[str, Any]:
        return {
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


# ------------------------------------------------------------------------------------------------
# The size policy and input checks
# ------------------------------------------------------------------------------------------------


def kind_table() -> tuple[tuple[int, str], ...]:
    """(smallest N, kind) rows, ascending. A later IVF-PQ for 1e7-1e8 faces is one more row
    (`(IVFPQ_MIN_FACES, "ivfpq")`). Built at call time from the constants so tests can patch them."""
    return ((0, "flat"), (IVF_MIN_FACES, "ivf"))


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
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self.kind == "ivf" else ""
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
    ) -> FaceSearch:
        """Index `vectors` (N, D) float32 unit rows under catalogue `ids` (N,) int64 (unique, >= 0).

        kind: "flat", "ivf" or "auto" (`choose_kind(N)`). For "ivf": `nlist` cells (default
        `ivf_nlist(N)`), k-means on `train_per_list * nlist` sampled vectors, and `nprobe` (default:
        calibrated, see the module doc, to `target_recall` at `calibrate_similarity`). `key` is
        stored as is (the catalogue's model fingerprint + generation).
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
        if kind == "flat":
            if nlist is not None or nprobe is not None:
                raise ValueError("nlist/nprobe only apply to kind='ivf'")
            index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
            index.add_with_ids(x, id_arr)
            header = IndexHeader(n=n, dim=dim, kind="flat", key=key, created=_now())
            log.info("built flat face index: %d x %d", n, dim)
            return cls(index, header)
        return cls._build_ivf(x, id_arr, key, nlist, nprobe, train_per_list, calibrate_similarity, target_recall, seed)

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
    ) -> FaceSearch:
        n, dim = x.shape
        nlist = ivf_nlist(n) if nlist is None else int(nlist)
        if n < 1 or nlist < 1 or nlist > n:
            raise ValueError(f"ivf: need 1 <= nlist <= N, got nlist={nlist} for N={n}")
        if nprobe is not None and not 1 <= int(nprobe) <= nlist:
            raise ValueError(f"ivf: need 1 <= nprobe <= nlist={nlist}, got {nprobe}")
        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        rng = np.random.default_rng(seed)

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

    # ---------------------------------------------------------------- searching

    def _queries(self, queries: Any) -> np.ndarray:
        return _unit_matrix(queries, "queries", self.dim)

    def _params(self, nprobe: int | None) -> faiss.SearchParameters | None:
        if self.kind != "ivf":
            if nprobe is not None:
                raise ValueError("nprobe only applies to an ivf index")
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
        stored one (ivf only). An IVF index may miss a few results (recall ~ the calibrated target).
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

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar library faces per query (Q, D): (similarities (Q, k) float32, ids (Q, k)
        int64), best first; where fewer than k are found, id -1 and similarity -inf."""
        q = self._queries(queries)  # (Q, D)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        params = self._params(nprobe)
        if self.n == 0 or len(q) == 0:
            return np.full((len(q), int(k)), -np.inf, np.float32), np.full((len(q), int(k)), -1, np.int64)
        sims, ids = self._index.search(q, int(k), params=params)  # (Q, k) each
        ids = ids.astype(np.int64, copy=False)
        sims = np.where(ids >= 0, sims, np.float32(-np.inf)).astype(np.float32)
        return sims, ids

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
        if header.kind == "ivf":
            index.nprobe = header.nprobe
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
        )
    except (KeyError, TypeError, ValueError):
        raise FaceSearchError(f"{path}: corrupt face-search index (header fields missing or mistyped)") from None
    ivf_ok = isinstance(header.nlist, int) and isinstance(header.nprobe, int) and 1 <= header.nprobe <= header.nlist
    if header.kind not in KINDS or obj.get("metric") != "ip" or header.n < 0 or header.dim < 1 or (
        header.kind == "ivf" and not ivf_ok
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
    else:
        ok = isinstance(index, faiss.IndexIVFFlat) and index.nlist == header.nlist
    if not ok or index.d != header.dim or index.ntotal != header.n or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise FaceSearchError(f"{path}: face-search index does not match its header ({type(index).__name__}, "
                              f"{index.ntotal} x {index.d}; header says {header.kind}, {header.n} x {header.dim})")


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
