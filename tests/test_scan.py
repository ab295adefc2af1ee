"""verify.scan: folder scans that account for every file, survive bad input and kills, and resume.

The model is a randomly initialised small network: match quality is not under test here, the
accounting, robustness and resume behaviour are. Faces are real (LFW)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corpus import NON_ASCII_NAME, make_bad_corpus
from verify.faces import DetectorConfig, Face
from verify.model.geometry import CropGeometry
from verify.scan import (
    COLUMNS,
    CRASH_ERROR,
    FACE_CHUNK,
    ScanError,
    WorkerPool,
    decode_file,
    decode_files,
    journal_path,
    run_scan,
)
from verify.scan.workers import _chunks
from verify.identity.scoring import Match

from conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
PERSON = "Jennifer_Lopez"  # 8 LFW photos: 3 enrolled, the rest scanned
OTHERS = ("Hans_Blix", "Paul_Wolfowitz", "Ricardo_Lagos")
THRESHOLD = 0.8  # similarity; the enrolled person's own photos pass it even with this random model
DETECTOR = DetectorConfig(device="cpu", min_face_size=60)  # LFW faces are ~100 px: a shorter, faster pyramid
# pandas is imported inside the tests: spawned decode workers import this module (the crash test).


# ------------------------------------------------------------------------------------------
# Fixtures: a small random model, an LFW enrollment, folders to scan
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "model.pt", threshold=THRESHOLD, calibration={})


@pytest.fixture(scope="module")
def embedder(model_path):
    from verify.model.file import Embedder

    return Embedder.load(model_path)


@pytest.fixture(scope="module")
def detector():
    from verify.faces import FaceDetector

    return FaceDetector(DETECTOR)


@pytest.fixture(scope="module")
def person_photos(lfw_root) -> list[Path]:
    return sorted((lfw_root / "lfw-deepfunneled" / PERSON).glob("*.jpg"))


@pytest.fixture(scope="module")
def pooled(person_photos, embedder, detector, tmp_path_factory) -> Path:
    """The enrolled person's pooled photo vectors, saved so a subprocess can build the same matcher."""
    from verify.faces import FacePipeline
    from verify.identity.scoring import pool_photos

    results = FacePipeline(detector, embedder.geometry).process(person_photos[:3])
    vecs = embedder.embed(np.stack([r.faces[0].crop for r in results]))  # (3, D)
    _, pooled = pool_photos(vecs, np.arange(len(vecs)))
    path = tmp_path_factory.mktemp("gallery") / "pooled.npy"
    np.save(path, pooled)
    return path


def make_matcher(pooled_path: Path):
    from verify.identity.scoring import IdentityMatcher

    return IdentityMatcher({PERSON: np.load(pooled_path)}, {}, default_similarity_threshold=THRESHOLD)


def side_by_side(a: Path, b: Path, out: Path) -> None:
    with Image.open(a) as ia, Image.open(b) as ib:
        canvas = Image.new("RGB", (ia.width + ib.width, max(ia.height, ib.height)))
        canvas.paste(ia.convert("RGB"), (0, 0))
        canvas.paste(ib.convert("RGB"), (ia.width, 0))
    canvas.save(out, quality=95)


def listed_entries(folder: Path) -> set[str]:
    """What the report must account for: every non-directory entry, plus symlinks to folders."""
    want = set()
    for root, dirs, names in os.walk(folder, followlinks=False):
        want.update(os.path.join(root, n) for n in names)
        want.update(os.path.join(root, d) for d in dirs if os.path.islink(os.path.join(root, d)))
    return {os.fsencode(p).decode("utf-8", "backslashreplace") for p in want}


