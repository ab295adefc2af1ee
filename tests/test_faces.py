"""verify.faces: loading awkward files, MTCNN detection on real faces, alignment and its contract
with the training crop (CropGeometry)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corpus import NON_ASCII_NAME, make_bad_corpus
from verify.faces import (
    DetectorConfig,
    FaceDetector,
    FacePipeline,
    ImageLoadError,
    align,
    fixed_crop,
    is_image_file,
    load_for_detection,
    load_image,
    shrink,
    similarity_transform,
)
from verify.model.geometry import CELEBA_FRAME, CELEBA_LANDMARKS, CropGeometry

# A frontal LFW photo that MTCNN does not find when it is turned 90 degrees (checked: a sideways
# face is not what MTCNN was trained on), so the EXIF test shows that the transpose matters.
FACE_PHOTO = "lfw-deepfunneled/AJ_Cook/AJ_Cook_0001.jpg"


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _upright(landmarks: np.ndarray) -> bool:
    """Eyes above the nose, nose above the mouth corners (image y grows downwards)."""
    return bool(landmarks[:2, 1].max() < landmarks[2, 1] < landmarks[3:, 1].min())


@pytest.fixture(scope="module")
def face_photo(request) -> Path | None:
    try:
        lfw = request.getfixturevalue("lfw_root")
    except pytest.skip.Exception:
        return None  # the corpus falls back to a synthetic picture
    return lfw / FACE_PHOTO


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, face_photo) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, make_bad_corpus(folder, face_photo)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(DetectorConfig(device="cpu"))


@pytest.fixture(scope="module")
def lfw_images(lfw_root) -> list[Path]:
    paths = sorted((lfw_root / "lfw-deepfunneled").glob("*/*.jpg"))
    return paths[::500][:10]


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def test_corpus_loads_or_fails_with_one_line_error(corpus):
    folder, expected = corpus
    assert len(expected) >= 20
    for name, outcome in expected.items():
        path = folder / name
        assert path.exists(), name
        if outcome.startswith("error:"):
            with pytest.raises(ImageLoadError) as info:
                load_image(path)
            msg = str(info.value)
            assert "\n" not in msg, msg
            assert msg.startswith(f"{path}: "), msg
            assert name in msg and outcome.split(":", 1)[1] in msg, (name, msg)
            continue
        try:
            arr = load_image(path)
        except ImageLoadError as exc:
            assert outcome == "ok-or-error", f"{name} ({outcome}) failed to load: {exc}"
            assert name in str(exc) and "\n" not in str(exc)
            continue
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, (name, arr.shape, arr.dtype)
        assert arr.flags["C_CONTIGUOUS"], name


def test_variants_decode_to_the_same_picture(corpus):
    folder, _ = corpus
    ref = load_image(folder / "face.jpg")  # (H, W, 3)
    assert np.array_equal(load_image(folder / NON_ASCII_NAME), ref)  # same bytes, non-ASCII path
    assert np.array_equal(load_image(folder / "png_named.jpg")[:, 20:], load_image(folder / "rgba.png")[:, 20:])
    for name, tol in [("cmyk.jpg", 4), ("face.webp", 6), ("palette.gif", 8), ("exif_6.jpg", 4), ("exif_8.jpg", 4)]:
        arr = load_image(folder / name)
        assert arr.shape == ref.shape, name
        assert _mad(arr, ref) < tol, (name, _mad(arr, ref))
    grey_ref = load_image(folder / "grey.jpg")[:, :, 0].astype(float)
    for name in ("grey.jpg", "grey16.png"):
        arr = load_image(folder / name)
        assert np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(arr[:, :, 1], arr[:, :, 2]), name
        assert _mad(arr[:, :, 0], grey_ref) < 3, name  # 16-bit scaled, not clipped to 255


def test_exif_orientation_is_applied(corpus):
    folder, _ = corpus
    ref = load_image(folder / "face.jpg")
    for name in ("exif_6.jpg", "exif_8.jpg"):
        with Image.open(folder / name) as im:
            raw = np.asarray(im.convert("RGB"))  # the stored, sideways pixels
        loaded = load_image(folder / name)
        k = 1 if name == "exif_6.jpg" else -1  # the corpus stored rot90(k) of the upright picture
        assert _mad(raw, np.rot90(ref, k)) < 4, name
        assert _mad(loaded, ref) < 4, name
        # the stored pixels are not the upright picture: another shape (the synthetic stand-in is not square)
        assert raw.shape != ref.shape or _mad(raw, ref) > 4, name


def test_alpha_is_composited_on_white(corpus):
    folder, _ = corpus
    for name in ("rgba.png", "la.png"):
        arr = load_image(folder / name)
        assert (arr[:, :10] == 255).all(), name  # fully transparent band -> white
        half = arr[:, 10:20].astype(float)
        assert (half >= 127).all(), name  # 50% alpha over white is at least mid-grey


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 40000, 65535]], dtype=np.uint16)  # (1, 4)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really stored as 16-bit
    arr = load_image(tmp_path / "g16.png")
    assert arr[0, :, 0].tolist() == [0, 100, round(40000 / 257), 255]


def test_limits_and_missing_file(corpus, tmp_path):
    folder, _ = corpus
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(folder / "face.jpg", max_pixels=1000)
    h, w = load_image(folder / "face.jpg").shape[:2]
    assert load_image(folder / "face.jpg", max_pixels=w * h).shape == (h, w, 3)  # the limit is inclusive
    with pytest.raises(ImageLoadError, match=f"{w}x{h}"):
        load_image(folder / "face.jpg", max_pixels=w * h - 1)
    missing = tmp_path / "nobody.jpg"
    with pytest.raises(ImageLoadError, match="file not found") as info:
        load_image(missing)
    assert str(info.value).startswith(str(missing))


def test_is_image_file_by_content(corpus, tmp_path):
    folder, expected = corpus
    assert is_image_file(folder / "png_named.jpg")
    assert is_image_file(folder / "bomb.png")  # an image, just too large to load
    assert is_image_file(folder / "truncated.jpg")  # header is fine; load_image reports the rest
    for name in ("notes.jpg", "empty.jpg", "folder.jpg"):
        assert not is_image_file(folder / name), name
    assert not is_image_file(tmp_path / "missing.jpg")
    n_images = sum(is_image_file(folder / n) for n in expected)
    assert n_images == len(expected) - 3


# ------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------


def test_detect_real_faces(detector, lfw_images):
    images = [load_image(p) for p in lfw_images]
    results = detector.detect(images)
    assert len(results) == len(images)
    for path, faces in zip(lfw_images, results):
        assert faces, f"no face in {path.name}"
        areas = [f.area for f in faces]
        assert areas == sorted(areas, reverse=True)
        for f in faces:
            assert f.prob >= detector.config.min_prob
            assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32
            x1, y1, x2, y2 = f.box
            assert min(x2 - x1, y2 - y1) >= detector.config.min_face_size
            inside = (f.landmarks[:, 0] >= x1 - 2) & (f.landmarks[:, 0] <= x2 + 2)
            inside &= (f.landmarks[:, 1] >= y1 - 2) & (f.landmarks[:, 1] <= y2 + 2)
            assert inside.all(), (path.name, f.box, f.landmarks)
        main = faces[0]  # LFW deep-funneled: the subject is centred in 250x250
        assert _upright(main.landmarks), path.name
        cx, cy = (main.box[0] + main.box[2]) / 2, (main.box[1] + main.box[3]) / 2
        assert abs(cx - 125) < 30 and abs(cy - 125) < 40, (path.name, main.box)


def test_crop_resample_equals_area_interpolation(rng):
    import torch
    from torch.nn.functional import interpolate

    from verify.faces.mtcnn import crop_resample, summed_area_table

    imgs = torch.from_numpy(rng.integers(0, 256, (2, 61, 83, 3)))  # (B, H, W, 3)
    y0 = np.array([0, 5, 60, 10, 0, 3]); y1 = np.array([61, 30, 61, 11, 7, 50])  # incl. 1-px and tiny boxes
    x0 = np.array([0, 7, 80, 40, 50, 2]); x1 = np.array([83, 52, 83, 41, 83, 70])
    owner = np.array([0, 1, 1, 0, 1, 0])  # boxes of both images in one call
    sat = summed_area_table(imgs)
    for size in (24, 48):
        got = crop_resample(sat, owner, y0, y1, x0, x1, size)  # (N, 3, s, s)
        assert got.shape == (len(y0), 3, size, size)
        for k in range(len(y0)):
            img = imgs[owner[k]].permute(2, 0, 1).float()  # (3, H, W)
            want = interpolate(img[:, y0[k]:y1[k], x0[k]:x1[k]][None], size=(size, size), mode="area")[0]
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-3)


def test_resample_whole_equals_area_interpolation(rng):
    import torch
    from torch.nn.functional import interpolate

    from verify.faces.mtcnn import resample_whole, summed_area_table

    imgs = rng.integers(0, 256, (2, 61, 83, 3), dtype=np.uint8)  # (B, H, W, 3)
    sat = summed_area_table(imgs)
    ref = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    for size in ((61, 83), (19, 26), (13, 40), (1, 1), (45, 12)):  # same, shrunk, mixed, one cell
        got = resample_whole(sat, size, scale=0.0078125, shift=-127.5 * 0.0078125)
        want = (interpolate(ref, size=size, mode="area") - 127.5) * 0.0078125  # facenet's P-net input
        assert got.shape == (2, 3, *size)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_summed_area_table_does_not_overflow_on_big_bright_images():
    import torch

    from verify.faces.mtcnn import summed_area_table

    small = summed_area_table(np.full((1, 100, 80, 3), 255, np.uint8))
    big = summed_area_table(np.full((1, 2950, 2900, 3), 255, np.uint8))  # 8.6 MP: sums beyond int32
    assert small.dtype == torch.int32 and big.dtype == torch.int64
    assert int(small[0, -1, -1, 0]) == 255 * 100 * 80 and int(big[0, -1, -1, 2]) == 255 * 2950 * 2900


def test_fast_driver_matches_facenet_mtcnn(detector, lfw_root):
    """verify.mtcnn reproduces facenet-pytorch's MTCNN.detect: same faces, boxes and landmarks."""
    from verify.faces.mtcnn import detect_faces

    paths = sorted((lfw_root / "lfw-deepfunneled").glob("*/*.jpg"))[::97][:24]
    batch = np.stack([load_image(p) for p in paths])  # (24, 250, 250, 3)
    batch[3] = 128  # a blank image in the batch: no face
    m = FaceDetector(DetectorConfig(device="cpu", runtime="torch"))._mtcnn  # the PyTorch networks
    ref_boxes, ref_probs, ref_points = m.detect(batch, landmarks=True)
    got = detect_faces(batch, m.pnet, m.rnet, m.onet, m.min_face_size, m.thresholds, m.factor)
    n_faces = 0
    for j, (boxes, points) in enumerate(got):
        if ref_boxes[j] is None:
            assert len(boxes) == 0, paths[j].name
            continue
        order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))  # facenet: largest first
        assert len(boxes) == len(ref_boxes[j]), paths[j].name
        np.testing.assert_allclose(boxes[order, :4], ref_boxes[j], atol=0.01)
        np.testing.assert_allclose(boxes[order, 4], ref_probs[j], atol=1e-4)
        np.testing.assert_allclose(points[order], ref_points[j], atol=0.01)
        n_faces += len(boxes)
    assert n_faces >= 23 and len(got[3][0]) == 0


