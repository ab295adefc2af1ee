"""Calibration at build time, on the library itself: nprobe for IVF, and what IVF-PQ's codes lose.

Both use the same pairs: a sample of CALIBRATION_QUERIES library vectors as queries, and every library
face at similarity >= `min_similarity` to one of them (found exactly in numpy, the query's own face left
out); a library with fewer than MIN_CALIBRATION_PAIRS such pairs (e.g. every face a different person) is
calibrated on the k = CALIBRATION_K nearest instead.

IVF-Flat (`calibrate_nprobe`): the smallest nprobe whose search finds `target_recall` of the pairs
(binary search: the cells probed at nprobe p are a subset of those at p+1).
IVF-PQ (`calibrate_ivfpq`): the smallest nprobe whose probed *cells* hold `target_recall` of the pairs,
computed exactly from the cell ranks, then what the index really returns there (PQ included): range
recall / precision, recall@10 and the similarity error (estimated - exact), recorded in the header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import faiss
import numpy as np

from index.facesearch.exact import exact_range_pairs, exact_topk_rows

DEFAULT_TARGET_RECALL = 0.99
DEFAULT_CALIBRATE_SIMILARITY = 0.5  # the `find` bound the product uses ~ the model's threshold
CALIBRATION_QUERIES = 200  # library vectors used as queries when calibrating nprobe
MIN_CALIBRATION_PAIRS = 50  # fewer range pairs than this: calibrate on k-NN recall@10 instead
CALIBRATION_K = 10


@dataclass(frozen=True)
class _Sample:
    """Library rows used as queries and the exact range pairs they have."""

    rows: np.ndarray  # (C,) library rows of the queries, ascending
    queries: np.ndarray  # (C, D)
    pair_query: np.ndarray  # (P,) index into `rows` of each range pair's query
    pair_row: np.ndarray  # (P,) library row of each range pair's face (never the query itself)


def _sample_pairs(x: np.ndarray, min_similarity: float, rng: np.random.Generator) -> _Sample:
    """CALIBRATION_QUERIES library rows as queries and their exact range pairs at `min_similarity`."""
    n = len(x)
    rows = np.sort(rng.choice(n, min(CALIBRATION_QUERIES, n), replace=False))  # (C,)
    q = x[rows]  # (C, D)
    qrow, lrow = exact_range_pairs(x, q, min_similarity)
    keep = lrow != rows[qrow]  # not the query itself
    return _Sample(rows, q, qrow[keep], lrow[keep])


def _knn_rows(x: np.ndarray, sample: _Sample, k: int) -> list[np.ndarray]:
    """Per query: the library rows of its k exact nearest neighbours, itself left out."""
    top = exact_topk_rows(x, sample.queries, k + 1)  # (C, k+1): k neighbours + the query itself
    return [r[r != sample.rows[i]][:k] for i, r in enumerate(top)]


def _radius(min_similarity: float) -> float:
    """FAISS keeps inner products strictly above the radius: the float32 just below the bound makes it >=."""
    return float(np.nextafter(np.float32(min_similarity), np.float32(-np.inf)))


def _smallest_nprobe(recall: Callable[[int], float], nlist: int, target_recall: float) -> tuple[int, float]:
    """(nprobe, its recall): binary search over 1..nlist for the smallest nprobe reaching the target
    (at nprobe = nlist every cell is searched: exact)."""
    lo, hi = 1, nlist
    measured: dict[int, float] = {}
    while lo < hi:
        mid = (lo + hi) // 2
        measured[mid] = recall(mid)
        if measured[mid] >= target_recall:
            hi = mid
        else:
            lo = mid + 1
    return lo, measured[lo] if lo in measured else recall(lo)


def calibrate_nprobe(
    index: faiss.IndexIVFFlat,
    x: np.ndarray,  # (N, D)
    ids: np.ndarray,  # (N,)
    min_similarity: float,
    target_recall: float,
    rng: np.random.Generator,
) -> tuple[int, dict[str, Any]]:
    """The smallest nprobe whose recall on a sample of the library's own vectors reaches the target.

    Recall = found / exact pairs, the query's own face left out (IVF always finds it: its own cell is
    probed first). Range pairs at `min_similarity`, else k-NN recall@10 (see the module doc).
    The exact search costs one flat pass of CALIBRATION_QUERIES queries: small next to k-means.
    """
    n = len(x)
    sample = _sample_pairs(x, min_similarity, rng)
    q = sample.queries  # (C, D)
    n_range_pairs = len(sample.pair_query)

    if n_range_pairs >= MIN_CALIBRATION_PAIRS:
        how = f"range recall at similarity >= {min_similarity}"
        # per query: catalogue ids that must be found
        exact = [ids[sample.pair_row[sample.pair_query == i]] for i in range(len(q))]
        radius = _radius(min_similarity)

        def found_ids(nprobe: int) -> list[np.ndarray]:
            lims, _, found = index.range_search(q, radius, params=faiss.SearchParametersIVF(nprobe=nprobe))
            return [found[lims[i] : lims[i + 1]] for i in range(len(q))]
    else:
        k = min(CALIBRATION_K, n - 1)
        how = f"k-NN recall@{k} (only {n_range_pairs} range pairs at similarity >= {min_similarity})"
        if k < 1:
            return 1, {"method": how, "queries": len(q), "recall": 1.0}
        exact = [ids[r] for r in _knn_rows(x, sample, k)]

        def found_ids(nprobe: int) -> list[np.ndarray]:
            _, found = index.search(q, k + 1, params=faiss.SearchParametersIVF(nprobe=nprobe))
            return list(found)

    total = sum(len(e) for e in exact)

    def recall(nprobe: int) -> float:
        hits = sum(int(np.isin(f, e).sum()) for f, e in zip(found_ids(nprobe), exact))
        return hits / max(1, total)

    nprobe, got = _smallest_nprobe(recall, int(index.nlist), target_recall)
    return nprobe, {"method": how, "queries": len(q), "pairs": total, "target": target_recall,
                    "recall": round(got, 4)}


def _pair_cell_ranks(ivf: faiss.IndexIVFPQ, transform: faiss.VectorTransform | None, x: np.ndarray,
                     queries: np.ndarray, pair_query: np.ndarray, pair_row: np.ndarray) -> np.ndarray:
    """(P,) sorted: for each pair, the rank of its face's cell among its query's cells (0 = probed first).
    A pair is found at nprobe p iff its rank is < p: recall(p) for every p at once, with no search."""
    nlist = int(ivf.nlist)

    def rotated(v: np.ndarray) -> np.ndarray:
        return v if transform is None else np.ascontiguousarray(transform.apply(v), dtype=np.float32)

    _, order = ivf.quantizer.search(rotated(queries), nlist)  # (C, nlist) cells, best first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(nlist), order.shape), axis=1)
    uniq, inverse = np.unique(pair_row, return_inverse=True)
    _, cell = ivf.quantizer.search(rotated(x[uniq]), 1)  # (U, 1)
    return np.sort(rank[pair_query, cell[inverse, 0]]) if len(pair_query) else np.zeros(0, np.int64)


def _rows_of_ids(ids: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A function from catalogue ids to their library rows."""
    sorter = np.argsort(ids)

    def row_of(found: np.ndarray) -> np.ndarray:
        return sorter[np.searchsorted(ids, found, sorter=sorter)]

    return row_of


