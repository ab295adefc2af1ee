"""The public Python API (verify/__init__.py): what the README shows, run on real LFW photos, and the
promise that light modules stay free of torch and FAISS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_light_modules_import_neither_torch_nor_faiss():
    code = ("import sys, verify, verify.atomic, verify.faces, verify.scan.workers, verify.scan.walk; "
            "print(sorted(m for m in ('torch', 'faiss', 'index') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_unknown_public_name_is_an_attribute_error():
    import verify

    with pytest.raises(AttributeError, match="no_such_thing"):
        verify.no_such_thing  # noqa: B018
    assert {"Embedder", "FacePipeline", "run_scan", "evaluate_pairs", "build_matcher"} <= set(verify.__all__)


def test_enroll_then_verify_from_python(tmp_path, lfw_root):
    from verify import Embedder, build_matcher, enroll_person, face_pipeline, open_gallery, verify_photos

    people = lfw_root / "lfw-deepfunneled"
    me = sorted((people / "Jennifer_Lopez").glob("*.jpg"))
    stranger = sorted((people / "Hans_Blix").glob("*.jpg"))[:1]
    embedder = Embedder.load()  # the shipped model
    pipeline = face_pipeline(embedder, device="cpu", min_face=40, min_prob=0.95)
    gallery = open_gallery(tmp_path / "gallery", embedder, create=True)

    result = enroll_person(gallery, "jlo", me[:5], pipeline, n_views=2)
    assert result.photos_used == 5 and result.vectors_added == 5 * 3 and not result.skipped
    assert result.calibration["calibrated"] and 0 < result.calibration["threshold"] < 1  # a similarity

    verdicts = list(verify_photos(me[5:] + stranger, pipeline, build_matcher(gallery, embedder)))
    assert [v.source for v in verdicts] == [str(p) for p in me[5:] + stranger]
    mine, theirs = verdicts[:-1], verdicts[-1]
    assert sum(v.matched for v in mine) >= 2, [v.faces for v in verdicts]  # 3 later photos of her
    assert not theirs.matched and theirs.faces[0]["nearest"] == "jlo"  # one enrolled person: the nearest
    assert max(v.faces[0]["distance"] for v in mine) < theirs.faces[0]["distance"]
    for f in verdicts[0].faces:  # what a person reads are distances: accept when distance <= threshold
        assert f["match"] == (f["distance"] <= f["threshold"])
