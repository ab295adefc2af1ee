"""Input checks: vectors, ids and a given coarse quantiser are validated, not repaired.

A wrong shape, a NaN/inf, or a row whose norm is not 1 within NORM_TOLERANCE is a ValueError. A non-unit
row means the caller handed over something other than the catalogue's normalised embeddings (a bug worth
surfacing), and silently rescaling would also copy the whole library (512 MB at 1e6 faces). `unit_rows()`
is there for callers that want to normalise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

NORM_TOLERANCE = 1e-4  # |norm - 1| allowed; float32 normalisation leaves ~1e-7


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a float32 copy); for callers whose vectors are not normalised yet."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)  # float64: no overflow
    if np.any(norms < 1e-12):
        raise ValueError("unit_rows: a row has zero norm")
    return (x / norms).astype(np.float32)


def unit_matrix(x: Any, what: str, dim: int | None = None) -> np.ndarray:
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


def check_ids(ids: Any, n: int) -> np.ndarray:
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


def check_coarse(centroids: Any, assignment: Any, n: int, dim: int,
                  nlist: int | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Validate a given coarse quantiser: (centroids (nlist, D) float32 unit rows, assignment (N,) int64
    cells in 0..nlist-1), either None."""
    if centroids is None:
        if assignment is not None:
            raise ValueError("assignment needs the centroids it was computed with")
        return None, None
    c = unit_matrix(centroids, "centroids", dim)  # (nlist, D)
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