def _range_end_to_end(index: faiss.Index, params: faiss.SearchParametersIVF, x: np.ndarray, sample: _Sample,
                      row_of: Callable[[np.ndarray], np.ndarray], min_similarity: float) -> dict[str, Any]:
    """Range recall and precision of what the index returns (estimated similarities vs the bound)."""
    q = sample.queries
    lims, _, found = index.range_search(q, _radius(min_similarity), params=params)
    hits = returned = true_returned = 0
    for i in range(len(q)):
        f = row_of(found[lims[i] : lims[i + 1]])
        f = f[f != sample.rows[i]]
        exact_i = sample.pair_row[sample.pair_query == i]
        hits += int(np.isin(exact_i, f).sum())
        returned += len(f)
        true_returned += int((x[f] @ q[i] >= np.float32(min_similarity)).sum())
    n_pairs = len(sample.pair_query)
    return {"range_recall": round(hits / max(1, n_pairs), 4) if n_pairs else None,
            "range_precision": round(true_returned / returned, 4) if returned else None}


def _knn_end_to_end(index: faiss.Index, params: faiss.SearchParametersIVF, x: np.ndarray, sample: _Sample,
                    row_of: Callable[[np.ndarray], np.ndarray], knn_rows: list[np.ndarray],
                    k: int) -> tuple[float, np.ndarray]:
    """(recall@k of what the index returns, similarity errors estimated - exact over its neighbours)."""
    q = sample.queries
    sims, got = index.search(q, k + 1, params=params)  # (C, k+1)
    knn_hits, errors = 0, []
    for i in range(len(q)):
        valid = got[i] >= 0
        f, s = row_of(got[i][valid]), sims[i][valid]
        not_self = f != sample.rows[i]
        f, s = f[not_self][:k], s[not_self][:k]
        knn_hits += int(np.isin(knn_rows[i], f).sum())
        errors.append(s - x[f] @ q[i])
    recall = knn_hits / max(1, sum(len(r) for r in knn_rows))
    return recall, np.concatenate(errors).astype(np.float64)


