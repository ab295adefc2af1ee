"""Identity scoring: pooled photos, top-k mean, per-identity threshold at a target FAR on a cohort."""

from __future__ import annotations

import numpy as np
import pytest

from verify.identity.scoring import (IdentityCalibration, IdentityMatcher, calibrate_identity, identity_scores, normalise,
                            pool_photos)


def _cluster(rng, centre, n, spread):
    return normalise(centre + spread * rng.standard_normal((n, centre.shape[-1])))


def test_pool_photos_averages_views_of_each_photo(rng):
    v = normalise(rng.standard_normal((6, 8)))
    keys = np.array(["b", "a", "b", "a", "c", "b"])
    k, pooled = pool_photos(v, keys)
    assert list(k) == ["a", "b", "c"]
    expect_b = normalise(v[[0, 2, 5]].sum(0))
    np.testing.assert_allclose(pooled[1], expect_b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1, atol=1e-6)


def test_identity_scores_is_top_k_mean_of_similarities(rng):
    q = normalise(rng.standard_normal((5, 16)))
    p = normalise(rng.standard_normal((7, 16)))
    got = identity_scores(q, p, top_k=3)
    brute = np.array([np.sort(p @ qi)[::-1][:3].mean() for qi in q])
    np.testing.assert_allclose(got, brute, atol=1e-6)
    # top_k larger than the number of photos uses them all
    np.testing.assert_allclose(identity_scores(q, p[:2], top_k=5), (q @ p[:2].T).mean(1), atol=1e-6)


def test_calibration_meets_target_far_on_the_cohort(rng):
    d = 32
    me = rng.standard_normal(d)
    pooled = _cluster(rng, me, 12, 0.6)
    cohort = normalise(rng.standard_normal((5000, d)))
    for far in (1e-1, 1e-2, 1e-3):
        cal = calibrate_identity(pooled, cohort, target_far=far, top_k=3)
        s = identity_scores(cohort, pooled, 3)
        observed = (s >= cal.similarity_threshold).mean()
        assert observed <= far + 1e-12
        assert observed == pytest.approx(cal.far)
        # the threshold is tight: the next cohort score above it would exceed the budget
        assert observed >= far - 2 / len(cohort)
    # a fresh cohort from the same distribution sees about the same FAR (held-out check)
    cal = calibrate_identity(pooled, cohort, target_far=1e-2)
    fresh = normalise(rng.standard_normal((20000, d)))
    assert (identity_scores(fresh, pooled, 3) >= cal.similarity_threshold).mean() == pytest.approx(1e-2, abs=4e-3)


def test_more_enrolled_photos_do_not_inflate_false_accepts(rng):
    """Max-over-many-vectors inflates FAR; the calibrated threshold rises to compensate."""
    d = 32
    cohort = normalise(rng.standard_normal((4000, d)))
    strangers = normalise(rng.standard_normal((4000, d)))
    me = rng.standard_normal(d)
    fars = []
    for n in (3, 45):
        pooled = _cluster(rng, me, n, 1.5)
        cal = calibrate_identity(pooled, cohort, target_far=1e-2)
        fars.append((identity_scores(strangers, pooled, 3) >= cal.similarity_threshold).mean())
    assert max(fars) < 2.5e-2


def test_estimated_far_and_round_trip(rng):
    pooled = normalise(rng.standard_normal((4, 16)))
    cohort = normalise(rng.standard_normal((1000, 16)))
    cal = calibrate_identity(pooled, cohort, target_far=1e-2)
    again = IdentityCalibration.from_dict(cal.to_dict())
    assert again.similarity_threshold == pytest.approx(cal.similarity_threshold, abs=1e-6)
    s = np.sort(identity_scores(cohort, pooled, 3))[::-1]
    assert again.estimated_far(s[9] - 1e-9) == pytest.approx(10 / 1000)
    assert again.estimated_far(10.0) == pytest.approx(1 / 1000)  # never reported below 1/cohort
    # below the stored tail (the top 10%) the estimate is only a lower bound, and says so
    assert len(again.tail) == 100 and not again.far_is_lower_bound(s[99])
    assert again.far_is_lower_bound(s[100]) and again.estimated_far(s[500]) == pytest.approx(100 / 1000)


def test_matcher_one_to_n_and_one_to_one(rng):
    d = 32
    a, b = rng.standard_normal(d) * 3, rng.standard_normal(d) * 3
    pooled = {"alice": _cluster(rng, a, 6, 0.5), "bob": _cluster(rng, b, 6, 0.5)}
    cohort = normalise(rng.standard_normal((2000, d)))
    cals = {n: calibrate_identity(p, cohort, 1e-3) for n, p in pooled.items()}
    m = IdentityMatcher(pooled, cals, default_similarity_threshold=0.5)
    qa, qb, qx = _cluster(rng, a, 1, 0.5), _cluster(rng, b, 1, 0.5), normalise(rng.standard_normal((1, d)))
    ra, rb, rx = m(np.concatenate([qa, qb, qx]))
    assert ra.match and ra.identity == "alice" and ra.distance <= ra.distance_threshold
    assert rb.match and rb.identity == "bob"
    assert not rx.match and rx.to_dict()["identity"] is None and rx.to_dict()["nearest"] in pooled
    assert ra.far is not None and ra.far <= 1e-3 + 1e-12
    assert not ra.far_at_least and rx.far_at_least and rx.to_dict()["far_at_least"] is True  # rx: a clear reject
    # 1:1: bob's face claimed as alice is rejected
    (claim,) = m(qb, only="alice")
    assert claim.identity == "alice" and not claim.match
    with pytest.raises(KeyError):
        m(qa, only="carol")
    assert m(np.zeros((0, d), np.float32)) == []
