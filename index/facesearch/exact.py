"""Exact search in numpy (blocked matrix products): the ground truth the IVF calibration measures against."""

from __future__ import annotations

import numpy as np

_EXACT_BLOCK = 65_536  # library rows per matrix product in the exact calibration search


def exact_range_pairs(vectors: np.ndarray, queries: np.ndarray, min_similarity: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (query row, library row) with similarity >= min_similarity, by blocked matrix products."""
    qs, rows = [], []
    for start in range(0, len(vectors), _EXACT_BLOCK):
        sims = queries @ vectors[start : start + _EXACT_BLOCK].T  # (Q, B)
        q, r = np.nonzero(sims >= np.float32(min_similarity))
        qs.append(q)
        rows.append(r + start)
    return np.concatenate(qs), np.concatenate(rows)


def exact_topk_rows(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
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
