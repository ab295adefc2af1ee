"""Scores of a query face against an enrolled identity, with a false-accept rate that is known for
that identity's enrollment.

The nearest of hundreds of enrolled vectors (photos x augmented views) is a maximum over many
comparisons, so a threshold calibrated on single pairs lets far more strangers through. Instead:
1. pool each enrolled photo's augmented views into one unit vector (mean, renormalised);
2. score a query by the mean of its top-k cosine similarities to the identity's pooled photos;
3. set that identity's threshold at the target FAR on a cohort of impostor faces (embeddings shipped
   in the model file), scored exactly the same way, and report each decision's estimated FAR as the
   fraction of cohort faces that score at least as high.
Numpy only: vectors come from the gallery, cohort from the model file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def pool_photos(vectors: np.ndarray, photo_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) view vectors + (n,) photo keys -> (keys (m,), pooled unit vectors (m, D))."""
    keys, inv = np.unique(np.asarray(photo_keys), return_inverse=True)
    pooled = np.zeros((len(keys), vectors.shape[1]), dtype=np.float64)
    np.add.at(pooled, inv, vectors)
    return keys, normalise(pooled)


def identity_scores(queries: np.ndarray, pooled: np.ndarray, top_k: int = 3) -> np.ndarray:
    """(Q, D) queries vs (m, D) pooled photos -> (Q,) mean of the top-k cosine similarities."""
    sims = normalise(queries) @ pooled.T  # (Q, m)
    k = max(1, min(top_k, pooled.shape[0]))
    top = -np.partition(-sims, k - 1, axis=1)[:, :k]
    return top.mean(axis=1)


@dataclass(frozen=True)
class IdentityCalibration:
    similarity_threshold: float  # on the identity score (accept when similarity score >= this)
    target_far: float
    far: float  # FAR of the threshold on the cohort
    top_k: int
    cohort_size: int
    tail: tuple[float, ...]  # highest cohort scores, descending (for estimated FAR)

    def estimated_far(self, score: float) -> float:
        """Fraction of cohort impostors scoring >= score. Reported as at least 1/cohort (a cohort of C
        cannot show less); for scores below the stored tail it is a lower bound (those are rejects)."""
        n = int(np.sum(np.asarray(self.tail) >= score))
        return max(n, 1) / self.cohort_size

    def far_is_lower_bound(self, score: float) -> bool:
        """True when `score` is below every stored cohort score: the true FAR is higher than estimated."""
        return len(self.tail) < self.cohort_size and (not self.tail or score < self.tail[-1])

    def to_dict(self) -> dict:
        return {"threshold": self.similarity_threshold, "target_far": self.target_far, "far": self.far, "top_k": self.top_k,
                "cohort_size": self.cohort_size, "tail": [round(float(v), 6) for v in self.tail]}

    @classmethod
    def from_dict(cls, d: dict) -> "IdentityCalibration":
        return cls(float(d["threshold"]), float(d["target_far"]), float(d["far"]), int(d["top_k"]),
                   int(d["cohort_size"]), tuple(float(v) for v in d["tail"]))


def calibrate_identity(pooled: np.ndarray, cohort: np.ndarray, target_far: float = 1e-3, top_k: int = 3,
                       floor: float | None = None) -> IdentityCalibration:
    """Threshold for this enrollment at `target_far` on the cohort. `floor` (e.g. the model's pair
    threshold) keeps the threshold from dropping below a sane level when the cohort is small."""
    if len(cohort) == 0:
        raise ValueError("calibration needs a non-empty impostor cohort")
    s = np.sort(identity_scores(cohort, pooled, top_k))[::-1]  # descending
    allowed = int(np.floor(target_far * len(s)))  # impostors allowed at or above the threshold
    # Accept when score >= threshold: put it just above the (allowed+1)-th highest cohort score.
    thr = float(np.nextafter(s[allowed], np.inf)) if allowed < len(s) else float(s[-1])
    if floor is not None:
        thr = max(thr, float(floor))
    far = float((s >= thr).mean())
    tail = tuple(float(v) for v in s[: max(50, int(0.1 * len(s)))])
    return IdentityCalibration(thr, float(target_far), far, int(top_k), int(len(s)), tail)


@dataclass(frozen=True)
class Match:
    """The decision for one face. Distances are cosine distances (1 - similarity)."""

    identity: str | None  # best-scoring enrolled identity (reported even when not a match)
    distance: float  # 1 - identity score
    distance_threshold: float  # of that identity: accept when distance <= distance_threshold
    match: bool
    far: float | None  # estimated false-accept rate of accepting at this score
    far_at_least: bool = False  # `far` is a lower bound (a score below the stored cohort tail: a clear reject)

    def to_dict(self) -> dict:
        return {"identity": self.identity if self.match else None, "nearest": self.identity,
                "distance": round(self.distance, 6), "threshold": round(self.distance_threshold, 6), "match": self.match,
                "far": self.far, "far_at_least": self.far_at_least}


class IdentityMatcher:
    """Scores faces against enrolled identities (pooled photos, top-k mean, per-identity threshold).

    `candidates(queries) -> list[list[str]]` narrows each query to a few identities (the CLI passes a
    FAISS nearest-neighbour search over the gallery); None scores every identity.
    """

    def __init__(self, pooled: dict[str, np.ndarray], calibrations: dict[str, IdentityCalibration],
                 default_similarity_threshold: float, top_k: int = 3, candidates=None) -> None:
        self.pooled = pooled
        self.calibrations = calibrations
        self.default_similarity_threshold = float(default_similarity_threshold)  # from the model file
        self.top_k = top_k
        self.candidates = candidates

    def similarity_threshold_of(self, name: str) -> float:
        cal = self.calibrations.get(name)
        return cal.similarity_threshold if cal else self.default_similarity_threshold

    def __call__(self, queries: np.ndarray, only: str | None = None) -> list[Match]:
        """(F, D) face embeddings -> one Match per face; `only` checks one claimed identity (1:1)."""
        queries = np.asarray(queries, dtype=np.float32)
        if len(queries) == 0:
            return []
        if only is not None:
            if only not in self.pooled:
                raise KeyError(f"identity {only!r} is not enrolled")
            names = [[only]] * len(queries)
        elif self.candidates is not None:
            names = self.candidates(queries)
        else:
            names = [list(self.pooled)] * len(queries)
        out = []
        for q, cands in zip(queries, names):
            best: Match | None = None
            for name in dict.fromkeys(c for c in cands if c in self.pooled):
                score = float(identity_scores(q[None], self.pooled[name], self.top_k)[0])
                thr = self.similarity_threshold_of(name)
                cal = self.calibrations.get(name)
                m = Match(name, 1.0 - score, 1.0 - thr, score >= thr, cal.estimated_far(score) if cal else None,
                          bool(cal and cal.far_is_lower_bound(score)))
                # Prefer accepted identities, then the largest margin over their own threshold.
                key = (m.match, score - thr)
                if best is None or key > (best.match, (1.0 - best.distance) - (1.0 - best.distance_threshold)):
                    best = m
            out.append(best or Match(None, float("inf"), 1.0 - self.default_similarity_threshold, False, None))
        return out