def check_accounting(df, folder: Path) -> None:
    """Each entry appears as exactly one contiguous group of rows with consistent face numbering."""
    assert list(df.columns) == list(COLUMNS)
    assert set(df["path"]) == listed_entries(folder)
    groups = df.groupby("path", sort=False)
    runs = (df["path"] != df["path"].shift()).sum()
    assert runs == groups.ngroups, "a file's rows are not together"
    for path, g in groups:
        if (g["face"] == -1).any():
            assert len(g) == 1 and g["status"].iloc[0] in ("no-face", "error", "skipped"), path
        else:
            assert list(g["face"]) == list(range(len(g))), path
            assert (g["faces"] == len(g)).all() and (g["status"] == "face").all(), path
        # At most one face of a photo counts as a match for a given identity.
        matched = g.loc[g["match"] == True, "identity"]  # noqa: E712 (object column with NaN)
        assert not matched.duplicated().any(), path


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, person_photos, lfw_root) -> tuple[Path, dict[str, str]]:
    """Real faces, a two-face composite, no-face images, the bad-input corpus, non-images, nesting,
    a symlink loop, a fifo, a dangling link, non-ASCII and non-UTF-8 names."""
    root = tmp_path_factory.mktemp("photos")
    lfw = lfw_root / "lfw-deepfunneled"
    expected = {}
    for p in person_photos[3:5]:
        (root / p.name).write_bytes(p.read_bytes())
        expected[p.name] = "face"
    nested = root / "nested" / "deeper"
    nested.mkdir(parents=True)
    other = sorted((lfw / OTHERS[0]).glob("*.jpg"))[0]
    (nested / "日本語 photo.jpg").write_bytes(other.read_bytes())
    expected["nested/deeper/日本語 photo.jpg"] = "face"
    # An enrolled photo twice side by side: both faces pass for PERSON, only the closer may count.
    side_by_side(person_photos[0], person_photos[0], root / "two_faces.jpg")
    expected["two_faces.jpg"] = "two-faces"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (180, 240, 3), dtype=np.uint8)).save(root / "noise.png")
    expected["noise.png"] = "no-face"
    corpus = make_bad_corpus(root / "corpus", face_image=person_photos[5])
    expected.update({f"corpus/{k}": v for k, v in corpus.items()})
    (root / "notes.txt").write_text("not a photo\n")
    expected["notes.txt"] = "skipped:not an image"
    (root / os.fsdecode(b"latin1_\xe9.txt")).write_bytes(b"\x00\x01 binary junk")
    expected[os.fsdecode(b"latin1_\xe9.txt")] = "skipped:not an image"
    os.symlink("..", root / "nested" / "loop")  # a loop: nested/loop -> root
    expected["nested/loop"] = "skipped:symbolic link to a folder"
    os.symlink("does-not-exist.jpg", root / "dangling.jpg")
    expected["dangling.jpg"] = "error:broken symbolic link"
    os.symlink(person_photos[3].name, root / "link_to_photo.jpg")
    expected["link_to_photo.jpg"] = "face"
    os.mkfifo(root / "pipe.jpg")  # opening it would block forever
    expected["pipe.jpg"] = "skipped:fifo"
    return root, expected


# ------------------------------------------------------------------------------------------
# The mixed folder, end to end
# ------------------------------------------------------------------------------------------


