"""Enrollment helpers: inputs expanded by content, and the photo that does not look like the others."""

from __future__ import annotations

import numpy as np

from verify.enroll import expand_inputs, outlier_photos, sha256_file
from verify.scoring import normalise


def test_outlier_photo_is_flagged_against_the_cohort(rng):
    d = 64
    me = rng.standard_normal(d) * 2
    views = []
    keys = []
    for i in range(6):  # 6 photos of me, 3 views each
        views.append(normalise(me + rng.standard_normal((3, d))))
        keys += [f"me{i}"] * 3
    views.append(normalise(rng.standard_normal((3, d))))  # a stranger's photo slipped in
    keys += ["stranger"] * 3
    vecs = np.concatenate(views)
    cohort = normalise(rng.standard_normal((2000, d)))
    flagged = outlier_photos(vecs, np.array(keys), threshold=0.9, cohort=cohort)
    assert [k for k, _ in flagged] == ["stranger"]
    # without a cohort the model threshold is the bar: a high bar flags everyone, a low one nobody
    assert len(outlier_photos(vecs, np.array(keys), threshold=0.99)) == 7
    assert outlier_photos(vecs, np.array(keys), threshold=-1.0) == []
    assert outlier_photos(vecs[:6], np.array(keys[:6]), threshold=0.9) == []  # < 3 photos: no judgement


def test_expand_inputs_walks_folders_by_content(tmp_path):
    from PIL import Image

    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "b" / "photo.dat", format="PNG")  # an image whatever its name
    (tmp_path / "a" / "notes.jpg").write_text("not an image")
    files, problems = expand_inputs([tmp_path / "a", tmp_path / "missing.jpg"])
    assert [f.name for f in files] == ["x.png", "photo.dat"]
    assert problems == [(str(tmp_path / "missing.jpg"), "no such file or folder")]
    assert len(sha256_file(files[0])) == 64
