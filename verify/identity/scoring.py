"""Scores of a query face against an enrolled identity, with a false-accept rate that is known for
that identity's enrollment.

The nearest of hundreds of enrolled vectors (photos x augmented views) is a maximum over many
comparisons, so a threshold calibrated on single pairs lets far more strangers through. Instead:
1. pool each enrolled photo's augmented views into one unit vector (mean, renormalised);
2. score a query by the mean of its top-k cosine similarities to the identity's pooled photos;
3. set that identity's threshold at the target FAR on a cohort of impostor faces (embeddings shipped
   in the model file), scored exactly the same way, and report each decision's estimated FAR as the
   fraction of cohort faces that score at least as high.

The cohort mixes sources (LFW news photos, CelebA, face sets of all ages; verify.model.cohort labels
each row). Strangers from the enrolled person's own kind of photo score higher than the cohort as a
whole, so a threshold set on the pooled cohort breaks its promise for them (issue 28). The rule
`hardest-source` therefore sets the threshold at the target FAR on each source that can resolve it
and keeps the highest: the promise then holds for every kind of stranger the cohort knows. The
enrolled person's own faces (a labelled cohort person whose faces mostly match) and near-duplicates
of an enrolled photo are left out of their calibration: they are not strangers.
Numpy only: vectors come from the gallery, cohort from the model file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from verify.model.cohort import CohortSources

# The calibration rule stored with each identity: a stored calibration of another rule (or none, as
# galleries enrolled before issue 28 have) is recalibrated when the gallery is opened with its model.
RULE_HARDEST_SOURCE = "hardest-source"
RULE_POOLED = "pooled"  # the pre-issue-28 rule: one threshold on the whole cohort
RULES = (RULE_HARDEST_SOURCE, RULE_POOLED)
# What a threshold promises (enroll --promise): the target FAR for every source of strangers the cohort
# knows, or, stricter, for the strangers of the person's own sex and age band (0.31: the share of
# CelebA partition-1 identity pairs alike in `Male` and `Young`; each source's offset read at 10x the
# FAR). docs/decision.md has what each costs in recall.
PROMISES = {"every-source": {}, "look-alike": {"lookalike_share": 0.31, "shift_depth": 10.0}}
NEAR_DUPLICATE_SIMILARITY = 0.9  # a cohort face this close to one enrolled photo is that photo, not a stranger


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
class SourceTail:
    """One cohort source's part of a calibration: its size after exclusions, the threshold at the target
    FAR on it alone, and its highest scores (descending) for estimated FARs."""

    name: str
    size: int
    similarity_threshold: float
    tail: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "threshold": self.similarity_threshold,
                "tail": [round(float(v), 6) for v in self.tail]}

    @classmethod
    def from_dict(cls, d: dict) -> "SourceTail":
        return cls(str(d["name"]), int(d["size"]), float(d["threshold"]), tuple(float(v) for v in d["tail"]))


@dataclass(frozen=True)
class IdentityCalibration:
    similarity_threshold: float  # on the identity score (accept when similarity score >= this)
    target_far: float
    far: float  # FAR of the threshold on the cohort (all sources together)
    top_k: int
    cohort_size: int  # faces scored (own faces and near-duplicates left out)
    tail: tuple[float, ...]  # highest cohort scores, descending (for estimated FAR)
    threshold_source: str = "cohort"  # which estimate set the threshold: "cohort", "cohort:<source>", "model"
    sources: tuple[SourceTail, ...] = ()  # per-source thresholds and tails (rule hardest-source)
    excluded: int = 0  # cohort faces left out as the person's own or near-duplicates of their photos
    rule: str | None = None  # None: stored before rules had names (issue 28); recalibrate
    # the cohort strangers' scores at CURVE_FARS (descending): the library check's model of a stranger's
    # score (verify.identity.library_tail); () in calibrations stored before it
    curve: tuple[float, ...] = ()

    def estimated_far(self, score: float) -> float:
        """Fraction of cohort impostors scoring >= score: with sources, that of the source where it is
        highest (the promise is per source). Reported as at least 1/cohort (a cohort of C cannot show
        less); for scores below the stored tail it is a lower bound (those are rejects)."""
        if self.sources:
            best = max(int(np.sum(np.asarray(t.tail) >= score)) / t.size for t in self.sources)
            return max(best, 1 / self.cohort_size)
        n = int(np.sum(np.asarray(self.tail) >= score))
        return max(n, 1) / self.cohort_size

    def far_is_lower_bound(self, score: float) -> bool:
        """True when `score` is below every stored cohort score: the true FAR is higher than estimated."""
        if self.sources:
            return any(len(t.tail) < t.size and (not t.tail or score < t.tail[-1]) for t in self.sources)
        return len(self.tail) < self.cohort_size and (not self.tail or score < self.tail[-1])

    def to_dict(self) -> dict:
        return {"threshold": self.similarity_threshold, "target_far": self.target_far, "far": self.far, "top_k": self.top_k,
                "cohort_size": self.cohort_size, "tail": [round(float(v), 6) for v in self.tail],
                "threshold_source": self.threshold_source, "sources": [t.to_dict() for t in self.sources],
                "excluded": self.excluded, "rule": self.rule, "curve": [round(float(v), 6) for v in self.curve]}

    @classmethod
    def from_dict(cls, d: dict) -> "IdentityCalibration":
        return cls(float(d["threshold"]), float(d["target_far"]), float(d["far"]), int(d["top_k"]),
                   int(d["cohort_size"]), tuple(float(v) for v in d["tail"]),
                   str(d.get("threshold_source", "cohort")), tuple(SourceTail.from_dict(t) for t in d.get("sources", ())),
                   int(d.get("excluded", 0)), d.get("rule"), tuple(float(v) for v in d.get("curve", ())))


def threshold_at_far(scores_desc: np.ndarray, target_far: float) -> float:
    """Accept-when->= threshold letting at most floor(target_far * n) of these (descending) impostor
    scores through: just above the (allowed+1)-th highest."""
    allowed = int(np.floor(target_far * len(scores_desc)))
    return float(np.nextafter(scores_desc[allowed], np.inf)) if allowed < len(scores_desc) else float(scores_desc[-1])


# survival levels (share of the cohort's strangers at or above a score) where a calibration keeps its
# cohort scores: dense in the tail, a few in the bulk; ~100 floats per identity
CURVE_FARS = tuple(float(v) for v in np.unique(np.round(np.concatenate(
    [np.logspace(-4, -1, 61), np.linspace(0.1, 0.95, 35)]), 8)))


def score_curve(scores_desc: np.ndarray) -> tuple[float, ...]:
    """The scores at CURVE_FARS of these descending scores (interpolated; clipped to the range held)."""
    n = len(scores_desc)
    survival = (np.arange(n) + 0.5) / n  # of scores_desc[i]
    return tuple(float(v) for v in np.interp(CURVE_FARS, survival, scores_desc))


def _tail(scores_desc: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in scores_desc[: max(50, int(0.1 * len(scores_desc)))])


def not_strangers(pooled: np.ndarray, cohort: np.ndarray, scores: np.ndarray, persons: np.ndarray | None,
                  same_person_similarity: float | None,
                  near_duplicate_similarity: float = NEAR_DUPLICATE_SIMILARITY) -> np.ndarray:
    """(C,) bool: cohort faces that are not strangers to this enrollment: near-duplicates of one enrolled
    photo (similarity >= `near_duplicate_similarity`), and every face of a labelled cohort person
    (`persons` >= 0) whose faces' median identity score reaches `same_person_similarity` (the model's pair
    threshold: most of that person's faces match, so it is the enrolled person)."""
    out = (normalise(cohort) @ pooled.T).max(axis=1) >= near_duplicate_similarity  # (C,)
    if persons is not None and same_person_similarity is not None:
        persons = np.asarray(persons)
        suspects = np.unique(persons[(scores >= same_person_similarity) & (persons >= 0)])
        for p in suspects:
            mine = persons == p
            if np.median(scores[mine]) >= same_person_similarity:
                out |= mine
    return out


