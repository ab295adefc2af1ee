"""Enrollment helpers: inputs expanded by content, and the photo that does not look like the others."""

from __future__ import annotations

import numpy as np

from verify.identity.embed import expand_inputs, outlier_photos, sha256_file
from verify.identity.scoring import normalise


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


def test_face_region_is_a_clipped_square_around_the_face():
    from verify.identity.embed import face_region

    image = np.zeros((300, 400, 3), np.uint8)
    image[100:150, 200:250] = 255  # the "face": box (200, 100, 250, 150)
    region = face_region(image, (200, 100, 250, 150), margin=0.5)
    assert region.shape == (100, 100, 3) and region[25:75, 25:75].min() == 255 and region[:20].max() == 0
    assert face_region(image, (0, 0, 50, 50)).shape == (75, 75, 3)  # clipped at the corner
    big = face_region(np.zeros((3000, 3000, 3), np.uint8), (1000, 1000, 2000, 2000), max_side=400)
    assert big.shape == (400, 400, 3)  # 2000 px region shrunk


def test_augmented_views_are_realigned_like_queries(lfw_root):
    """Views cut from an augmented region and aligned again stay on the model's crop geometry;
    augmenting the aligned crop itself (rotation, zoom, shift) moves the face off it."""
    from verify.identity.embed import DEFAULT_VIEW_AUGMENT, augmented_view_crops
    from verify.faces import DetectorConfig, FaceDetector, FacePipeline, load_image
    from verify.model.geometry import CropGeometry
    from verify.identity.views import augment_views

    pipeline = FacePipeline(FaceDetector(DetectorConfig(device="cpu")), CropGeometry())
    path = sorted((lfw_root / "lfw-deepfunneled" / "Jennifer_Lopez").glob("*.jpg"))[0]
    res = pipeline.process([path])[0]
    face, crop = res.faces[0]
    no_flip = {**DEFAULT_VIEW_AUGMENT, "hflip": False}  # a mirrored face is a fair view, but not comparable pixelwise
    views = augmented_view_crops(load_image(path), face.box, pipeline, 6, np.random.default_rng(0), **no_flip)
    assert 4 <= len(views) <= 6 and all(v.shape == crop.shape for v in views)
    moved = augment_views(crop, 6, np.random.default_rng(0), **no_flip)

    def mad(a: np.ndarray) -> float:
        return float(np.abs(a.astype(np.float64) - crop.astype(np.float64)).mean())

    realigned = np.mean([mad(v) for v in views])
    assert realigned < 0.6 * np.mean([mad(v) for v in moved]), (realigned, [mad(v) for v in moved])
