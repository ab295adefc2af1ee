"""verify.evaluation.evaluate: LFW-format pair evaluation (detect + align, and the aligned CelebA path), the
metrics it reports, the ROC plot, and the impostor cohort attached to a model file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from verify.evaluation.evaluate import (
    FAILED_SCORE,
    build_cohort,
    cohort_sources,
    choose_face,
    embed_images,
    evaluate_pairs,
    lfw_people_images,
    pair_scores,
)
from verify.faces import AlignedFace, DetectorConfig, Face, fixed_crop, load_image
from verify.evaluation.metrics import accuracy_at, best_accuracy_threshold, summarise_verification
from verify.model.file import Embedder, ModelFileError, fingerprint, read_model_file
from verify.model.write import attach_cohort
from verify.data.pairs import lfw_image_path, read_lfw_pairs

from conftest import make_tiny_model

MODEL_THRESHOLD = 0.5
DETECTOR = DetectorConfig(device="cpu", min_face_size=40)  # LFW faces are ~100 px: a shorter pyramid


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt", threshold=MODEL_THRESHOLD,
                           calibration={"target_far": 1e-3, "data": "test identities"})


@pytest.fixture(scope="module")
def embedder(model_path) -> Embedder:
    return Embedder.load(model_path)


@pytest.fixture(scope="module")
def cache() -> dict:
    return {}  # detections shared by the LFW tests of this module (MTCNN on CPU is the slow part)


def _write_lines(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


@pytest.fixture(scope="module")
def lfw_set(lfw_root, tmp_path_factory) -> dict:
    """10 real DevTest genuine pairs (distinct people) linked into tmp, plus planted files: an identical
    pair (Twin_Copy: two links to one photo), two faceless grey frames and one unreadable file."""
    src = lfw_root / "lfw-deepfunneled"
    dev = read_lfw_pairs(lfw_root / "pairsDevTest.txt")
    gen = dev[dev["same"]].drop_duplicates("name1").head(10)
    root = tmp_path_factory.mktemp("lfw") / "images"
    people = []
    for name, i, j in zip(gen["name1"], gen["idx1"], gen["idx2"]):
        for k in (i, j):
            dst = lfw_image_path(root, name, k)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(lfw_image_path(src, name, k))
        people.append((name, int(i), int(j)))
    twin = lfw_image_path(src, people[0][0], people[0][1])
    for k in (1, 2):
        dst = lfw_image_path(root, "Twin_Copy", k)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(twin)
    for k, grey in ((1, 120), (2, 180)):
        dst = lfw_image_path(root, "Blank_Frame", k)
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (250, 250), (grey, grey, grey)).save(dst)
    broken = lfw_image_path(root, "Broken_File", 1)
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")

    real_gen = [f"{n}\t{i}\t{j}" for n, i, j in people]
    # impostors: person k's first image with person k+1's second (cyclic)
    real_imp = [f"{people[k][0]}\t{people[k][1]}\t{people[(k + 1) % 10][0]}\t{people[(k + 1) % 10][2]}"
                for k in range(10)]
    files = tmp_path_factory.mktemp("pairs")
    view1 = _write_lines(
        files / "view1.txt", "12",
        real_gen + ["Twin_Copy\t1\t2", "Blank_Frame\t1\t2"]
        + real_imp
        + [f"Broken_File\t1\t{people[0][0]}\t{people[0][1]}", f"Blank_Frame\t1\t{people[1][0]}\t{people[1][1]}"],
    )
    # View 2 shape: 2 folds of 5 same + 5 different
    view2 = _write_lines(files / "view2.txt", "2\t5",
                         real_gen[:5] + real_imp[:5] + real_gen[5:] + real_imp[5:])
    return {"root": root, "view1": view1, "view2": view2, "people": people}


@pytest.fixture(scope="module")
def celeba_set(celeba_root, tmp_path_factory) -> dict:
    """4 CelebA identities x 3 images copied under NAME/NAME_000k.jpg, plus one unreadable image."""
    img_dir = celeba_root / "img_align_celeba"
    present = set(os.listdir(img_dir))
    by_id: dict[str, list[str]] = {}
    with open(celeba_root / "Anno" / "identity_CelebA.txt") as f:
        for line in f:
            fname, ident = line.split()
            if fname in present:
                by_id.setdefault(ident, []).append(fname)
    chosen = sorted((i for i, v in by_id.items() if len(v) >= 3), key=int)[:4]
    root = tmp_path_factory.mktemp("celeba") / "images"
    names = []
    for ident in chosen:
        name = f"Celeb_{ident}"
        (root / name).mkdir(parents=True)
        for k, fname in enumerate(sorted(by_id[ident])[:3], start=1):
            (root / name / f"{name}_{k:04d}.jpg").write_bytes((img_dir / fname).read_bytes())
        names.append(name)
    (root / "Broken_File").mkdir()
    (root / "Broken_File" / "Broken_File_0001.jpg").write_bytes(b"")
    gen = [f"{n}\t1\t2" for n in names] + [f"{n}\t2\t3" for n in names] + [f"{names[0]}\t1\t3"]
    imp = [f"{names[a]}\t{k}\t{names[(a + 1) % 4]}\t{k}" for a in range(4) for k in (1, 3)]
    imp.append(f"Broken_File\t1\t{names[0]}\t1")
    pairs = _write_lines(tmp_path_factory.mktemp("celeba_pairs") / "pairs.txt", "9", gen + imp)
    return {"root": root, "pairs": pairs, "names": names}


# ---- pure scoring --------------------------------------------------------------------------------


def test_pair_scores_cosine_and_failures():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [np.nan, np.nan]], dtype=np.float32)
    b = np.array([[2.0, 0.0], [1.0, 0.0], [-3.0, -4.0], [1.0, 0.0]], dtype=np.float32)
    s = pair_scores(a, b)
    np.testing.assert_allclose(s, [1.0, 0.0, -1.0, FAILED_SCORE], atol=1e-7)
    assert FAILED_SCORE < -1.0  # below every cosine


def test_summarise_scores_separable_and_fixed_threshold():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1, -0.2])
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    sep = summarise_verification(scores, labels, threshold=0.55, fars=(0.25,))
    assert sep["accuracy"] == 1.0 and sep["accuracy_oracle"] == 1.0
    assert 0.5 < sep["accuracy_oracle_threshold"] < 0.6
    assert sep["auc"] == 1.0 and sep["eer"] == 0.0
    assert sep["tar_at_far"] == {"0.25": 1.0}
    assert sep["accuracy_std"] is None and (sep["pairs"], sep["genuine"], sep["impostor"]) == (8, 4, 4)

    strict = summarise_verification(scores, labels, threshold=0.75, fars=(1e-2,))
    assert strict["accuracy"] == pytest.approx(6 / 8)  # 2 genuines accepted, every impostor rejected
    assert strict["accuracy_oracle"] == 1.0
    assert strict["tar_at_far"] == {"1e-02": None}  # 4 impostors cannot measure FAR 1e-2

    # each fold alone separates at 0.55 (between its 0.6/0.7 genuine and 0.4/0.5 impostor): 100% held-out
    folds = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    kf = summarise_verification(scores, labels, folds=folds)
    assert kf["accuracy"] == 1.0 and kf["accuracy_std"] == 0.0
    np.testing.assert_allclose(kf["fold_thresholds"], [0.55, 0.55])


def test_choose_face_prefers_central_among_large_faces():
    def face(cx, cy, side):
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        landmarks = np.zeros((5, 2), np.float32)
        return AlignedFace(Face(box=box, prob=0.99, landmarks=landmarks), np.zeros((1, 1, 3), np.uint8))

    big_edge, central = face(40, 40, 100), face(125, 125, 80)  # 64% of the largest's area
    assert choose_face([big_edge, central], (250, 250)) == 1
    small_central = face(125, 125, 60)  # 36%: too small to be the subject
    assert choose_face([big_edge, small_central], (250, 250)) == 0


# ---- LFW, detect + align -------------------------------------------------------------------------


def test_lfw_view1_with_model_threshold(lfw_set, embedder, cache):
    r = evaluate_pairs(lfw_set["view1"], lfw_set["root"], embedder, detector_config=DETECTOR, progress=False,
                       keep_scores=True, cache=cache)
    assert (r["pairs"], r["genuine"], r["impostor"]) == (24, 12, 12)
    assert r["images"] == 25  # 20 real + 2 twin links + 2 grey frames + 1 broken
    assert r["unreadable_images"] == 1 and r["centre_crop_images"] == 2 and r["failed_images"] == 3
    assert r["failed_pairs"] == 1
    scores, labels = r["scores"], r["labels"]
    assert scores[22] == FAILED_SCORE  # the Broken_File impostor line
    assert np.all(scores[np.arange(24) != 22] >= -1.0)
    assert scores[10] == pytest.approx(1.0, abs=1e-5)  # Twin_Copy: the same photo twice
    assert r["model"] == embedder.fingerprint
    assert r["threshold"] == MODEL_THRESHOLD
    assert r["accuracy_protocol"] == "threshold from the model file (calibrated on test identities at FAR 0.001)"
    assert r["accuracy"] == pytest.approx(accuracy_at(scores, labels, MODEL_THRESHOLD))
    assert r["accuracy_oracle"] == pytest.approx(best_accuracy_threshold(scores, labels)[1])
    assert r["accuracy_oracle"] >= r["accuracy"]
    assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["eer"] <= 1.0
    assert set(r["tar_at_far"]) == {"1e-02", "1e-03"}
    assert any("overlap" in c for c in r["caveats"])


def test_lfw_view2_folds_and_plot(lfw_set, embedder, cache, tmp_path):
    plot = tmp_path / "roc.png"
    r = evaluate_pairs(lfw_set["view2"], lfw_set["root"], embedder, detector_config=DETECTOR, progress=False,
                       keep_scores=True, cache=cache, plot=plot)
    assert r["accuracy_protocol"].startswith("2-fold")
    assert (r["pairs"], r["images"], r["failed_images"], r["failed_pairs"]) == (20, 20, 0, 0)
    assert len(r["fold_thresholds"]) == 2 and r["accuracy_std"] is not None
    assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["auc"] <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["roc.png"]  # atomic write left no temp file


def test_lfw_threshold_from_other_file(lfw_set, embedder, cache):
    ref = evaluate_pairs(lfw_set["view2"], lfw_set["root"], embedder, detector_config=DETECTOR, progress=False,
                         keep_scores=True, cache=cache)
    r = evaluate_pairs(lfw_set["view1"], lfw_set["root"], embedder, detector_config=DETECTOR, progress=False,
                       threshold_from=lfw_set["view2"], keep_scores=True, cache=cache)
    assert r["accuracy_protocol"].startswith("threshold chosen on view2.txt")
    expected_t = best_accuracy_threshold(ref["scores"], ref["labels"])[0]
    assert r["threshold"] == pytest.approx(expected_t)
    assert r["accuracy"] == pytest.approx(accuracy_at(r["scores"], r["labels"], expected_t))
    assert r["images"] == 25  # the reference file's images are not counted as this file's


def test_embed_images_no_face_policies_and_dedup(lfw_set, embedder, cache):
    root = lfw_set["root"]
    name, i, _ = lfw_set["people"][0]
    face = lfw_image_path(root, name, i)
    blank = lfw_image_path(root, "Blank_Frame", 1)
    emb, errors = embed_images([face, blank, face], embedder, detector_config=DETECTOR, progress=False,
                               no_face="fail", cache=cache)
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    assert np.isfinite(emb[0]).all() and np.isnan(emb[1]).all()
    np.testing.assert_array_equal(emb[0], emb[2])
    assert errors[0] is None and errors[1] == f"{blank}: no face found"
    emb_c, errors_c = embed_images([blank], embedder, detector_config=DETECTOR, progress=False, cache=cache)
    assert np.isfinite(emb_c).all() and "centre crop" in errors_c[0]
    assert np.linalg.norm(emb_c[0]) == pytest.approx(1.0, abs=1e-5)


def test_cohort_from_lfw_people(lfw_set, embedder, cache):
    images = lfw_people_images(lfw_set["view1"], lfw_set["root"])
    assert len(images) == 25 and len(set(images)) == 25
    cohort = build_cohort(images, embedder, detector_config=DETECTOR, progress=False, cache=cache)
    # 13 people; Blank_Frame (no face, never centre-cropped) and Broken_File give nothing
    assert cohort.shape == (11, 32) and cohort.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cohort, axis=1), 1.0, atol=1e-5)
    two = build_cohort(images, embedder, max_per_identity=2, detector_config=DETECTOR, progress=False, cache=cache)
    assert two.shape == (22, 32)


def test_calibrate_command_with_default_device(lfw_set, model_path, tmp_path):
    """`faceverify calibrate` with no --device ("auto") resolves the device and attaches the cohort."""
    from typer.testing import CliRunner

    from verify.cli import app

    path = tmp_path / "model.pt"
    path.write_bytes(model_path.read_bytes())
    r = CliRunner().invoke(app, ["calibrate", "--model", str(path), "--pairs", str(lfw_set["view1"]),
                                 "--images", str(lfw_set["root"])], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "cohort of 11 faces attached" in r.output
    from verify.model.cohort import read_cohort_sources, read_cohort_vectors

    stored, _ = read_cohort_vectors(path)  # the cohort beside the model
    assert stored.shape == (11, 32)
    # its per-row labels beside it, tied to the stored cohort: one LFW source, one person per row here
    labels = read_cohort_sources(path, stored.astype(np.float32))
    assert labels is not None and labels.names == ("lfw",) and labels.counts() == {"lfw": 11}
    assert len(set(labels.persons.tolist())) == 11 and (labels.persons >= 0).all()


def test_cohort_labels_name_sources_and_people():
    from verify.evaluation.evaluate import cohort_labels

    rows = ["lfw:Ann", "lfw:Ann", "lfw:Bob", "celeba:7", "face-utkface:/x/UTKFace/cohort/a.jpg",
            "face-utkface:/x/UTKFace/cohort/b.jpg"]
    labels = cohort_labels(rows)
    assert labels.names == ("lfw", "celeba", "face-utkface")
    assert labels.codes.tolist() == [0, 0, 0, 1, 2, 2]
    p = labels.persons.tolist()
    assert p[0] == p[1] != p[2] and p[3] >= 0 and p[4] == p[5] == -1


def test_bad_images_root(lfw_set, embedder, tmp_path):
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        evaluate_pairs(lfw_set["view1"], tmp_path / "nowhere", embedder, progress=False)
    with pytest.raises(ValueError, match=r"none of its 25 images could be read"):
        evaluate_pairs(lfw_set["view1"], tmp_path, embedder, detector_config=DETECTOR, progress=False)


# ---- CelebA, aligned path ------------------------------------------------------------------------


def test_celeba_aligned_path(celeba_set, embedder):
    r = evaluate_pairs(celeba_set["pairs"], celeba_set["root"], embedder, aligned=True, progress=False,
                       keep_scores=True)
    assert (r["pairs"], r["genuine"], r["impostor"]) == (18, 9, 9)
    assert (r["images"], r["failed_images"], r["unreadable_images"], r["failed_pairs"]) == (13, 1, 1, 1)
    assert 0.0 <= r["auc"] <= 1.0 and r["aligned"] is True
    assert not any("overlap" in c for c in r["caveats"])
    # the aligned path is load -> fixed_crop -> embed
    name = celeba_set["names"][0]
    a, b = (lfw_image_path(celeba_set["root"], name, k) for k in (1, 2))
    crops = np.stack([fixed_crop(load_image(p), embedder.geometry) for p in (a, b)])
    direct = embedder.embed(crops)
    assert r["scores"][0] == pytest.approx(float(direct[0] @ direct[1]), abs=1e-5)

    paths = [lfw_image_path(celeba_set["root"], n, k) for n in celeba_set["names"] for k in (1, 2, 3)]
    assert build_cohort(paths, embedder, aligned=True, progress=False).shape == (4, 32)
    assert build_cohort(paths, embedder, aligned=True, max_per_identity=None, progress=False).shape == (12, 32)
    solo = build_cohort(paths, embedder, aligned=True, identities=[str(i) for i in range(12)], progress=False)
    assert solo.shape == (12, 32)


# ---- cohort in the model file --------------------------------------------------------------------


def test_attach_cohort_round_trip(model_path, tmp_path, rng):
    """The cohort goes into the one file beside the model; the model file itself is not rewritten."""
    path = tmp_path / "model.pt"
    path.write_bytes(model_path.read_bytes())
    os.chmod(path, 0o644)
    model_bytes = path.read_bytes()
    before = read_model_file(path)["fingerprint"]
    cohort = rng.normal(size=(7, 32)).astype(np.float32)
    attach_cohort(path, cohort, "unit test cohort")
    assert path.read_bytes() == model_bytes  # weights and metadata untouched: nothing of them to store again
    with np.load(tmp_path / "model.cohort.npz", allow_pickle=False) as z:
        c, source = z["vectors"], str(z["source"])
    assert c.dtype == np.float16 and c.shape == (7, 32) and source == "unit test cohort"
    unit = cohort / np.linalg.norm(cohort, axis=1, keepdims=True)
    np.testing.assert_allclose(c.astype(np.float32), unit, atol=2e-3)
    assert sorted(os.listdir(tmp_path)) == ["model.cohort.npz", "model.pt"]
    assert stat.S_IMODE(os.stat(tmp_path / "model.cohort.npz").st_mode) == 0o644
    emb = Embedder.load(path)
    assert emb.fingerprint == before and np.array_equal(emb.cohort, c.astype(np.float32))
    assert emb.meta["extra"]["cohort_source"] == "unit test cohort"

    with pytest.raises(ValueError, match=r"model\.pt: cohort must be \(C, 32\)"):
        attach_cohort(path, cohort[:, :16], "wrong width")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    torch.save(dict(blob, fingerprint="0" * 16), path)
    with pytest.raises(ModelFileError, match="fingerprint"):
        attach_cohort(path, cohort, "x")


def test_an_older_model_with_its_cohort_inside_is_read_and_rewritten_once_without_it(model_path, tmp_path, rng):
    """Model files of earlier releases carry the cohort inside (extra["cohort"]); they are still read, and
    attaching a cohort to one moves it out: the model file is rewritten once without it."""
    path = tmp_path / "model.pt"
    blob = torch.load(model_path, map_location="cpu", weights_only=True)
    old = rng.normal(size=(5, 32)).astype(np.float32)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    blob["extra"] = {**(blob.get("extra") or {}), "cohort": torch.from_numpy(old).to(torch.float16),
                     "cohort_source": "inside"}
    torch.save(blob, path)
    np.testing.assert_allclose(Embedder.load(path).cohort, old, atol=2e-3)  # read as before
    new = rng.normal(size=(9, 32)).astype(np.float32)
    attach_cohort(path, new, "beside")
    rewritten = torch.load(path, map_location="cpu", weights_only=True)
    assert "cohort" not in rewritten["extra"] and "cohort_source" not in rewritten["extra"]
    assert rewritten["fingerprint"] == blob["fingerprint"]
    emb = Embedder.load(path)
    assert emb.cohort.shape == (9, 32) and emb.meta["extra"]["cohort_source"] == "beside"


def test_an_unreadable_cohort_file_is_one_line_naming_it(model_path, tmp_path):
    from verify.model.cohort import CohortFileError

    path = tmp_path / "model.pt"
    path.write_bytes(model_path.read_bytes())
    (tmp_path / "model.cohort.npz").write_bytes(b"not a zip file")
    with pytest.raises(CohortFileError) as e:
        Embedder.load(path).cohort
    msg = str(e.value)
    assert "model.cohort.npz" in msg and "unreadable cohort file" in msg and "\n" not in msg


# ---- the real View 1 files -----------------------------------------------------------------------


def test_view1_train_and_test_people_are_disjoint(lfw_root):
    """The cohort comes from pairsDevTrain people; a DevTest evaluation stays clean because the two
    files share no person (checked here on the official files)."""
    train = read_lfw_pairs(lfw_root / "pairsDevTrain.txt")
    test = read_lfw_pairs(lfw_root / "pairsDevTest.txt")
    people = lambda d: set(d["name1"]) | set(d["name2"])  # noqa: E731
    assert len(people(train)) == 2132 and len(people(test)) == 963
    assert not people(train) & people(test)
    root = lfw_root / "lfw-deepfunneled"
    train_imgs, test_imgs = lfw_people_images(lfw_root / "pairsDevTrain.txt", root), lfw_people_images(
        lfw_root / "pairsDevTest.txt", root)
    assert (len(train_imgs), len(test_imgs)) == (3443, 1549)
    assert all(p.is_file() for p in train_imgs + test_imgs)


def test_cohort_sources_keep_celeba_training_identities_out(celeba_root, lfw_set, tmp_path):
    """CelebA roots give their partition 1-2 photos only (partition 0 holds the training identities);
    unlabelled folders give every image as its own person; LFW people keep their names."""
    from verify.data.celeba import read_partition

    faces = tmp_path / "faces"
    (faces / "sub").mkdir(parents=True)
    for i, p in enumerate(sorted((celeba_root / "img_align_celeba").glob("*.jpg"))[:3]):
        (faces / ("sub" if i else "") / p.name).write_bytes(p.read_bytes())
    (faces / "notes.txt").write_text("not an image\n")
    images, ids, parts = cohort_sources(lfw_set["view1"], lfw_set["root"], [celeba_root], [faces])
    partition = read_partition(celeba_root / "Anno" / "list_eval_partition.txt")
    celeba = [p for p, i in zip(images, ids) if i.startswith("celeba:")]
    assert len(celeba) == 780 + 660  # the sample's partition 1 and 2 photos (README of the data)
    assert set(partition.loc[[p.name for p in celeba]]) == {1, 2}
    lfw = [i for i in ids if i.startswith("lfw:")]
    assert len(lfw) == 25 and len(set(lfw)) == 13
    solo = [i for i in ids if i.startswith("face-")]  # face-<set>: the folder's parent names the source
    assert len(solo) == len(set(solo)) == 3
    assert len(parts) == 3 and "partition 1-2" in parts[1]
    p1, ids1, parts1 = cohort_sources(celeba_roots=[celeba_root], celeba_partitions=(1,))
    assert len(p1) == 780 and set(partition.loc[[p.name for p in p1]]) == {1} and "partition 1 of" in parts1[0]
    with pytest.raises(ValueError, match="partitions must be 1 and/or 2"):
        cohort_sources(celeba_roots=[celeba_root], celeba_partitions=(0, 1))
    with pytest.raises(ValueError, match="no cohort source"):
        cohort_sources()
    with pytest.raises(ValueError, match="together"):
        cohort_sources(lfw_set["view1"])
    with pytest.raises(ValueError, match="no images for the cohort"):
        cohort_sources(face_dirs=[tmp_path / "faces" / "nothing"])


def test_calibrate_command_mixes_sources_and_caps(lfw_set, model_path, celeba_root, tmp_path):
    from typer.testing import CliRunner

    from verify.cli import app

    path = tmp_path / "model.pt"
    path.write_bytes(model_path.read_bytes())
    r = CliRunner().invoke(app, ["calibrate", "--model", str(path), "--pairs", str(lfw_set["view1"]),
                                 "--images", str(lfw_set["root"]), "--celeba", str(celeba_root),
                                 "--max-faces", "12", "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    from verify.model.cohort import read_cohort_vectors

    stored, source = read_cohort_vectors(path)
    n = stored.shape[0]
    assert 1 <= n <= 12 and f"cohort of {n} faces attached" in r.output
    assert "LFW people of" in source and "CelebA partition 1-2" in source
    r = CliRunner().invoke(app, ["calibrate", "--model", str(path), "--celeba", str(celeba_root), "--celeba-partition",
                                 "1", "--per-person", "2", "--max-faces", "30", "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    source = read_cohort_vectors(path)[1]
    assert source.startswith("CelebA partition 1 of") and "at most 2 per labelled person" in source