def test_scan_accounts_for_every_file(mixed_folder, embedder, detector, pooled, tmp_path):
    import pandas as pd

    folder, expected = mixed_folder
    out = tmp_path / "report.csv"
    summary = run_scan([folder], embedder=embedder, matcher=make_matcher(pooled), detector=detector, out=out,
                       workers=2, batch_size=8, progress=False)
    assert out.exists() and not journal_path(out).exists()
    df = pd.read_csv(out, keep_default_na=False, na_values=[""])
    check_accounting(df, folder)

    assert str(folder / "corpus" / NON_ASCII_NAME) in set(df["path"])  # names kept as they are
    by_name = {os.path.relpath(p, folder): g for p, g in df.groupby("path", sort=False)}
    for name, outcome in expected.items():
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        if outcome == "error:directory":
            # corpus/folder.jpg is a real folder: walked into (it is empty), not a file row.
            assert shown not in by_name
            continue
        g = by_name[shown]
        status = g["status"].iloc[0]
        if outcome == "face":
            assert status == "face", (name, g["error"].iloc[0])
        elif outcome == "two-faces":
            assert len(g) >= 2
            both = g[g["nearest"] == PERSON].nsmallest(2, "distance")
            assert len(both) == 2 and (both["distance"] <= 1 - THRESHOLD).all()  # both pass the threshold
            assert both["match"].tolist().count(True) == 1  # ... but one face per photo counts
            loser = both[both["match"] == False]  # noqa: E712
            assert "closer" in loser["note"].iloc[0] and pd.isna(loser["identity"].iloc[0])
        elif outcome == "no-face":
            assert status == "no-face" and g["faces"].iloc[0] == 0, name
        elif outcome == "ok-or-error":
            assert status in ("face", "no-face", "error"), name
        else:
            kind, phrase = outcome.split(":", 1)
            want = "skipped" if phrase in ("not an image", "symbolic link to a folder", "fifo") else "error"
            assert status == want, (name, status, g["error"].iloc[0])
            assert phrase in g["error"].iloc[0], (name, g["error"].iloc[0])

    # Face rows carry a box in the original image and a decision; the summary adds up the report.
    faces = df[df["status"] == "face"]
    assert faces[["x1", "y1", "x2", "y2", "prob", "distance", "threshold"]].notna().all().all()
    assert ((faces["x2"] > faces["x1"]) & (faces["y2"] > faces["y1"])).all()
    assert faces["match"].any() and not faces["match"].all()  # at least the composite's demoted face
    assert (faces.loc[faces["match"] == True, "identity"] == PERSON).all()  # noqa: E712
    files = df.groupby("path", sort=False)["status"].first()
    assert summary.files == len(files) == len(listed_entries(folder))
    assert summary.faces == len(faces)
    assert summary.matches == int((faces["match"] == True).sum())  # noqa: E712
    assert summary.no_face == int((files == "no-face").sum())
    assert summary.errors == int((files == "error").sum()) and summary.errors >= 8
    assert summary.skipped == int((files == "skipped").sum())
    assert summary.images == int(files.isin(["face", "no-face"]).sum())
    assert summary.processed == summary.files and summary.resumed == 0
    assert set(summary.stage_seconds) >= {"decode", "detect", "align", "embed", "match"}
    assert summary.stage_seconds["detect"] > 0 and summary.images_per_s > 0


def test_face_workers_report_what_the_main_process_reports(mixed_folder, embedder, detector, pooled, tmp_path):
    """Detecting, aligning and embedding in the workers (the CPU default) gives the report the
    main-process path gives: same rows, same boxes, same decisions (up to float rounding)."""
    import pandas as pd

    from verify.scan import FACE_CHUNK

    folder, _ = mixed_folder
    reports, summaries = {}, {}
    for face_workers in (True, False):
        out = tmp_path / f"report-{face_workers}.csv"
        summaries[face_workers] = run_scan([folder], embedder=embedder, matcher=make_matcher(pooled),
                                           detector=detector, out=out, workers=2, batch_size=5,
                                           face_workers=face_workers, progress=False)
        reports[face_workers] = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert summaries[True].face_workers == 2 and summaries[False].face_workers == 0
    assert summaries[True].images > FACE_CHUNK  # several worker tasks
    a, b = reports[True], reports[False]
    assert a[["path", "face", "faces", "status", "identity", "match", "error"]].equals(
        b[["path", "face", "faces", "status", "identity", "match", "error"]])
    num = ["x1", "y1", "x2", "y2", "prob", "distance"]
    np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), atol=1e-3)
    for key in ("images", "faces", "matches", "no_face", "errors", "skipped"):
        assert getattr(summaries[True], key) == getattr(summaries[False], key), key
    assert summaries[True].stage_seconds["detect"] > 0  # worker time is accounted for

    class Wrapped(type(detector)):  # not rebuildable in a worker from its config
        pass

    with pytest.raises(ValueError, match="not a FaceDetector"):
        run_scan([folder], embedder=embedder, matcher=make_matcher(pooled), detector=Wrapped(DETECTOR),
                 out=tmp_path / "never.csv", workers=2, face_workers=True, progress=False)
    assert not (tmp_path / "never.csv").exists() and not journal_path(tmp_path / "never.csv").exists()


def _iou(a, b) -> float:
    (a1, b1, a2, b2), (c1, d1, c2, d2) = a, b
    inter = max(0.0, min(a2, c2) - max(a1, c1)) * max(0.0, min(b2, d2) - max(b1, d1))
    return inter / ((a2 - a1) * (b2 - b1) + (c2 - c1) * (d2 - d1) - inter)


