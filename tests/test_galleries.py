"""verify.identity.galleries: a gallery whose thresholds an older calibration rule set is recalibrated
from its stored vectors when opened with its model, or refused in one line without it; never scored
silently with the old threshold. Pure numpy/faiss: the model is a holder of a cohort and its labels."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from index import Gallery, GalleryError
from verify.identity.galleries import build_matcher, stale_identities
from verify.identity.scoring import calibrate_identity, identity_scores, normalise, pool_photos
from verify.model.cohort import CohortSources

DIM = 16


def _model(rng, me):
    easy = normalise(rng.standard_normal((3000, DIM)))
    hard = normalise(rng.standard_normal((1000, DIM)) + 0.4 * normalise(me))
    labels = CohortSources(np.r_[np.zeros(3000), np.ones(1000)].astype(np.uint8), ("easy", "hard"),
                           np.full(4000, -1, dtype=np.int32))
    return SimpleNamespace(cohort=np.concatenate([easy, hard]), cohort_sources=labels, similarity_threshold=0.6,
                           fingerprint="fp-test", dim=DIM)


def test_old_gallery_is_recalibrated_when_opened_with_its_model_or_refused_in_one_line(tmp_path, rng):
    me = rng.standard_normal(DIM)
    model = _model(rng, me)
    views = normalise(me + 0.5 * rng.standard_normal((12, DIM)))  # 4 photos x 3 views
    shas = [f"{i // 3:064x}" for i in range(12)]
    g = Gallery.create(tmp_path / "g", DIM, model.fingerprint, threshold=model.similarity_threshold)
    with g.locked():
        g.add(views, "ann", sources=[f"p{i // 3}.jpg" for i in range(12)], sha256s=shas, views=[i % 3 for i in range(12)])
        # what a gallery enrolled before issue 28 stores: one threshold on the pooled cohort, no rule
        _, pooled = pool_photos(views, np.array(shas))
        old = calibrate_identity(pooled, model.cohort, target_far=1e-2).to_dict()
        del old["rule"], old["threshold_source"], old["sources"], old["excluded"]
        g.set_identity_info("ann", {**old, "calibrated": True, "photos": 4})
    assert stale_identities(g) == ["ann"]

    # torch-free commands (find, people) cannot recalibrate: one line that says how, nothing changed
    with pytest.raises(GalleryError) as e:
        build_matcher(g)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "ann" in msg and "faceverify gallery recalibrate" in msg
    assert Gallery.open(tmp_path / "g").identity_info("ann")["threshold"] == old["threshold"]

    # opened with its model: recalibrated from the stored vectors, stored, nothing enrolled lost
    matcher = build_matcher(g, model)
    new = calibrate_identity(pooled, model.cohort, target_far=1e-2, sources=model.cohort_sources,
                             same_person_similarity=model.similarity_threshold)
    assert matcher.similarity_threshold_of("ann") == pytest.approx(new.similarity_threshold)
    assert new.similarity_threshold > old["threshold"]  # the hard source sets it: the old one was too loose
    again = Gallery.open(tmp_path / "g")
    info = again.identity_info("ann")
    assert info["rule"] == "hardest-source" and info["threshold_source"] == "cohort:hard"
    assert info["target_far"] == pytest.approx(1e-2) and len(again) == 12 and stale_identities(again) == []
    # and now the torch-free path scores with the same threshold: one decision everywhere
    probes = normalise(me + 0.9 * rng.standard_normal((50, DIM)))
    a, b = build_matcher(again)(probes), build_matcher(g, model)(probes)
    assert [(m.match, m.distance_threshold, m.threshold_source) for m in a] == \
           [(m.match, m.distance_threshold, m.threshold_source) for m in b]
    s = identity_scores(probes, pooled, 3)
    assert [m.match for m in a] == list(s >= new.similarity_threshold)


def test_the_look_alike_promise_is_stricter_and_survives_recalibration(tmp_path, rng):
    from verify.identity.galleries import calibrate_from_gallery, recalibrate_stale

    me = rng.standard_normal(DIM)
    model = _model(rng, me)
    views = normalise(me + 0.5 * rng.standard_normal((6, DIM)))
    g = Gallery.create(tmp_path / "g", DIM, model.fingerprint, threshold=model.similarity_threshold)
    with g.locked():
        g.add(views, "bo", sources=[f"p{i}.jpg" for i in range(6)], sha256s=[f"{i:064x}" for i in range(6)],
              views=[0] * 6)
        every = calibrate_from_gallery(g, "bo", model, target_far=1e-2)
        strict = calibrate_from_gallery(g, "bo", model, target_far=1e-2, promise="look-alike")
        with pytest.raises(ValueError, match="unknown promise"):
            calibrate_from_gallery(g, "bo", model, promise="lenient")
        info = g.identity_info("bo")
        g.set_identity_info("bo", {**info, "rule": None})  # as if an older rule had set it
    assert strict["threshold"] > every["threshold"] and strict["promise"] == "look-alike"
    assert recalibrate_stale(g, model) == ["bo"]
    again = Gallery.open(tmp_path / "g").identity_info("bo")
    assert again["promise"] == "look-alike" and again["threshold"] == pytest.approx(strict["threshold"])