def test_mixed_batch_with_blank_and_tiny_images(detector, corpus, lfw_images):
    folder, _ = corpus
    face = load_image(lfw_images[0])
    grey = np.full_like(face, 128)  # same shape: batched together with the faces
    tiny = load_image(folder / "tiny.png")
    alone = detector.detect([face])[0]
    results = detector.detect([grey, face, tiny, face, load_image(folder / "grey_flat.png")])
    assert results[0] == [] and results[2] == [] and results[4] == []
    for faces in (results[1], results[3]):
        assert len(faces) == len(alone)
        np.testing.assert_allclose(faces[0].landmarks, alone[0].landmarks, atol=1e-3)
    assert detector.detect([]) == []


def test_two_faces_side_by_side(detector, lfw_images):
    left, right = load_image(lfw_images[1]), load_image(lfw_images[2])
    both = np.ascontiguousarray(np.hstack([left, right]))  # (250, 500, 3)
    faces = detector.detect([both])[0]
    big = [f for f in faces if f.width > 60]  # the two subjects, not background passers-by
    assert len(big) == 2, [f.box for f in faces]
    centres = sorted((f.box[0] + f.box[2]) / 2 for f in big)
    assert centres[0] < 250 < centres[1]


def test_exif_rotated_photo_is_detected_after_loading(detector, corpus, face_photo):
    if face_photo is None:
        pytest.skip("needs the LFW face photo (real data)")
    folder, _ = corpus
    for name in ("exif_6.jpg", "exif_8.jpg"):
        with Image.open(folder / name) as im:
            raw = np.asarray(im.convert("RGB"))
        upright, sideways = detector.detect([load_image(folder / name), raw])
        assert upright and _upright(upright[0].landmarks), name
        assert not any(_upright(f.landmarks) and f.width > 60 for f in sideways), name