def test_big_image_is_shrunk_in_the_worker_and_boxes_map_back(person_photos, embedder, pooled, tmp_path):
    """A photo larger than the detector's max_side crosses the process boundary shrunk; its boxes are
    reported in the original image's pixels, where a full-size detection puts them."""
    import pandas as pd

    from verify.faces import FaceDetector

    folder = tmp_path / "in"
    folder.mkdir()
    with Image.open(person_photos[3]) as im:
        im.convert("RGB").resize((400, 400), Image.LANCZOS).save(folder / "big.png")
    d = decode_file(str(folder / "big.png"), max_pixels=10**8, max_side=200)
    assert d.image is not None and d.image.shape == (200, 200, 3) and d.scale == (2.0, 2.0)

    boxes = {}
    for max_side in (200, 1600):  # shrunk by 2 in the worker / not shrunk
        out = tmp_path / f"r{max_side}.csv"
        det = FaceDetector(DetectorConfig(device="cpu", min_face_size=60, max_side=max_side))
        run_scan([folder], embedder=embedder, matcher=make_matcher(pooled), detector=det, out=out, workers=0,
                 progress=False)
        df = pd.read_csv(out)
        assert df["status"].iloc[0] == "face"
        boxes[max_side] = df.loc[0, ["x1", "y1", "x2", "y2"]].to_numpy(float)
    width = boxes[1600][2] - boxes[1600][0]
    assert width > 100  # the face of a 250 px LFW photo, upscaled to 400 px
    assert _iou(boxes[200], boxes[1600]) > 0.7, boxes  # MTCNN at half resolution is a little less precise
    # (boxes left unscaled: IoU < 0.1)

    # A big JPEG is decoded at 1/4 scale by libjpeg (1000 -> 250 px), then shrunk to 200: the two
    # scales compose, and the box lands where the 400 px photo's box lands, scaled by 2.5.
    jpeg = tmp_path / "jpeg"
    jpeg.mkdir()
    with Image.open(person_photos[3]) as im:
        im.convert("RGB").resize((1000, 1000), Image.LANCZOS).save(jpeg / "big.jpg", quality=95)
    d = decode_file(str(jpeg / "big.jpg"), max_pixels=10**8, max_side=200)
    assert d.image is not None and d.image.shape == (200, 200, 3) and d.scale == pytest.approx((5.0, 5.0))
    out = tmp_path / "r-jpeg.csv"
    det = FaceDetector(DetectorConfig(device="cpu", min_face_size=60, max_side=200))
    run_scan([jpeg], embedder=embedder, matcher=make_matcher(pooled), detector=det, out=out, workers=0, progress=False)
    got = pd.read_csv(out).loc[0, ["x1", "y1", "x2", "y2"]].to_numpy(float)
    assert _iou(got, (boxes[1600] + 0.5) * 2.5 - 0.5) > 0.7, got

    from verify.faces import face_to_original  # the exact mapping: pixel centres, (v + 0.5) * s - 0.5

    face = Face(box=(99.5, 49.5, 199.5, 149.5), prob=1.0, landmarks=np.full((5, 2), 99.5, np.float32))
    mapped = face_to_original(face, (2.5, 2.5))
    assert mapped.box == (249.5, 124.5, 499.5, 374.5)
    np.testing.assert_allclose(mapped.landmarks, 249.5)


# ------------------------------------------------------------------------------------------
# Kill and resume
# ------------------------------------------------------------------------------------------

SCAN_SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np
    from verify.faces import DetectorConfig
    from verify.model.file import Embedder
    from verify.scan import run_scan
    from verify.identity.scoring import IdentityMatcher
    folder, out, model, pooled, threshold, person = sys.argv[1:7]
    matcher = IdentityMatcher({person: np.load(pooled)}, {}, default_similarity_threshold=float(threshold))

    def slow_matcher(queries):  # >= 0.3 s per photo: the test has time to kill the scan midway
        time.sleep(0.3)
        return matcher(queries)

    run_scan([folder], embedder=Embedder.load(model), matcher=slow_matcher, out=out, workers=2, batch_size=1,
             progress=False, detector_config=DetectorConfig(device="cpu", min_face_size=60))