def cohort_scores(pooled: np.ndarray, cohort: np.ndarray, top_k: int = 3, *, sources: "CohortSources | None" = None,
                  same_person_similarity: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(C,) identity scores of the cohort against this enrollment and (C,) bool: the faces that are
    strangers to it (with `sources`, the person's own faces and near-duplicates left out)."""
    scores = identity_scores(cohort, pooled, top_k)  # (C,)
    keep = np.ones(len(scores), dtype=bool)
    if sources is not None:
        keep = ~not_strangers(pooled, cohort, scores, sources.persons, same_person_similarity)
    return scores, keep


def calibrate_identity(pooled: np.ndarray, cohort: np.ndarray, target_far: float = 1e-3, top_k: int = 3,
                       floor: float | None = None, *, sources: "CohortSources | None" = None,
                       rule: str = RULE_HARDEST_SOURCE, same_person_similarity: float | None = None,
                       min_source_faces: int | None = None, lookalike_share: float = 1.0,
                       shift_depth: float = 1.0) -> IdentityCalibration:
    """Threshold for this enrollment at `target_far` on the cohort. `floor` (e.g. the model's pair
    threshold) keeps the threshold from dropping below a sane level when the cohort is small.

    With `sources` (per-row labels of `cohort`) and rule hardest-source: the highest of the per-source
    thresholds among sources of at least `min_source_faces` faces (default 1 / target_far: a smaller
    source cannot resolve the target), and the enrolled person's own faces and near-duplicates left out
    (see `not_strangers`; `same_person_similarity` is the model's pair threshold). Without `sources`
    (or rule pooled) one threshold on the whole cohort, as before issue 28.

    `lookalike_share` < 1 keeps the promise for the strangers who look like the person (same sex and
    age band), assumed to be that share of each source and to hold its whole tail: each source's
    threshold is then set at target_far * lookalike_share (stricter; recall pays).

    `shift_depth` m > 1 reads each source's offset from the pooled cohort at m times the FAR, where
    its strangers are m times as many, and carries it to the target (strangers' scores sit above the
    cohort's by a near-constant amount at every depth of the tail): source threshold = pooled threshold
    at the FAR + (source - pooled thresholds at m x the FAR). A source then needs 1 / (m x FAR) faces,
    and the highest of several noisy extreme scores no longer sets the threshold."""
    if len(cohort) == 0:
        raise ValueError("calibration needs a non-empty impostor cohort")
    if rule not in RULES:
        raise ValueError(f"unknown calibration rule {rule!r} (known: {', '.join(RULES)})")
    scores, keep = cohort_scores(pooled, cohort, top_k, sources=sources, same_person_similarity=same_person_similarity)
    s = np.sort(scores[keep])[::-1]  # descending
    if len(s) == 0:
        raise ValueError("every cohort face resembles the enrolled photos; no stranger is left to calibrate on")
    thr, threshold_source, tails = threshold_at_far(s, target_far), "cohort", []
    if sources is not None and rule == RULE_HARDEST_SOURCE:
        if not 0 < lookalike_share <= 1:
            raise ValueError(f"lookalike_share must be in (0, 1], got {lookalike_share}")
        per_source_far = target_far * lookalike_share
        depth_far = min(1.0, per_source_far * max(1.0, float(shift_depth)))
        need = int(np.ceil(1.0 / depth_far)) if min_source_faces is None else int(min_source_faces)
        pooled_at_far, pooled_at_depth = threshold_at_far(s, per_source_far), threshold_at_far(s, depth_far)
        best = None
        for code, name in enumerate(sources.names):
            ss = np.sort(scores[keep & (sources.codes == code)])[::-1]
            if len(ss) < need or len(ss) == 0:
                continue
            at = (threshold_at_far(ss, per_source_far) if depth_far == per_source_far
                  else pooled_at_far + threshold_at_far(ss, depth_far) - pooled_at_depth)
            t = SourceTail(name, int(len(ss)), at, _tail(ss))
            tails.append(t)
            if best is None or t.similarity_threshold > best.similarity_threshold:
                best = t
        if best is not None:
            thr, threshold_source = best.similarity_threshold, f"cohort:{best.name}"
    if floor is not None and float(floor) > thr:
        thr, threshold_source = float(floor), "model"
    far = float((s >= thr).mean())
    return IdentityCalibration(thr, float(target_far), far, int(top_k), int(len(s)), () if tails else _tail(s),
                               threshold_source, tuple(tails), int((~keep).sum()),
                               rule if sources is not None else RULE_POOLED, score_curve(s))


@dataclass(frozen=True)
class Match:
    """The decision for one face. Distances are cosine distances (1 - similarity)."""

    identity: str | None  # best-scoring enrolled identity (reported even when not a match)
    distance: float  # 1 - identity score
    distance_threshold: float  # of that identity: accept when distance <= distance_threshold
    match: bool
    far: float | None  # estimated false-accept rate of accepting at this score
    far_at_least: bool = False  # `far` is a lower bound (a score below the stored cohort tail: a clear reject)
    threshold_source: str = "model"  # which estimate set the threshold (IdentityCalibration.threshold_source)

    def to_dict(self) -> dict:
        return {"identity": self.identity if self.match else None, "nearest": self.identity,
                "distance": round(self.distance, 6), "threshold": round(self.distance_threshold, 6), "match": self.match,
                "far": self.far, "far_at_least": self.far_at_least, "threshold_source": self.threshold_source}


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
                          bool(cal and cal.far_is_lower_bound(score)), cal.threshold_source if cal else "model")
                # Prefer accepted identities, then the largest margin over their own threshold.
                key = (m.match, score - thr)
                if best is None or key > (best.match, (1.0 - best.distance) - (1.0 - best.distance_threshold)):
                    best = m
            out.append(best or Match(None, float("inf"), 1.0 - self.default_similarity_threshold, False, None))
        return out