def test_corpus_face_variants_are_detected(detector, corpus, face_photo):
    if face_photo is None:
        pytest.skip("needs the LFW face photo (real data)")
    folder, expected = corpus
    names = [n for n, o in expected.items() if o in ("face", "no-face")]
    results = detector.detect([load_image(folder / n) for n in names])
    for name, faces in zip(names, results):
        if expected[name] == "face":
            assert faces and _upright(faces[0].landmarks), name
        else:
            assert faces == [], name


def test_large_image_is_downscaled_and_mapped_back(detector, lfw_images):
    small = load_image(lfw_images[0])  # 250x250
    k = 3
    big = np.asarray(Image.fromarray(small).resize((250 * k, 250 * k), Image.BICUBIC))  # (750, 750, 3)
    # A low max_side makes the test cheap; the same code path runs for 1600 px and beyond.
    shrinking = FaceDetector(DetectorConfig(device="cpu", max_side=400))
    f_small = detector.detect([small])[0][0]
    f_big = shrinking.detect([big])[0][0]
    # Same face at the same place, in the big image's pixels (within MTCNN's own jitter).
    expected = (f_small.landmarks + 0.5) * k - 0.5
    assert np.abs(f_big.landmarks - expected).max() < 4 * k, (f_big.landmarks, expected)
    assert abs(f_big.width - f_small.width * k) < 0.15 * f_small.width * k