""")


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat_file.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def lfw_folder(tmp_path_factory, person_photos, lfw_root) -> Path:
    root = tmp_path_factory.mktemp("lfw_scan")
    photos = list(person_photos[3:6]) + [sorted((lfw_root / "lfw-deepfunneled" / o).glob("*.jpg"))[0] for o in OTHERS]
    for i, p in enumerate(photos):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / p.name).write_bytes(p.read_bytes())
    side_by_side(person_photos[3], photos[-1], root / "b" / "zz_two_people.jpg")  # 2 faces, scanned last
    (root / "readme.txt").write_text("a text file among the photos\n")
    return root


@pytest.fixture(scope="module")
def lfw_reference(lfw_folder, embedder, detector, pooled, tmp_path_factory) -> Path:
    """An uninterrupted scan of lfw_folder (JSON lines)."""
    out = tmp_path_factory.mktemp("reference") / "reference.jsonl"
    run_scan([lfw_folder], embedder=embedder, matcher=make_matcher(pooled), detector=detector, out=out,
             workers=0, batch_size=4, progress=False)
    return out


def test_script_without_main_guard_falls_back_to_the_main_process(lfw_folder, lfw_reference, model_path, pooled,
                                                                  tmp_path):
    """Workers cannot start from a script without `if __name__ == "__main__":` (the child re-runs it):
    the scan warns, does everything in the main process, and reports what an ordinary scan reports."""
    import pandas as pd

    script = tmp_path / "unguarded.py"
    body = SCAN_SCRIPT.replace("time.sleep(0.3)", "pass").replace("batch_size=1", "batch_size=4")
    script.write_text(body)
    out = tmp_path / "unguarded.jsonl"
    r = subprocess.run([sys.executable, str(script), str(lfw_folder), str(out), str(model_path), str(pooled),
                        str(THRESHOLD), PERSON], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "do not start" in r.stderr and "main process" in r.stderr
    got, ref = pd.read_json(out, lines=True), pd.read_json(lfw_reference, lines=True)
    check_accounting(got, lfw_folder)
    assert got[["path", "face", "status", "match"]].equals(ref[["path", "face", "status", "match"]])


def _decisions(df) -> dict[tuple[str, int], tuple]:
    return {(r.path, int(r.face)): (r.status, r.nearest if isinstance(r.nearest, str) else None,
                                    r.distance, r.match) for r in df.itertuples()}


def test_kill_and_resume_loses_and_duplicates_nothing(lfw_folder, lfw_reference, model_path, pooled, embedder,
                                                       detector, tmp_path):
    import pandas as pd

    ref = pd.read_json(lfw_reference, lines=True)
    check_accounting(ref, lfw_folder)

    out = tmp_path / "killed.csv"
    journal = journal_path(out)
    proc = subprocess.Popen(
        [sys.executable, "-c", SCAN_SCRIPT, str(lfw_folder), str(out), str(model_path), str(pooled), str(THRESHOLD),
         PERSON], cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_bytes().count(b"\n") >= 4:  # header + 3 rows
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"scan ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        workers = _descendants(proc.pid)  # face workers are children of the fork server, a child
        assert len(workers) >= 3, workers  # fork server + 2 workers (+ the resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and journal.exists()
    lines = journal.read_bytes().splitlines()
    assert 4 <= len(lines) < len(ref) + 1  # partly done

    # The workers (and the fork server) notice that the scan is gone and exit instead of lingering.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert workers and not any(_alive(pid) for pid in workers)

    # Tear the last row, as a kill in mid-write would: that file must be scanned again.
    data = journal.read_bytes()
    torn_row = json.loads(data.rstrip(b"\n").rsplit(b"\n", 1)[1])
    journal.write_bytes(data.rstrip(b"\n")[:-7])

    with pytest.raises(ScanError, match="resume"):  # never silently start over
        run_scan([lfw_folder], embedder=embedder, matcher=make_matcher(pooled), detector=detector, out=out,
                 workers=0, progress=False)
    summary = run_scan([lfw_folder], embedder=embedder, matcher=make_matcher(pooled), detector=detector, out=out,
                       workers=0, batch_size=4, resume=True, progress=False)
    assert not journal.exists()
    got = pd.read_csv(out)
    check_accounting(got, lfw_folder)
    assert (got["path"] == torn_row["path"]).sum() >= 1
    assert summary.resumed >= 1 and summary.processed == summary.files - summary.resumed
    assert summary.files == ref["path"].nunique()

    # Same rows as the uninterrupted scan: same faces, same decisions (distances up to float noise).
    a, b = _decisions(ref), _decisions(got)
    assert a.keys() == b.keys()
    for key in a:
        sa, na, da, ma = a[key]
        sb, nb, db, mb = b[key]
        assert (sa, na) == (sb, nb), key
        if sa == "face":
            assert abs(da - db) < 1e-3, key
            if abs(da - (1 - THRESHOLD)) > 1e-3:
                assert ma == mb, key
    assert list(got["path"].drop_duplicates()) == list(ref["path"].drop_duplicates())  # walk order kept


def test_resume_drops_incomplete_file_and_torn_garbage(lfw_folder, lfw_reference, embedder, detector, pooled,
                                                        tmp_path):
    """A file whose rows were only partly written (and NUL garbage after them) is redone, once."""
    rows = [json.loads(line) for line in lfw_reference.read_text().splitlines()]
    multi = [r["path"] for r in rows if r["face"] == 1][-1]  # the last photo with 2+ faces
    cut = max(i for i, r in enumerate(rows) if r["path"] == multi)  # drop its last face row (and all after)
    out = tmp_path / "partial.jsonl"
    header = {"journal": "faceverify-scan-journal", "version": 1, "folders": [str(lfw_folder)],
              "model": embedder.fingerprint, "columns": list(COLUMNS)}
    kept = [header] + rows[:cut]
    journal_path(out).write_text("".join(json.dumps(r) + "\n" for r in kept) + "\0" * 40)
    summary = run_scan([lfw_folder], embedder=embedder, matcher=make_matcher(pooled), detector=detector, out=out,
                       workers=0, batch_size=8, resume=True, progress=False)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["path"], r["face"]) for r in got] == [(r["path"], r["face"]) for r in rows]
    assert summary.resumed == len({r["path"] for r in rows[:cut]} - {multi})
    assert summary.processed == summary.files - summary.resumed >= 1


def test_resume_refuses_another_scans_journal(lfw_folder, embedder, pooled, tmp_path):
    out = tmp_path / "r.csv"
    header = {"journal": "faceverify-scan-journal", "version": 1, "folders": ["/somewhere/else"],
              "model": embedder.fingerprint, "columns": list(COLUMNS)}
    journal_path(out).write_text(json.dumps(header) + "\n")
    with pytest.raises(ScanError, match="same folders"):
        run_scan([lfw_folder], embedder=embedder, matcher=make_matcher(pooled), out=out, resume=True, progress=False)
    header.update(folders=[str(lfw_folder)], model="0" * 16)
    journal_path(out).write_text(json.dumps(header) + "\n")
    with pytest.raises(ScanError, match="same model"):
        run_scan([lfw_folder], embedder=embedder, matcher=make_matcher(pooled), out=out, resume=True, progress=False)
    # Damage in the middle (not a torn tail) is not guessed around.
    header.update(model=embedder.fingerprint)
    journal_path(out).write_text(json.dumps(header) + "\n{broken\n" + json.dumps({"path": "x", "face": -1}) + "\n")
    with pytest.raises(ScanError, match="line 2 is corrupt"):
        run_scan([lfw_folder], embedder=embedder, matcher=make_matcher(pooled), out=out, resume=True, progress=False)


# ------------------------------------------------------------------------------------------
# Formats, refusal
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, person_photos) -> Path:
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    Image.new("RGB", (120, 90), (40, 90, 160)).save(root / "blue.png")
    (root / "broken.jpg").write_bytes(person_photos[5].read_bytes()[:3000])
    (root / "notes.txt").write_text("hello\n")
    return root


def test_formats_hold_the_same_rows(small_folder, embedder, tmp_path):
    """The same scan as .csv, .json (array), .jsonl and .parquet: pandas reads the same rows back."""
    import pandas as pd

    readers = {"csv": pd.read_csv, "json": pd.read_json, "jsonl": lambda p: pd.read_json(p, lines=True),
               "parquet": pd.read_parquet}
    tables = {}
    for ext, read in readers.items():
        out = tmp_path / f"report.{ext}"
        run_scan([small_folder], embedder=embedder, matcher=half_match, detector=FakeDetector(embedder.geometry),
                 out=out, workers=0, progress=False)
        df = read(out)
        assert list(df.columns) == list(COLUMNS), ext
        check_accounting(df, small_folder)
        tables[ext] = df
    assert isinstance(json.loads((tmp_path / "report.json").read_text()), list)  # .json is plain JSON

    def norm(df) -> list[tuple]:
        return [(r.path, int(r.face), r.status, r.identity if isinstance(r.identity, str) else None,
                 None if pd.isna(r.match) else bool(r.match), round(float(r.distance), 5) if pd.notna(r.distance)
                 else None, r.error if isinstance(r.error, str) else None) for r in df.itertuples()]

    ref = norm(tables["csv"])
    assert {r[2] for r in ref} == {"face", "no-face", "error", "skipped"}
    assert {r[3] for r in ref} == {"Ann", None}
    for ext, df in tables.items():
        assert norm(df) == ref, ext


def test_refuses_to_overwrite_and_rejects_bad_arguments(small_folder, embedder, pooled, tmp_path):
    kw = dict(embedder=embedder, matcher=make_matcher(pooled), workers=0, progress=False)
    out = tmp_path / "report.csv"
    out.write_text("precious\n")
    with pytest.raises(ScanError, match=r"already exists.*--resume.*another --out"):
        run_scan([small_folder], out=out, **kw)
    with pytest.raises(ScanError, match="already complete"):
        run_scan([small_folder], out=out, resume=True, **kw)
    assert out.read_text() == "precious\n"
    other = tmp_path / "other.csv"
    journal_path(other).write_text("{}\n")
    with pytest.raises(ScanError, match="interrupted scan"):
        run_scan([small_folder], out=other, **kw)
    with pytest.raises(ScanError, match="no such folder"):
        run_scan([tmp_path / "missing"], out=tmp_path / "x.csv", **kw)
    with pytest.raises(ScanError, match="unsupported report format '.xlsx'"):
        run_scan([small_folder], out=tmp_path / "x.xlsx", **kw)


# ------------------------------------------------------------------------------------------
# Failures inside the pipeline cost one file
# ------------------------------------------------------------------------------------------


class FakeDetector:
    """Two faces per image, none in a flat image; a whole batch fails when it holds a black image."""

    config = DetectorConfig(device="cpu")

    def __init__(self, geometry: CropGeometry) -> None:
        self.calls = 0
        self.marks = geometry.reference_landmarks()

    def detect(self, images):
        self.calls += 1
        if any(img.max() == 0 for img in images):
            raise RuntimeError("detector exploded")
        return [[] if (img == img[0, 0]).all() else
                [Face((0.0, 0.0, 20.0, 20.0), 0.99, self.marks), Face((1.0, 1.0, 19.0, 19.0), 0.98, self.marks)]
                for img in images]


def half_match(queries: np.ndarray) -> list[Match]:
    """Face 0 of each photo passes for Ann, face 1 does not."""
    return [Match("Ann", 0.1 + 0.5 * (k % 2), 0.3, k % 2 == 0, 1e-4 if k % 2 == 0 else 0.2)
            for k in range(len(queries))]


def test_failed_batch_falls_back_per_image_and_one_match_per_identity(embedder, tmp_path):
    import pandas as pd

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    Image.new("RGB", (64, 64)).save(folder / "black.png")

    def everyone_matches(queries: np.ndarray) -> list[Match]:
        # Face 1 of each photo is the closer one (distance grows with the face's position).
        return [Match("Ann", 0.1 + 0.01 * ((k + 1) % 2), 0.5, True, 1e-4) for k in range(len(queries))]

    det = FakeDetector(embedder.geometry)
    out = tmp_path / "r.csv"
    summary = run_scan([folder], embedder=embedder, matcher=everyone_matches, detector=det, out=out, workers=0,
                       batch_size=8, progress=True)  # the bar goes to stderr
    df = pd.read_csv(out)
    check_accounting(df, folder)
    black = df[df["path"].str.endswith("black.png")]
    assert black["status"].tolist() == ["error"] and "detector exploded" in black["error"].iloc[0]
    faces = df[df["status"] == "face"]
    assert len(faces) == 6 and det.calls == 1 + 4  # one failed batch, then one call per image
    assert faces.groupby("path")["match"].sum().tolist() == [1, 1, 1]
    assert (faces.loc[faces["match"] == True, "face"] == 1).all()  # noqa: E712
    assert summary.matches == 3 and summary.errors == 1


def _crash_on_marker(fs_paths: list[str], *args):
    if any("crash" in os.path.basename(p) for p in fs_paths):
        os._exit(3)  # a decoder segfault, as far as the pool can tell
    return decode_files(fs_paths, *args)


def test_worker_crash_before_the_next_submission_costs_only_that_file(tmp_path):
    """The pool breaks while chunks are still being handed out (submit itself raises)."""
    names = ["crash.png", "a.png", "b.png", "c.png"]
    for n in names:
        Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / n)

    def slow_paths():
        yield str(tmp_path / names[0])
        time.sleep(3)  # the first chunk's worker has crashed by the time the next path is asked for
        yield from (str(tmp_path / n) for n in names[1:])

    timers = {"decode": 0.0, "decode_wait": 0.0}
    got = list(WorkerPool(1, 4, (10**7, 1600), timers, task=_crash_on_marker, chunk=1).stream(slow_paths()))
    assert [os.path.basename(p) for p, _ in got] == names
    assert got[0][1].error == CRASH_ERROR and all(d.image is not None for _, d in got[1:])


def test_worker_crash_costs_only_the_crashing_file(tmp_path):
    names = ["a.png", "b.png", "crash.png", "c.png", "d.png", "e.png"]
    for n in names:
        Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / n)
    timers = {"decode": 0.0, "decode_wait": 0.0}
    # chunks of at most 2 (a+b, crash+c, d, e): the crashing file's chunk partner (c.png) is retried alone
    got = list(WorkerPool(1, 4, (10**7, 1600), timers, task=_crash_on_marker, chunk=2)
               .stream([str(tmp_path / n) for n in names]))
    assert [os.path.basename(p) for p, _ in got] == names  # every file once, in order
    for p, d in got:
        if os.path.basename(p) == "crash.png":
            assert d.image is None and d.status == "error" and d.error == CRASH_ERROR
        else:
            assert d.image is not None and d.image.shape == (32, 32, 3), (p, d.error)


@pytest.mark.parametrize("n_files, workers", [(40, 2), (41, 2), (1000, 2), (7, 3), (1, 4)])
def test_chunks_of_a_list_shrink_so_workers_finish_together(n_files, workers):
    """Workers that take the next chunk when free (equal cost per file) end within one file of each other."""
    paths = [f"p{i}.jpg" for i in range(n_files)]
    chunks = list(_chunks(paths, FACE_CHUNK, workers))
    assert [p for c in chunks for p in c] == paths  # every path once, in order
    assert all(1 <= len(c) <= FACE_CHUNK for c in chunks)
    busy_until = [0] * workers
    for c in chunks:  # each chunk goes to the worker that is free first
        w = busy_until.index(min(busy_until))
        busy_until[w] += len(c)
    assert max(busy_until) - min(busy_until) <= 1, busy_until
    # an iterator (length unknown) keeps fixed chunks: 40 files in 5 chunks of 8 load 2 workers 24 / 16
    fixed = [len(c) for c in _chunks(iter(paths), FACE_CHUNK, workers)]
    assert fixed[: n_files // FACE_CHUNK] == [FACE_CHUNK] * (n_files // FACE_CHUNK)
