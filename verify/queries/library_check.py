"""The library as a check on each enrolled person's threshold (issue 28, item 2): the library's faces
scored against the person are a sample of the user's own kind of strangers (with the person's own
faces at the top), and verify.identity.library_tail estimates where the promised FAR falls among them.

`check` (the default) reports an estimate that is reliable and stricter than the cohort's threshold
("your library suggests a stricter threshold") without acting; `stricter` applies it (the threshold
source is then "library"). Measured (docs/decision.md, scripts/library_tail_check.py): the estimate
alone lands at 0.53-1.66x of the promise across people whose own faces are 0.5-10% of the library, and
where it is stricter it over-corrects (0.2-0.5x at a cost of up to 4 points of TAR), so it is not
trusted to loosen a threshold, nor applied unasked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from verify.identity.library_tail import MIN_LIBRARY_FACES, LibraryTail, StrangerCurve, fit_library_tail
from verify.identity.scoring import IdentityMatcher, identity_scores

if TYPE_CHECKING:
    from index.library import Library

log = logging.getLogger(__name__)

LIBRARY_RULES = ("check", "stricter")
THRESHOLD_SOURCE = "library"
MAX_SAMPLE_FACES = 50_000  # a larger library is checked on a fixed sample (every k-th face): seconds at 1e6
STRICTER_BY = 0.005  # similarity: a smaller difference is the fit's noise, not a suggestion
CHUNK = 65_536  # library faces scored at a time: (CHUNK, photos) similarities in memory


@dataclass(frozen=True)
class LibraryCheck:
    """One person's library check: the stored (cohort) threshold and the library's estimate, similarities."""

    name: str
    cohort_threshold: float
    fit: LibraryTail | None
    why: str = ""  # when there is no fit

    @property
    def stricter(self) -> bool:
        """A reliable estimate above the cohort's threshold by more than the fit's noise."""
        return bool(self.fit and self.fit.reliable and self.fit.similarity_threshold > self.cohort_threshold + STRICTER_BY)

    def describe(self) -> str:
        """One line for the CLI (distances, as the reports show them)."""
        if self.fit is None or not self.fit.reliable:
            return f"{self.name}: no library estimate ({self.why or self.fit.why})"
        f = self.fit
        verdict = "suggests a stricter threshold" if self.stricter else "agrees or is looser (the cohort's stands)"
        return (f"{self.name}: your library {verdict}: distance <= {1 - f.similarity_threshold:.4f} against "
                f"{1 - self.cohort_threshold:.4f} (its {f.faces:,} faces' strangers sit {f.shift:+.3f} from the cohort's; "
                f"about {f.own_share:.1%} of them look like {self.name})")

    def to_dict(self) -> dict:
        return {"name": self.name, "cohort_threshold": self.cohort_threshold, "stricter": self.stricter, "why": self.why,
                **({"library": self.fit.to_dict()} if self.fit else {})}


def library_vectors(library: "Library", model: str) -> np.ndarray:
    """(N, D) embeddings of the library's present faces of `model`, a fixed sample of at most
    ~MAX_SAMPLE_FACES of them."""
    every = max(1, int(np.ceil(library.face_count() / MAX_SAMPLE_FACES)))
    return library.embeddings(model, every=every)[1]


def library_checks(library: "Library", model: str, matcher: IdentityMatcher,
                   names: Sequence[str] | None = None) -> list[LibraryCheck]:
    """The check of each of `names` (default: everyone enrolled) against the library's faces of `model`."""
    if library.face_count() < MIN_LIBRARY_FACES:
        return [LibraryCheck(n, matcher.similarity_threshold_of(n), None,
                             f"the library holds fewer than {MIN_LIBRARY_FACES:,} faces") for n in names or matcher.pooled]
    vectors = library_vectors(library, model)  # (N, D)
    out = []
    for name in names or list(matcher.pooled):
        cal = matcher.calibrations.get(name)
        curve = StrangerCurve.stored(cal.curve) if cal is not None else None
        if curve is None:
            why = ("not calibrated on a cohort" if cal is None
                   else "calibrated before the library check; faceverify gallery recalibrate stores what it needs")
            out.append(LibraryCheck(name, matcher.similarity_threshold_of(name), None, why))
            continue
        scores = np.concatenate([identity_scores(vectors[i:i + CHUNK], matcher.pooled[name], cal.top_k)
                                 for i in range(0, len(vectors), CHUNK)] or [np.zeros(0)])  # (N,)
        fit = fit_library_tail(scores, curve, cal.target_far)
        out.append(LibraryCheck(name, cal.similarity_threshold, fit))
        log.info("%s", out[-1].describe())
    return out


def apply_stricter(matcher: IdentityMatcher, checks: Sequence[LibraryCheck]) -> IdentityMatcher:
    """A matcher whose people with a stricter library estimate use it (threshold source "library")."""
    cals = dict(matcher.calibrations)
    for c in checks:
        if c.stricter:
            cals[c.name] = replace(cals[c.name], similarity_threshold=c.fit.similarity_threshold,
                                   threshold_source=THRESHOLD_SOURCE)
    return IdentityMatcher(matcher.pooled, cals, matcher.default_similarity_threshold, matcher.top_k, matcher.candidates)