def _big_jpeg(path: Path, picture: np.ndarray, k: int, **save) -> np.ndarray:
    """The picture upscaled k times, saved as JPEG; returns the upscaled pixels."""
    h, w = picture.shape[:2]
    big = Image.fromarray(picture).resize((w * k, h * k), Image.BICUBIC)
    big.save(path, quality=92, **save)
    return np.asarray(big)


@pytest.mark.parametrize("k, max_side, draft", [(8, 400, 4), (5, 600, 2), (3, 400, 1)])
def test_big_jpeg_is_decoded_at_reduced_scale_to_the_same_picture(tmp_path, lfw_images, k, max_side, draft):
    photo = load_image(lfw_images[1])  # 250x250
    path = tmp_path / "big.jpg"
    _big_jpeg(path, photo, k)
    image, (sx, sy) = load_for_detection(path, max_side)
    full, (fx, fy) = shrink(load_image(path), max_side)  # decode everything, then shrink
    assert image.shape == full.shape == (max_side, max_side, 3)
    assert (sx, sy) == pytest.approx((fx, fy)) == (250 * k / max_side, 250 * k / max_side)
    # DCT scaling (draft > 1) and a bilinear shrink give the same picture up to resampling noise.
    assert _mad(image, full) < (2.0 if draft > 1 else 1e-9)
    assert (_mad(image, full) > 0) == (draft > 1)  # reduced decoding is a different (faster) path
    with Image.open(path) as im:  # the scale Pillow's draft picks for this size
        im.draft(None, (max_side, max_side))
        assert 250 * k // im.size[0] == draft


def test_reduced_decoding_keeps_faces_exif_truncation_and_modes(detector, tmp_path, lfw_images):
    photo = load_image(lfw_images[0])
    k, max_side = 8, 400  # 2000x2000 photo: decoded at 1/4 scale, then shrunk
    straight = tmp_path / "big.jpg"
    _big_jpeg(straight, photo, k)
    shrinking = FaceDetector(DetectorConfig(device="cpu", max_side=max_side))
    expected = shrinking.detect([load_image(straight)])[0][0]  # full decode, detector shrinks
    image, (sx, _) = load_for_detection(straight, max_side)
    face = detector.detect([image])[0][0]
    assert np.abs((face.landmarks + 0.5) * sx - 0.5 - expected.landmarks).max() < 2 * k

    # EXIF orientation 6 (stored rotated): upright after loading, same size and scale.
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(Image.open(straight)), 1))).save(
        rotated, quality=92, exif=exif)
    up, scale = load_for_detection(rotated, max_side)
    assert up.shape == image.shape and scale == pytest.approx((sx, sx))
    assert _mad(up, image) < 3.0

    # Truncated data is still an error although only a reduced image is produced.
    data = straight.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg: corrupt or truncated"):
        load_for_detection(cut, max_side)

    # CMYK and grey JPEGs decode at reduced scale too; PNG (no DCT scaling) by full decode + shrink.
    for mode, name in (("CMYK", "cmyk.jpg"), ("L", "grey.jpg"), ("RGB", "big.png")):
        path = tmp_path / name
        Image.open(straight).convert(mode).save(path)
        got, scale = load_for_detection(path, max_side)
        ref, ref_scale = shrink(load_image(path), max_side)
        assert got.shape == ref.shape and scale == pytest.approx(ref_scale), name
        assert _mad(got, ref) < 3.0, name


