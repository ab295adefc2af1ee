"""FaceSearch: the one class callers use: build (or load) an index, then range / k-NN search it.

The index kinds are built in flat (here), ivf.py and ivfpq.py; the file format is storage.py.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from index.facesearch.calibration import DEFAULT_CALIBRATE_SIMILARITY, DEFAULT_TARGET_RECALL
from index.facesearch.header import IVF_KINDS, KINDS, IndexHeader, now_utc
from index.facesearch.ivf import IvfSettings, build_ivf
from index.facesearch.ivfpq import build_ivfpq
from index.facesearch.policy import DEFAULT_TRAIN_PER_LIST, choose_kind
from index.facesearch.storage import load_index, read_header, save_index
from index.facesearch.vectors import check_coarse, check_ids, unit_matrix, unit_rows

log = logging.getLogger(__name__)


# search(rescore=): candidates re-scored per neighbour wanted. Top 200 for k=10: at 1e7 faces the 16-byte
# codes give recall@10 0.54 raw, 0.94 re-scored from the top 100, 0.97 from the top 200 (the bench's sweep).
RESCORE_SHORTLIST_PER_K = 20
_RESCORE_BLOCK = 1024  # queries per gathered (B, K', D) block when re-scoring


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
        (default: calibrated, see calibration.py, to `target_recall` at `calibrate_similarity`).
        For "ivfpq": `pq_m` sub-quantisers of `pq_bits` bits (default 16 x 8 = 16 bytes per face;
        pq_m must divide D) after an OPQ rotation unless `opq=False`.
        `centroids` (nlist, D) unit rows: reuse this coarse quantiser instead of k-means (e.g.
        `other.centroids()`); `assignment` (N,) int: the cell of every row under those centroids
        (e.g. from `other.cells()`), which also skips assigning the faces. `key` is stored as is
        (the catalogue's model fingerprint + generation).
        """
        if not isinstance(key, str):
            raise ValueError(f"key must be a str, got {type(key).__name__}")
        x = unit_matrix(vectors, "vectors")  # (N, D)
        n, dim = x.shape
        id_arr = check_ids(ids, n)  # (N,)
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
            header = IndexHeader(n=n, dim=dim, kind="flat", key=key, created=now_utc())
            log.info("built flat face index: %d x %d", n, dim)
            return cls(index, header)
        coarse = check_coarse(centroids, assignment, n, dim, nlist)
        if coarse[0] is not None:
            nlist = len(coarse[0])
        settings = IvfSettings(nlist, nprobe, train_per_list, calibrate_similarity, target_recall, seed, coarse)
        if kind == "ivfpq":
            return cls(*build_ivfpq(x, id_arr, key, settings, pq_m=pq_m, pq_bits=pq_bits, opq=opq))
        return cls(*build_ivf(x, id_arr, key, settings))

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
        return unit_matrix(queries, "queries", self.dim)

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
        save_index(self._index, self.header, path)
        log.info("saved %s to %s (%d bytes)", self, path, path.stat().st_size)

    @staticmethod
    def read_header(path: str | os.PathLike) -> IndexHeader:
        """The header of a saved index (n, dim, kind, key, nlist, nprobe, ...), without loading it."""
        return read_header(Path(path))

    @staticmethod
    def read_key(path: str | os.PathLike) -> str:
        """The key stored with a saved index (cheap: reads the header only)."""
        return FaceSearch.read_header(path).key

    @classmethod
    def load(cls, path: str | os.PathLike, expected_key: str | None = None) -> FaceSearch:
        """Load a saved index. `expected_key` given and different -> StaleIndexError (before reading the
        vectors). Missing, truncated, corrupt or foreign file -> FaceSearchError (both ValueErrors)."""
        return cls(*load_index(Path(path), expected_key))


def _rescored(q: np.ndarray, cand: np.ndarray, rescore: Callable[[np.ndarray], np.ndarray],
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidate ids (Q, K') by exact similarity to q (Q, D) with the vectors `rescore(ids)`
    returns: (similarities (Q, k), ids (Q, k)), best first, -inf / -1 where fewer than k candidates."""
    uniq = np.unique(cand[cand >= 0])  # (M,) ascending
    vec = unit_matrix(np.asarray(rescore(uniq.copy())), "rescore vectors", q.shape[1])
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

