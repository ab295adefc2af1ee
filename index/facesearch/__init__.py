"""Range and k-NN search over every face of a photo library, on FAISS (numpy in, numpy out; no torch).

The catalogue holds every face of the library (1e6-1e7 of them) as an L2-normalised float32 vector with
an int64 face id. `find NAME` asks, for an enrolled person's few to few hundred pooled vectors, for every
library face whose cosine similarity to any of them is >= a bound (`range_search`); grouping asks for
the k nearest faces (`search`). Both indexes are inner-product ones over unit vectors, so inner product
== cosine similarity.

kind="flat": `IndexIDMap(IndexFlatIP)`, exact. Nothing to train: "building" is copying the vectors.
             (IndexIDMap, not IDMap2: IDMap2 rebuilds a hash map of all N ids on every load, which is
             only needed to reconstruct a vector by id, and nothing here does.)

kind="ivf":  `IndexIVFFlat`, exact vectors in ~4 sqrt(N) cells, nprobe calibrated at build time on the
             library itself to `target_recall` of the range pairs at `calibrate_similarity` (ivf.py).
kind="ivfpq": OPQ + `IndexIVFPQ`, 16 bytes of code per face for 1e7-1e8 faces (ivfpq.py).
             SIMILARITIES ARE APPROXIMATE (error sd ~0.03 at M=16 on face-like data): `range_search`
             keeps a face whose *estimated* similarity is >= the bound, so it can miss a face just above
             the bound and return one just below; `search` can order close neighbours wrongly. A caller
             that needs exact answers re-scores the candidates from the stored embeddings (the library's
             SQLite): `search(q, k, rescore=ids -> vectors)` does that for k-NN (the index's top 20 k
             re-ranked exactly), so RAM keeps only the codes (range search is not re-scored here).
             Memory: pq_m bytes of code + 8 bytes of int64 id per face in the inverted lists, plus the
             centroids (nlist x D x 4).

kind="auto" picks by size (policy.choose_kind): flat below IVF_MIN_FACES, IVF from there, IVF-PQ from
IVFPQ_MIN_FACES.

A rebuild may reuse a coarse quantiser: `build(..., centroids=C)` skips k-means, and `assignment=`
(the cell of every row under C, e.g. `other.cells()` for the same rows) also skips assigning the
faces (bench/bench_search_scale.py builds IVF-Flat and two IVF-PQ variants on one k-means this way).

The package, by role (each module opens with its part of the story):

    search.py       FaceSearch: build (flat here), search, range_search, save / load / read_header
    policy.py       the size policy: choose_kind, kind_table, ivf_nlist and the constants behind them
    ivf.py          building an IVF-Flat index (k-means, adding faces to their cells)
    ivfpq.py        building an IVF-PQ index, step by step (sample, k-means, OPQ, PQ, encode)
    calibration.py  nprobe calibration (IVF, IVF-PQ) and the measured similarity error of IVF-PQ
    exact.py        exact numpy search: the ground truth the calibration measures against
    vectors.py      input checks (unit rows, ids, a given coarse quantiser) and unit_rows
    header.py       IndexHeader, the kinds, FaceSearchError / StaleIndexError
    storage.py      the file: magic, JSON header, FAISS bytes, length + CRC trailer, atomic write

The tunable constants live in the modules that read them (policy, ivf, ivfpq, ...); setting one on this
package (`monkeypatch.setattr(index.facesearch, "IVF_MIN_FACES", 0)`, as callers did when this was one
module) sets it in each of them too, so the package and the modules that read it never disagree.
"""

import sys
import types

from index.facesearch import calibration, exact, header, ivf, ivfpq, policy, search, storage, vectors

from index.facesearch.calibration import (CALIBRATION_K, CALIBRATION_QUERIES, DEFAULT_CALIBRATE_SIMILARITY,
                                          DEFAULT_TARGET_RECALL, MIN_CALIBRATION_PAIRS)
from index.facesearch.header import (FORMAT_VERSION, IVF_KINDS, KINDS, FaceSearchError, IndexHeader,
                                     StaleIndexError)
from index.facesearch.ivf import ADD_CHUNK
from index.facesearch.ivfpq import (DEFAULT_OPQ, DEFAULT_PQ_BITS, DEFAULT_PQ_M, OPQ_ITERATIONS, OPQ_TRAIN_ROWS,
                                    PQ_TRAIN_ROWS)
from index.facesearch.policy import (DEFAULT_TRAIN_PER_LIST, IVF_MIN_FACES, IVFPQ_MIN_FACES, KMEANS_ITERATIONS,
                                     MIN_TRAIN_PER_LIST, NLIST_PER_SQRT_N, choose_kind, ivf_nlist, kind_table)
from index.facesearch.search import RESCORE_SHORTLIST_PER_K, FaceSearch
from index.facesearch.vectors import NORM_TOLERANCE, unit_rows

__all__ = [
    "ADD_CHUNK", "CALIBRATION_K", "CALIBRATION_QUERIES", "DEFAULT_CALIBRATE_SIMILARITY", "DEFAULT_OPQ",
    "DEFAULT_PQ_BITS", "DEFAULT_PQ_M", "DEFAULT_TARGET_RECALL", "DEFAULT_TRAIN_PER_LIST", "FORMAT_VERSION",
    "FaceSearch", "FaceSearchError", "IVFPQ_MIN_FACES", "IVF_KINDS", "IVF_MIN_FACES", "IndexHeader", "KINDS",
    "KMEANS_ITERATIONS", "MIN_CALIBRATION_PAIRS", "MIN_TRAIN_PER_LIST", "NLIST_PER_SQRT_N", "NORM_TOLERANCE",
    "OPQ_ITERATIONS", "OPQ_TRAIN_ROWS", "PQ_TRAIN_ROWS", "RESCORE_SHORTLIST_PER_K", "StaleIndexError",
    "choose_kind", "ivf_nlist", "kind_table", "unit_rows",
]

_SUBMODULES = (calibration, exact, header, ivf, ivfpq, policy, search, storage, vectors)


class _Package(types.ModuleType):
    """Setting a constant here sets it in every module of the package that holds it (each reads its own)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name.isupper() and name in __all__:
            for module in _SUBMODULES:
                if name in vars(module):
                    setattr(module, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