def test_detector_rejects_bad_config_and_inputs(detector):
    with pytest.raises(ValueError, match="min_prob"):
        DetectorConfig(min_prob=1.5)
    with pytest.raises(ValueError, match="thresholds"):
        DetectorConfig(thresholds=(0.6, 0.7))
    with pytest.raises(ValueError, match="RGB"):
        detector.detect([np.zeros((10, 10), np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        detector.detect([np.zeros((10, 10, 3), np.float32)])


# ------------------------------------------------------------------------------------------
# Alignment and the training-crop contract
# ------------------------------------------------------------------------------------------


def test_similarity_transform_recovers_known_transform(rng):
    src = rng.uniform(0, 200, size=(5, 2))
    for angle, scale, t in [(0.3, 0.6, (12.0, -40.0)), (-2.0, 1.7, (-5.0, 3.0)), (0.0, 1.0, (0.0, 0.0))]:
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        dst = src @ (scale * rot).T + np.array(t)
        m = similarity_transform(src, dst)
        np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
        np.testing.assert_allclose(m[:, 2], t, atol=1e-7)
        noisy = dst + rng.normal(0, 0.5, size=dst.shape)
        m_noisy = similarity_transform(src, noisy)
        assert abs(math.sqrt(np.linalg.det(m_noisy[:, :2])) - scale) < 0.02
    # A mirrored target has no similarity solution: the result must still be a rotation (det > 0).
    mirrored = src * np.array([-1.0, 1.0])
    assert np.linalg.det(similarity_transform(src, mirrored)[:, :2]) > 0
    with pytest.raises(ValueError):
        similarity_transform(np.zeros((5, 2)), src)


def test_align_with_the_reference_landmarks_reproduces_the_fixed_crop(celeba_root):
    geometry = CropGeometry()
    path = sorted((celeba_root / "img_align_celeba").glob("*.jpg"))[0]
    image = load_image(path)
    assert (image.shape[1], image.shape[0]) == CELEBA_FRAME
    fixed = fixed_crop(image, geometry)
    assert fixed.shape == (geometry.size, geometry.size, 3)
    # Landmarks exactly at the constants: the warp must be the fixed crop (sub-pixel conventions agree).
    assert _mad(align(image, np.array(CELEBA_LANDMARKS), geometry), fixed) < 2.0
    # Rotate and shrink the photo, carry the landmarks along: alignment undoes it.
    angle, s = 25.0, 0.7
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (400, 400), (0, 0, 0))
    canvas.paste(Image.fromarray(image), (111, 91))
    moved = canvas.rotate(angle, resample=Image.BICUBIC, center=(200, 200))
    moved = moved.resize((round(400 * s), round(400 * s)), Image.BILINEAR)
    a = math.radians(angle)
    pts = np.array(CELEBA_LANDMARKS) + np.array([111, 91]) + 0.5 - 200  # about the centre, continuous
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])  # PIL turns anticlockwise
    pts = ((pts @ rot.T + 200) * s) - 0.5
    assert _mad(align(np.asarray(moved), pts, geometry), fixed) < 6.0
    # A face much bigger than the crop takes the antialiased pre-shrink path.
    big = np.asarray(Image.fromarray(image).resize((w * 6, h * 6), Image.BICUBIC))
    big_pts = (np.array(CELEBA_LANDMARKS) + 0.5) * 6 - 0.5
    assert _mad(align(big, big_pts, geometry), fixed) < 3.0


def test_fixed_crop_is_the_training_cache_crop(celeba_root):
    from verify.training.cache import decode_crop  # the training side of the contract

    geometry = CropGeometry()
    for path in sorted((celeba_root / "img_align_celeba").glob("*.jpg"))[:3]:
        assert np.array_equal(fixed_crop(load_image(path), geometry), decode_crop(path, geometry)), path.name


