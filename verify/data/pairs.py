"""Verification pairs: LFW pair files (View 1 and View 2) and seeded pairs for held-out identities.

LFW formats (whitespace-separated, tabs in the official files):
- View 1 (`pairsDevTrain.txt`, `pairsDevTest.txt`): a line `N`, then N lines `name i j` (same person),
  then N lines `name1 i name2 j` (different people). fold = -1.
- View 2 (`pairs.txt`): a line `F N` (officially `10 300`), then F folds, each N same-person lines
  followed by N different-person lines. fold = 0 .. F-1.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["name1", "idx1", "name2", "idx2", "same", "fold"]


class PairsFileError(ValueError):
    """A malformed pair file; the message names the file and line."""


def _index(path: Path, lineno: int, field: str) -> int:
    try:
        value = int(field)
    except ValueError:
        raise PairsFileError(f"{path}:{lineno}: image number {field!r} is not an integer") from None
    if value < 1:
        raise PairsFileError(f"{path}:{lineno}: image number {value} must be >= 1")
    return value


def read_lfw_pairs(path: str | os.PathLike) -> pd.DataFrame:
    """Parse an LFW View 1 or View 2 pair file into columns name1, idx1, name2, idx2, same, fold.

    Raises PairsFileError (file:line) on a malformed header, a line of the wrong shape for its
    position (same-person lines have 3 fields, different-person lines 4), a same-person line whose
    two images are the same, or a line count that does not match the header. Blank lines are ignored.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"LFW pair file not found: {path}") from None
    lines = [(no, line.split()) for no, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise PairsFileError(f"{path}: empty pair file")
    head_no, head = lines[0]
    try:
        numbers = [int(x) for x in head]
    except ValueError:
        raise PairsFileError(f"{path}:{head_no}: header must be 'N' (View 1) or 'FOLDS N' (View 2), got {' '.join(head)!r}") from None
    if len(numbers) == 1:
        n_folds, per_half, view1 = 1, numbers[0], True
    elif len(numbers) == 2:
        (n_folds, per_half), view1 = numbers, False
    else:
        raise PairsFileError(f"{path}:{head_no}: header must be 'N' (View 1) or 'FOLDS N' (View 2), got {' '.join(head)!r}")
    if n_folds < 1 or per_half < 1:
        raise PairsFileError(f"{path}:{head_no}: header counts must be positive, got {' '.join(head)!r}")

    body = lines[1:]
    expected = n_folds * 2 * per_half
    if len(body) != expected:
        where = body[min(len(body), expected) - 1][0] if body else head_no
        raise PairsFileError(
            f"{path}:{where}: header {' '.join(head)!r} announces {expected} pairs, file has {len(body)}"
        )
    rows = []
    for k, (no, fields) in enumerate(body):
        fold, pos = divmod(k, 2 * per_half)
        same = pos < per_half
        if same:
            if len(fields) != 3:
                raise PairsFileError(f"{path}:{no}: expected a same-person line 'name i j', got {len(fields)} fields")
            name, i, j = fields
            i, j = _index(path, no, i), _index(path, no, j)
            if i == j:
                raise PairsFileError(f"{path}:{no}: same-person pair uses image {i} twice")
            rows.append((name, i, name, j, True, -1 if view1 else fold))
        else:
            if len(fields) != 4:
                raise PairsFileError(
                    f"{path}:{no}: expected a different-person line 'name1 i name2 j', got {len(fields)} fields"
                )
            n1, i, n2, j = fields
            if n1 == n2:
                raise PairsFileError(f"{path}:{no}: different-person pair names {n1!r} twice")
            rows.append((n1, _index(path, no, i), n2, _index(path, no, j), False, -1 if view1 else fold))
    df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    df = df.astype({"idx1": "int64", "idx2": "int64", "same": bool, "fold": "int64"})
    log.debug("%s: %d pairs (%s)", path, len(df), "View 1" if view1 else f"View 2, {n_folds} folds")
    return df


def lfw_image_path(root: str | os.PathLike, name: str, idx: int) -> Path:
    """`root/NAME/NAME_0001.jpg`; root is the folder holding the per-person folders (e.g. lfw-deepfunneled)."""
    return Path(root) / name / f"{name}_{int(idx):04d}.jpg"


def _allocate(capacity: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split `total` as evenly as possible over slots, none above its capacity (water filling):
    every slot gets min(capacity, L) for the largest level L that fits, and the remainder goes as +1
    to slots (drawn at random) whose capacity exceeds L."""
    capacity = np.asarray(capacity, dtype=np.int64)
    if total <= 0 or len(capacity) == 0:
        return np.zeros(len(capacity), dtype=np.int64)
    lo, hi = 0, int(capacity.max())
    while lo < hi:  # largest L with sum(min(capacity, L)) <= total
        mid = (lo + hi + 1) // 2
        if np.minimum(capacity, mid).sum() <= total:
            lo = mid
        else:
            hi = mid - 1
    alloc = np.minimum(capacity, lo)
    remainder = total - int(alloc.sum())
    room = np.flatnonzero(capacity > lo)
    alloc[rng.permutation(room)[:remainder]] += 1
    return alloc


def _genuine_candidates(members: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
    """All pairs of one identity's images, ordered so the first ceil(n/2) cover every image once."""
    perm = rng.permutation(members)
    n = len(perm)
    cover = [(int(perm[t]), int(perm[t + 1])) for t in range(0, n - 1, 2)]
    if n % 2:
        cover.append((int(perm[-1]), int(perm[0])))
    seen = {tuple(sorted(c)) for c in cover}
    rest = [(int(perm[a]), int(perm[b])) for a in range(n) for b in range(a + 1, n)]
    rest = [rest[t] for t in rng.permutation(len(rest))]
    return cover + [c for c in rest if tuple(sorted(c)) not in seen]


def make_identity_pairs(
    identities: np.ndarray, n_genuine: int, n_impostor: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic genuine and impostor pairs over all images of a held-out split.

    `identities` holds one identity label per image; the returned (i, j, same) index into it, genuine
    pairs first. Genuine pairs are spread as evenly as possible over identities with >= 2 images
    (each identity's first pairs cover all of its images); impostor pairs take each image in turn
    (shuffled) as first member with a random image of another identity. No pair of an image with
    itself and no duplicate pair (i, j) == (j, i). Raises ValueError when the split cannot supply
    the requested counts.
    """
    ids = np.asarray(identities)
    if ids.ndim != 1:
        raise ValueError(f"identities must be 1-D (one label per image), got shape {ids.shape}")
    if n_genuine < 0 or n_impostor < 0:
        raise ValueError(f"pair counts must be >= 0, got n_genuine={n_genuine}, n_impostor={n_impostor}")
    rng = np.random.default_rng(seed)
    _, inv = np.unique(ids, return_inverse=True)
    counts = np.bincount(inv) if len(inv) else np.zeros(0, dtype=np.int64)
    groups = [np.flatnonzero(inv == c) for c in range(len(counts))]

    capacity = counts * (counts - 1) // 2
    if n_genuine > capacity.sum():
        raise ValueError(
            f"asked for {n_genuine} genuine pairs but {len(ids)} images of {len(counts)} identities "
            f"allow only {int(capacity.sum())}"
        )
    impostor_capacity = (len(ids) ** 2 - int(np.sum(counts**2))) // 2
    if n_impostor > impostor_capacity:
        raise ValueError(f"asked for {n_impostor} impostor pairs but this split allows only {impostor_capacity}")

    gi: list[int] = []
    gj: list[int] = []
    for c, take in enumerate(_allocate(capacity, n_genuine, rng)):
        if take:
            for a, b in _genuine_candidates(groups[c], rng)[:take]:
                gi.append(min(a, b))
                gj.append(max(a, b))

    ii: list[int] = []
    ij: list[int] = []
    if n_impostor:
        seen: set[tuple[int, int]] = set()
        if n_impostor > impostor_capacity // 2:
            # Dense request: enumerate every impostor pair and sample without replacement.
            a, b = np.triu_indices(len(ids), k=1)
            diff = inv[a] != inv[b]
            a, b = a[diff], b[diff]
            pick = np.sort(rng.choice(len(a), size=n_impostor, replace=False))
            ii, ij = a[pick].tolist(), b[pick].tolist()
        else:
            while len(ii) < n_impostor:
                for x in rng.permutation(len(ids)):
                    y = int(rng.integers(len(ids)))
                    if inv[x] == inv[y]:
                        continue
                    key = (min(int(x), y), max(int(x), y))
                    if key in seen:
                        continue
                    seen.add(key)
                    ii.append(key[0])
                    ij.append(key[1])
                    if len(ii) == n_impostor:
                        break

    i = np.asarray(gi + ii, dtype=np.int64)
    j = np.asarray(gj + ij, dtype=np.int64)
    same = np.r_[np.ones(len(gi), dtype=bool), np.zeros(len(ii), dtype=bool)]
    return i, j, same
