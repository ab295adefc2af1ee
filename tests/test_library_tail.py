"""The library check (issue 28, item 2): a synthetic library whose strangers are shifted against the
cohort, with the person's own faces at the top, gives back the promised FAR; too small a library
leaves the cohort's threshold standing."""

from __future__ import annotations

import numpy as np
import pytest

from verify.identity.library_tail import MIN_LIBRARY_FACES, StrangerCurve, fit_library_tail
from verify.identity.scoring import CURVE_FARS, calibrate_identity, normalise, score_curve

TARGET = 1e-3


def strangers(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Identity-score-like stranger scores: a skewed bulk around 0.15 with a light right tail."""
    return 0.15 + shift + 0.09 * rng.standard_normal(n) + 0.04 * rng.standard_gamma(2.0, n)


def far_at(threshold: float, scores: np.ndarray) -> float:
    return float(np.mean(scores >= threshold))


@pytest.mark.parametrize("own_share", [0.01, 0.05, 0.10])
def test_shifted_library_recovers_the_promise(own_share: float) -> None:
    rng = np.random.default_rng(int(own_share * 1000))
    cohort = strangers(rng, 40_000)
    curve = StrangerCurve.from_scores(cohort)
    shift = 0.06  # the library's strangers look more alike than the cohort's
    lib_strangers = strangers(rng, 12_000, shift)
    n_own = int(round(own_share * len(lib_strangers) / (1 - own_share)))
    own = np.clip(0.72 + 0.08 * rng.standard_normal(n_own), -1, 1)
    fit = fit_library_tail(np.concatenate([lib_strangers, own]), curve, TARGET)
    assert fit.reliable, fit.why
    fresh = strangers(rng, 400_000, shift)  # measured on strangers the fit never saw
    cohort_threshold = curve.score_at(TARGET)
    assert far_at(cohort_threshold, fresh) > 3 * TARGET  # the cohort's threshold breaks the promise here
    assert 0.5 * TARGET <= far_at(fit.similarity_threshold, fresh) <= 1.5 * TARGET
    assert fit.shift == pytest.approx(shift, abs=0.02)
    assert fit.own_share == pytest.approx(own_share, rel=0.5)


def test_library_like_the_cohort_keeps_its_threshold() -> None:
    rng = np.random.default_rng(7)
    cohort = strangers(rng, 40_000)
    curve = StrangerCurve.from_scores(cohort)
    lib = np.concatenate([strangers(rng, 6_000), 0.7 + 0.08 * rng.standard_normal(60)])
    fit = fit_library_tail(lib, curve, TARGET)
    assert fit.reliable
    assert abs(fit.similarity_threshold - curve.score_at(TARGET)) < 0.02


def test_too_few_library_faces_leave_the_cohort_threshold() -> None:
    rng = np.random.default_rng(3)
    curve = StrangerCurve.from_scores(strangers(rng, 20_000))
    fit = fit_library_tail(strangers(rng, MIN_LIBRARY_FACES - 1, 0.1), curve, TARGET)
    assert not fit.reliable and "faces" in fit.why
    assert fit.similarity_threshold == curve.score_at(TARGET)


def test_calibration_stores_the_cohort_curve() -> None:
    rng = np.random.default_rng(0)
    cohort = normalise(rng.standard_normal((5_000, 32)))
    pooled = normalise(rng.standard_normal((3, 32)))
    cal = calibrate_identity(pooled, cohort, target_far=TARGET)
    assert len(cal.curve) == len(CURVE_FARS)
    assert all(a >= b for a, b in zip(cal.curve, cal.curve[1:]))  # descending with the FAR ascending
    curve = StrangerCurve.stored(cal.curve)
    assert curve is not None
    # the curve's survival at its own points is the share of cohort scores at or above them
    from verify.identity.scoring import identity_scores
    s = identity_scores(cohort, pooled)
    for far in (1e-2, 0.1, 0.5):
        assert far_at(curve.score_at(far), s) == pytest.approx(far, rel=0.15)
    assert type(cal).from_dict(cal.to_dict()).curve == pytest.approx(cal.curve, abs=1e-6)
    assert StrangerCurve.stored(()) is None  # a calibration stored before the check


def test_score_curve_is_monotonic() -> None:
    s = np.sort(np.random.default_rng(1).normal(size=1000))[::-1]
    c = score_curve(s)
    assert all(a >= b for a, b in zip(c, c[1:]))