def test_align_antialiases_when_shrinking_a_large_face(rng):
    geometry = CropGeometry()
    noise = rng.integers(0, 256, size=(1200, 1200, 3), dtype=np.uint8)  # 1-px detail everywhere
    landmarks = (geometry.reference_landmarks() + 0.5) * 8 - 0.5 + 100  # face 8x the crop size
    crop = align(noise, landmarks, geometry)
    # Averaging ~64 source pixels per output pixel leaves little of the noise (std 74 -> < 15);
    # point-sampling with a 2x2 bilinear kernel would keep most of it (aliasing).
    assert crop.shape == (geometry.size, geometry.size, 3)
    assert crop.std() < 15, crop.std()
    assert abs(crop.mean() - 127.5) < 5


def test_detected_alignment_matches_the_training_crop(detector, celeba_root):
    """The contract: MTCNN + align on full-size aligned CelebA ~= geometry.box_for fixed crop."""
    geometry = CropGeometry()
    paths = sorted((celeba_root / "img_align_celeba").glob("*.jpg"))[::150][:20]
    images = [load_image(p) for p in paths]
    results = detector.detect(images)
    assert sum(bool(r) for r in results) >= 19
    ref = geometry.reference_landmarks()
    x0, y0, x1, y1 = geometry.box
    k = geometry.size / (x1 - x0)
    fixed_map = np.array([[k, 0, -x0 * k], [0, k, -y0 * k]])  # CelebA frame -> crop, (2, 3)
    corners = np.array([[0, 0], [geometry.size - 1, 0], [0, geometry.size - 1], [geometry.size - 1] * 2], float)
    aligned, fixed, landmarks, centre_shift, corner_shift = [], [], [], [], []
    for image, faces in zip(images, results):
        if not faces:
            continue
        face = faces[0]
        landmarks.append(face.landmarks)
        aligned.append(align(image, face.landmarks, geometry))
        fixed.append(fixed_crop(image, geometry))
        m = similarity_transform(face.landmarks, ref)  # (2, 3) image -> crop
        inv_fixed = np.linalg.inv(np.vstack([fixed_map, [0, 0, 1]]))[:2]
        pts = corners @ inv_fixed[:, :2].T + inv_fixed[:, 2]  # fixed-crop corners in the image
        moved = pts @ m[:, :2].T + m[:, 2]  # where the aligner puts them
        corner_shift.append(np.linalg.norm(moved - corners, axis=1).max())
        centre = (np.mean(corners, 0) @ inv_fixed[:, :2].T + inv_fixed[:, 2]) @ m[:, :2].T + m[:, 2]
        centre_shift.append(np.linalg.norm(centre - np.mean(corners, 0)))
    # The median landmarks measured here agree with the constants in geometry.py.
    median = np.median(np.stack(landmarks), axis=0)  # (5, 2)
    assert np.abs(median - np.array(CELEBA_LANDMARKS)).max() < 2.5, median.round(1).tolist()
    # Crop windows agree: centre within a few px, corners (scale/rotation) within ~10% of the crop.
    assert np.median(centre_shift) < 3.0 and np.max(centre_shift) < 8.0, centre_shift
    assert np.median(corner_shift) < 8.0, corner_shift
    # Pixels: each aligned crop is far closer to its own fixed crop than to another image's.
    same = [_mad(a, f) for a, f in zip(aligned, fixed)]
    other = [_mad(aligned[i], fixed[(i + 1) % len(fixed)]) for i in range(len(aligned))]
    assert np.median(same) < 0.4 * np.median(other), (np.median(same), np.median(other))
    assert np.mean(np.array(same) < np.array(other)) >= 0.9


def test_pipeline_mixes_paths_errors_and_arrays(detector, corpus, lfw_images):
    folder, _ = corpus
    geometry = CropGeometry(size=96)
    pipeline = FacePipeline(detector, geometry)
    grey = np.full((120, 160, 3), 128, np.uint8)
    inputs = [lfw_images[0], folder / "truncated.jpg", grey, np.zeros((4, 4), np.uint8), folder / NON_ASCII_NAME]
    results = pipeline.process(inputs)
    assert [r.ok for r in results] == [True, False, True, False, True]
    first = results[0]
    assert first.image_size == (250, 250) and first.faces
    face, crop = first.faces[0]
    assert crop.shape == (96, 96, 3) and crop.dtype == np.uint8
    assert face.prob >= detector.config.min_prob
    assert "truncated.jpg" in results[1].error and "\n" not in results[1].error
    assert results[2].faces == []
    assert results[3].error.startswith("<array 3>")
    # Chunked iteration gives the same answers and the same order.
    chunked = list(pipeline.iter_process(inputs, chunk_size=2))
    assert [r.source for r in chunked] == [r.source for r in results]
    assert [len(r.faces) for r in chunked] == [len(r.faces) for r in results]
