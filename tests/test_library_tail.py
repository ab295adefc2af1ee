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


# ------------------------------------------------------------------------------------------
# the check inside `find`: a synthetic library index and gallery, no model, no photo
# ------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _library_and_gallery(tmp_path, rng: np.random.Generator, n_strangers: int, pull: float):
    """A gallery of one person calibrated on random strangers, and a library whose strangers are pulled
    towards the person by `pull` (their scores shifted up against the cohort's) plus 40 of their faces."""
    from index import Gallery
    from index.library import FaceRecord, FileRecord, Library

    dim, model = 32, "f" * 16
    centre = _unit(rng.normal(size=dim))
    photos = _unit(centre + 0.03 * rng.normal(size=(3, dim)))  # (3, D)
    g = Gallery.open_or_create(tmp_path / "gallery", dim, model, threshold=0.5)
    g.add(photos, "ann", sha256s=[f"{i:064x}" for i in range(3)])
    cohort = _unit(rng.normal(size=(20_000, dim)))
    cal = calibrate_identity(photos, cohort, target_far=TARGET)
    g.set_identity_info("ann", {**cal.to_dict(), "calibrated": True, "photos": 3})
    strangers_v = _unit(rng.normal(size=(n_strangers, dim)) + pull * centre)
    own = _unit(centre + 0.06 * rng.normal(size=(40, dim)))
    vectors = np.concatenate([strangers_v, own])
    lib = Library.open(tmp_path / "library.db", create=True)
    lib.ensure_model(model, dim)
    records = []
    for i in range(0, len(vectors), 10):
        v = vectors[i:i + 10]
        faces = [FaceRecord((0.0, 0.0, 50.0, 50.0), 0.99, np.zeros((5, 2), np.float32)) for _ in v]
        p = str(tmp_path / f"photo{i:05d}.jpg")
        records.append(FileRecord(p, p, 100, 1, 1, i, "face", sha256=f"{i:064x}", detector="d", faces=faces, embeddings=v))
    lib.record(records, model)
    return lib, g, cal


def test_find_reports_then_applies_a_stricter_library_threshold(tmp_path) -> None:
    import pandas as pd

    from verify.queries.find import find

    rng = np.random.default_rng(11)
    lib, g, cal = _library_and_gallery(tmp_path, rng, 4_000, pull=0.4)
    checked = find(lib, g, names=["ann"], out=tmp_path / "check.csv")
    (check,) = checked.library_checks
    assert check.stricter and check.fit.similarity_threshold > cal.similarity_threshold
    rows = pd.read_csv(tmp_path / "check.csv")
    assert set(rows["threshold_source"]) == {cal.threshold_source}  # reported, not applied
    applied = find(lib, g, names=["ann"], out=tmp_path / "stricter.csv", library_threshold="stricter")
    rows2 = pd.read_csv(tmp_path / "stricter.csv")
    assert set(rows2["threshold_source"]) == {"library"}
    assert (1 - rows2["distance"]).min() >= check.fit.similarity_threshold - 1e-6
    assert applied.summary.matches < checked.summary.matches
    assert set(rows2["path"]) <= set(rows["path"])


def test_find_leaves_the_threshold_of_a_small_library(tmp_path) -> None:
    from verify.queries.find import find

    lib, g, cal = _library_and_gallery(tmp_path, np.random.default_rng(12), 500, pull=0.4)
    r = find(lib, g, names=["ann"], out=tmp_path / "r.csv", library_threshold="stricter")
    (check,) = r.library_checks
    assert not check.stricter and check.fit is None and "fewer than" in check.why


def test_find_command_says_where_the_library_suggests_a_stricter_threshold(tmp_path) -> None:
    from typer.testing import CliRunner

    from verify.cli import app

    lib, g, _ = _library_and_gallery(tmp_path, np.random.default_rng(11), 4_000, pull=0.4)
    lib.close()
    g.save()
    g.close()
    base = ["find", "ann", "--gallery", str(tmp_path / "gallery"), "--index", str(tmp_path / "library.db")]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a.csv")])
    assert "ann: your library suggests a stricter threshold" in r.output and "--library-threshold stricter applies it" in r.output
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b.csv"), "--library-threshold", "stricter"])
    assert "applied (--library-threshold stricter)" in r.output
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "c.csv"), "--library-threshold", "loose"])
    assert r.exit_code == 2 and "unknown library threshold rule 'loose'" in r.output
