"""The user's own library as a sample of strangers (issue 28, item 2): a robust estimate of where an
enrolled person's threshold should sit for the kind of photos the library holds.

The scores of every library face against one enrolled person are a mixture: strangers (most of the
library) and the person's own faces (a few percent, at the top). Strangers from another domain than the
impostor cohort score higher or lower than the cohort by a near-constant amount at every depth of the
tail (issue 28's measurements), so the strangers' part is modelled as the cohort's own score distribution
shifted by `shift`, and the person's part as a normal component; both are fitted together by maximum
likelihood on the library's upper scores (binned, Poisson counts), with the count below the fit region
as one more bin. Reading the shift from the bulk alone over-corrects (the person's faces sit in the
library's top and inflate it); a mixture that models them does not.

The library threshold is the cohort's threshold at the target FAR carried by the fitted shift. It is an
estimate, reported beside the cohort's threshold; `LibraryTail.reliable` says whether the fit passed the
checks that keep it from acting on a library too small or a fit that did not separate the two parts.
Numpy + scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from verify.identity.scoring import CURVE_FARS, score_curve

MIN_LIBRARY_FACES = 2000  # below this many faces the library's tail is not estimated (issue 28: ">= 2,000")
# the fit sees library scores above the cohort's score at this FAR (the tail and the person): chosen on
# CelebA partition-1 people among 0.3 / 0.2 / 0.1 / 0.05 (scripts/library_tail_check.py --select)
FIT_DEPTH = 0.05
BIN_WIDTH = 0.005  # similarity units
MAX_OWN_SHARE = 0.2  # a fit that gives the person more of the library than this did not separate the parts
SHIFT_BOUNDS = (-0.2, 0.25)  # similarity units; beyond them the cohort's shape is no model of the library
SIGMA_BOUNDS = (0.02, 0.25)  # the person's part: its spread of similarities


@dataclass(frozen=True)
class LibraryTail:
    """A fit of one person's library scores. Similarities (higher = more alike); `shift` is how far the
    library's strangers sit above the cohort's strangers."""

    faces: int  # library faces scored
    shift: float  # similarity units
    own_share: float  # fitted share of the library that is the person's own faces
    own_mean: float  # the person's component: mean similarity
    similarity_threshold: float  # at the target FAR on the library's strangers (cohort threshold + shift)
    target_far: float
    reliable: bool
    why: str  # "" when reliable, else the check that failed (one phrase)

    def to_dict(self) -> dict:
        return {"faces": self.faces, "shift": round(self.shift, 6), "own_share": round(self.own_share, 6),
                "own_mean": round(self.own_mean, 6), "threshold": round(self.similarity_threshold, 6),
                "target_far": self.target_far, "reliable": self.reliable, "why": self.why}


@dataclass(frozen=True)
class StrangerCurve:
    """A person's cohort strangers' score distribution: `scores[i]` is the score that a share `fars[i]` of
    them reach (fars ascending, scores descending), as calibrations store it (scoring.CURVE_FARS)."""

    fars: np.ndarray
    scores: np.ndarray

    @classmethod
    def from_scores(cls, scores: np.ndarray) -> "StrangerCurve":
        return cls(np.asarray(CURVE_FARS), np.asarray(score_curve(np.sort(np.asarray(scores, np.float64))[::-1])))

    @classmethod
    def stored(cls, curve: tuple[float, ...]) -> "StrangerCurve | None":
        """The curve of a stored calibration; None when it holds none (calibrated before the check)."""
        return cls(np.asarray(CURVE_FARS), np.asarray(curve, np.float64)) if len(curve) == len(CURVE_FARS) else None

    def survival(self, x: np.ndarray) -> np.ndarray:
        """Share of strangers scoring >= x: log-linear between the stored points, rising to 1 a score unit
        below the bulk's last one, and falling on with the last decade's slope past the deepest one."""
        xs, logp = self.scores[::-1], np.log(self.fars[::-1])  # ascending scores
        slope = (logp[-1] - logp[-11]) / max(xs[-1] - xs[-11], 1e-6)  # log-survival per score unit, < 0
        xs = np.concatenate([[xs[0] - 1.0], xs, [xs[-1] + 1.0]])
        logp = np.concatenate([[0.0], logp, [logp[-1] + slope]])
        return np.exp(np.interp(x, xs, logp))

    def score_at(self, far: float) -> float:
        """The score a share `far` of strangers reach (interpolated in log FAR)."""
        return float(np.interp(np.log(far), np.log(self.fars), self.scores))


def fit_library_tail(library_scores: np.ndarray, strangers: StrangerCurve, target_far: float = 1e-3, *,
                     min_faces: int = MIN_LIBRARY_FACES, depth: float = FIT_DEPTH,
                     bin_width: float = BIN_WIDTH) -> LibraryTail:
    """Fit strangers = cohort shifted + the person's own faces = normal to (N,) library scores of one
    person; `strangers` is that person's cohort curve (own faces and near-duplicates left out, as in
    their calibration). The threshold is the cohort's at `target_far` plus the fitted shift."""
    lib = np.asarray(library_scores, dtype=np.float64)
    lib = lib[np.isfinite(lib)]
    base = strangers.score_at(target_far)
    if len(lib) < min_faces:
        return LibraryTail(len(lib), 0.0, 0.0, float("nan"), base, target_far, False,
                           f"library holds {len(lib)} faces (< {min_faces})")
    # imported here, not at the top: scipy.optimize costs ~0.2 s to import, and every `find` and `scan`
    # imports this module while most libraries are too small to be fitted
    from scipy.optimize import minimize
    from scipy.special import ndtr

    sbar = strangers.survival
    u = strangers.score_at(depth)  # fit region: scores >= u
    top = max(float(lib.max()), float(strangers.scores[0]) + SHIFT_BOUNDS[1]) + bin_width
    edges = np.arange(u, top + bin_width, bin_width)
    counts = np.histogram(lib, bins=edges)[0].astype(np.float64)
    below = float(np.sum(lib < u))
    n = float(len(lib))

    def expected(p: np.ndarray) -> tuple[np.ndarray, float]:
        shift, own_logit, mu, log_sigma = p
        own = n / (1.0 + np.exp(-own_logit))
        sigma = np.exp(log_sigma)
        stranger_mass = -np.diff(sbar(edges - shift))  # (bins,)
        own_mass = np.diff(ndtr((edges - mu) / sigma))
        lam = (n - own) * stranger_mass + own * own_mass
        lam_below = (n - own) * (1.0 - sbar(u - shift)) + own * ndtr((u - mu) / sigma)
        return lam, lam_below

    def nll(p: np.ndarray) -> float:
        # the person's part sits above the strangers' threshold (most of their faces are accepted): without
        # that bound a library with few of their faces lets it swallow the strangers' own tail
        if not (SHIFT_BOUNDS[0] <= p[0] <= SHIFT_BOUNDS[1] and p[2] >= base + p[0] and SIGMA_BOUNDS[0] <= np.exp(p[3]) <= SIGMA_BOUNDS[1]):
            return 1e18
        lam, lam_below = expected(p)
        lam = np.maximum(lam, 1e-12)
        return float(-(counts @ np.log(lam) - lam.sum()) - (below * np.log(max(lam_below, 1e-12)) - lam_below))

    best = None
    for shift0 in (-0.05, 0.0, 0.05, 0.1):
        for own0 in (0.005, 0.05):
            p0 = np.array([shift0, np.log(own0 / (1 - own0)), base + shift0 + 0.15, np.log(0.08)])
            r = minimize(nll, p0, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-3, "maxiter": 2000})
            if best is None or r.fun < best.fun:
                best = r
    shift, own_logit, mu, _ = best.x
    own_share = float(1.0 / (1.0 + np.exp(-own_logit)))
    threshold = base + float(shift)
    why = ""
    if own_share > MAX_OWN_SHARE:
        why = f"the fit gives the person {own_share:.0%} of the library (> {MAX_OWN_SHARE:.0%})"
    elif not (SHIFT_BOUNDS[0] + 0.01 < shift < SHIFT_BOUNDS[1] - 0.01):
        why = f"the fitted shift {shift:+.3f} is at its bound"
    return LibraryTail(len(lib), float(shift), own_share, float(mu), float(threshold), target_far, not why, why)
