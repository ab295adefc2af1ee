"""index.quality: the signals of synthetic faces, the score's ordering, and faces indexed before the score
existed (schema 1 -> 3) scored from what is stored."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from index.library import FaceRecord, FileRecord, Library
from index.quality import (blur_of_crop, face_signals, outside_share, pose_from_landmarks, quality_score,
                           quality_scores)

# a frontal face, 100 px wide: eyes level, nose centred between them, mouth below
FRONTAL = np.array([[135, 160], [165, 160], [150, 178], [138, 195], [162, 195]], np.float32)
BOX = (110.0, 130.0, 190.0, 220.0)


def shifted(landmarks: np.ndarray, dx: float, dy: float = 0.0) -> np.ndarray:
    return landmarks + np.array([dx, dy], np.float32)


def test_outside_share() -> None:
    assert outside_share((10, 10, 50, 50), (100, 100)) == 0.0
    assert outside_share((-20, 0, 20, 40), (100, 100)) == pytest.approx(0.5)  # left half outside
    assert outside_share((80, 80, 120, 120), (100, 100)) == pytest.approx(0.75)  # a quarter inside
    assert outside_share((200, 200, 240, 240), (100, 100)) == 1.0
    assert outside_share((5, 5, 5, 9), (100, 100)) == 1.0  # an empty box counts as all outside


def test_box_half_outside_the_photo_scores_lower_than_the_same_box_inside() -> None:
    image = (300, 300)
    inside = face_signals(BOX, FRONTAL, 0.999, image)
    # the same face moved left until half its box is past the photo's border
    dx = -BOX[0] - (BOX[2] - BOX[0]) / 2
    half_out_box = (BOX[0] + dx, BOX[1], BOX[2] + dx, BOX[3])
    half_out = face_signals(half_out_box, shifted(FRONTAL, dx), 0.999, image)
    assert inside.outside == 0.0 and half_out.outside == pytest.approx(0.5)
    # the same in every other signal: only outside differs, and it costs quality
    assert (half_out.prob, half_out.size_px, half_out.yaw) == (inside.prob, inside.size_px, inside.yaw)
    assert quality_score(half_out) < quality_score(inside)


def test_a_tight_portrait_crop_is_not_a_face_cut_off_at_the_border() -> None:
    # a 200 px chip filled by the face: the detector's box runs past every border, the face is whole
    chip = (200, 200)
    lm = shifted(FRONTAL, -50, -70) * 2.0 - np.array([100.0, 100.0], np.float32)  # face ~120 px wide, centred
    box = (-20.0, -30.0, 220.0, 240.0)
    tight = face_signals(box, lm, 0.999, chip)
    assert outside_share(box, chip) > 0.3  # what the box alone would say
    assert tight.outside == 0.0
    roomy = face_signals(box, lm, 0.999, (2000, 2000))  # the same face in a large photo
    assert quality_score(tight) == pytest.approx(quality_score(roomy))


def test_pose_from_landmarks() -> None:
    yaw, roll, pitch = pose_from_landmarks(FRONTAL)
    assert yaw == pytest.approx(0.0, abs=1e-6) and roll == pytest.approx(0.0, abs=1e-6) and pitch < 0.1
    # a turned head: the nose moves towards one eye
    turned = FRONTAL.copy()
    turned[2, 0] += 12
    assert pose_from_landmarks(turned)[0] == pytest.approx(12 / 30, rel=1e-5)
    # rotating the whole face in the image changes roll only
    a = np.radians(30)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    tilted = (FRONTAL - FRONTAL[0]) @ rot.T + FRONTAL[0]
    y2, r2, p2 = pose_from_landmarks(tilted)
    assert r2 == pytest.approx(30, abs=1e-3) and y2 == pytest.approx(yaw, abs=1e-5) and p2 == pytest.approx(pitch, abs=1e-5)
    # degenerate: both eyes on one point
    assert pose_from_landmarks(np.zeros((5, 2)))[1] == 90.0


def test_profile_small_and_unsure_faces_score_lower() -> None:
    base = face_signals(BOX, FRONTAL, 0.999, (300, 300))
    profile = FRONTAL.copy()
    profile[2, 0] += 20  # nose past the eye: a profile
    worse = [face_signals(BOX, profile, 0.999, (300, 300)),  # pose
             face_signals((110, 130, 130, 152), FRONTAL, 0.999, (300, 300)),  # a 20 px face
             face_signals(BOX, FRONTAL, 0.90, (300, 300))]  # an unsure detection
    scores = quality_scores([base, *worse])
    assert ((0 < scores) & (scores < 1)).all()
    assert (scores[1:3] < scores[0]).all(), scores
    # the fit (bench_groups.py --fit-quality) found no use for the detector's probability on its own
    # (MTCNN at min_prob 0.9 keeps only sure faces): never better, at most equal
    assert scores[3] <= scores[0]


def test_blur_of_crop_falls_with_blur() -> None:
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (112, 112, 3)).astype(np.uint8)
    k = np.ones(7) / 7  # a box blur along both axes
    blurred = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 0, sharp.astype(np.float32))
    blurred = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, blurred).astype(np.uint8)
    flat = np.full((112, 112, 3), 128, np.uint8)
    assert blur_of_crop(sharp) > 10 * blur_of_crop(blurred) > 0 and blur_of_crop(flat) == 0.0
    # the same picture at another model's crop size reads about the same
    assert blur_of_crop(np.repeat(np.repeat(blurred, 2, 0), 2, 1)) == pytest.approx(blur_of_crop(blurred), rel=0.5)
    s_sharp = face_signals(BOX, FRONTAL, 0.999, (300, 300), sharp)
    s_blur = face_signals(BOX, FRONTAL, 0.999, (300, 300), blurred)
    assert quality_score(s_blur) < quality_score(s_sharp)


def test_quality_is_stored_with_each_face_and_old_faces_are_scored_from_what_is_stored(tmp_path) -> None:
    db = tmp_path / "lib.db"
    faces = [FaceRecord(BOX, 0.999, FRONTAL, outside=0.0), FaceRecord((-30, 140, 30, 200), 0.95, shifted(FRONTAL, -150),
                                                                      outside=0.5)]
    rec = FileRecord("/p/a.jpg", "/p/a.jpg", 1, 1, 1, 1, "face", faces=faces,
                     embeddings=np.eye(2, 8, dtype=np.float32))
    with Library.open(db) as lib:
        lib.ensure_model("m", 8)
        lib.record([rec], "m")
        ids, _ = lib.embeddings("m")
        q = lib.face_quality(ids.tolist())
        where = lib.face_locations(ids.tolist())
    assert np.isfinite(q).all() and q[1] < q[0]
    assert [where[int(i)][3].quality for i in ids] == pytest.approx(q.tolist())
    assert where[int(ids[1])][3].outside == 0.5

    # an index of schema 1 (before decisions and the score): drop what versions 2 and 3 added
    with sqlite3.connect(db) as c:
        c.execute("DROP TABLE decisions")
        c.execute("DROP INDEX files_sha256")
        c.execute("ALTER TABLE faces DROP COLUMN quality")
        c.execute("ALTER TABLE faces DROP COLUMN blur")
        c.execute("ALTER TABLE faces DROP COLUMN outside")
        c.execute("PRAGMA user_version = 1")
    with Library.open(db) as lib:  # a writer migrates 1 -> 3: the table and the columns come back, empty
        assert lib._conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert lib._conn.execute("SELECT count(*) FROM faces WHERE quality IS NULL").fetchone()[0] == 2
        scored = lib.face_quality(ids.tolist())  # scored from box, landmarks and prob, outside unknown
        assert np.isfinite(scored).all() and scored[1] < scored[0]  # the smaller, less sure face still lower
        assert lib.fill_quality() == 2 and lib.fill_quality() == 0
        assert lib.face_quality(ids.tolist()) == pytest.approx(scored.tolist())