def calibrate_ivfpq(
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
    pairs (or the given `nprobe`), then what the index really returns at that nprobe (PQ included).

    PQ loses pairs whose *estimated* similarity falls below the bound (and adds some from just below it):
    `range_recall` / `range_precision` (range pairs) and `knn_recall@10` measure that, and
    `similarity_error` is estimated minus exact similarity over the returned neighbours.
    """
    n = len(x)
    sample = _sample_pairs(x, min_similarity, rng)
    n_range_pairs = len(sample.pair_query)
    k = max(1, min(CALIBRATION_K, n - 1))
    knn_rows = _knn_rows(x, sample, k)
    if n_range_pairs >= MIN_CALIBRATION_PAIRS:
        how = f"cell recall of the range pairs at similarity >= {min_similarity}"
        pair_q, pair_l = sample.pair_query, sample.pair_row
    else:
        how = f"cell recall of the {k} nearest (only {n_range_pairs} range pairs at similarity >= {min_similarity})"
        pair_q = np.concatenate([np.full(len(r), i) for i, r in enumerate(knn_rows)])
        pair_l = np.concatenate(knn_rows)

    pair_rank = _pair_cell_ranks(ivf, transform, x, sample.queries, pair_q, pair_l)  # (P,) sorted
    if nprobe is None:
        need = math.ceil(target_recall * len(pair_rank))
        nprobe = 1 if need == 0 else int(pair_rank[need - 1]) + 1
    cell_recall = float(np.mean(pair_rank < nprobe)) if len(pair_rank) else 1.0

    # End to end at that nprobe.
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    row_of = _rows_of_ids(ids)
    out: dict[str, Any] = {"method": how, "queries": len(sample.queries), "pairs": int(len(pair_rank)),
                           "target": target_recall, "cell_recall": round(cell_recall, 4)}
    out.update(_range_end_to_end(index, params, x, sample, row_of, min_similarity))
    knn_recall, err = _knn_end_to_end(index, params, x, sample, row_of, knn_rows, k)
    out[f"knn_recall@{k}"] = round(knn_recall, 4)
    out["recall"] = out["range_recall"] if n_range_pairs >= MIN_CALIBRATION_PAIRS else out[f"knn_recall@{k}"]
    out["similarity_error"] = {"mean": round(float(err.mean()), 4), "sd": round(float(err.std()), 4),
                               "p99_abs": round(float(np.quantile(np.abs(err), 0.99)), 4)} if len(err) else {}
    return nprobe, out
