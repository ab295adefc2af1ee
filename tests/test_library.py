"""The library index (index.library) and the scan that keeps what it found (verify.scan.indexed).

Real LFW faces with a small random model: what is under test is that the index holds exactly what a
scan found, survives kills, changes, moves and other models, and answers as a fresh scan would."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_model
from index.library import (
    APPLICATION_ID, SCHEMA_VERSION, FaceRecord, FileRecord, Library, LibraryBusy, LibraryError, walk_order_key,
)
from verify.faces import DetectorConfig
from verify.scan import run_scan, walk_files

REPO = Path(__file__).resolve().parents[1]
PERSON = "Jennifer_Lopez"
OTHERS = ("Hans_Blix", "Paul_Wolfowitz", "Ricardo_Lagos", "Colin_Powell")
THRESHOLD = 0.8
DETECTOR = DetectorConfig(device="cpu", min_face_size=60)


# ------------------------------------------------------------------------------------------
# index.library on its own (no model, no photos)
# ------------------------------------------------------------------------------------------


def _record(path: str, faces: int, rng: np.random.Generator, size: int = 100, status: str = "face") -> FileRecord:
    recs = [FaceRecord((1.0 * k, 2.0, 3.0, 4.0), 0.99, rng.normal(size=(5, 2)).astype(np.float32)) for k in range(faces)]
    emb = rng.normal(size=(faces, 8)).astype(np.float32) if faces else None
    return FileRecord(path, path, size, 1, 2, 3, status if faces or status != "face" else "no-face",
                      sha256=f"{hash(path) & 0xffff:064x}", detector="d", faces=recs, embeddings=emb)


def test_records_round_trip_replace_and_gone(tmp_path, rng):
    db = tmp_path / "lib.db"
    with Library.open(db) as lib:
        lib.ensure_model("m1", 8)
        a, b, c = _record("/p/a.jpg", 2, rng), _record("/p/sub/b.jpg", 0, rng), _record("/p/c.txt", 0, rng,
                                                                                          status="skipped")
        lib.record([a, b, c], "m1")
        got = lib.files()
        assert set(got) == {"/p/a.jpg", "/p/sub/b.jpg", "/p/c.txt"}
        assert (got["/p/a.jpg"].status, got["/p/a.jpg"].faces) == ("face", 2)
        assert (got["/p/sub/b.jpg"].status, got["/p/sub/b.jpg"].faces) == ("no-face", 0)
        ids, recs, emb = lib.faces([got["/p/a.jpg"].id], "m1")[got["/p/a.jpg"].id]
        np.testing.assert_array_equal(emb, a.embeddings)
        np.testing.assert_array_equal(recs[1].landmarks, a.faces[1].landmarks)
        assert recs[1].box == a.faces[1].box
        # Replacing a file's analysis drops its old faces and their embeddings of every model.
        lib.ensure_model("m2", 8)
        lib.add_embeddings("m2", ids, rng.normal(size=(2, 8)))
        a2 = _record("/p/a.jpg", 1, rng)
        lib.record([a2], "m1")
        face_ids, vecs = lib.embeddings("m1")
        assert len(face_ids) == 1 and np.array_equal(vecs[0], a2.embeddings[0])
        assert len(lib.embeddings("m2")[0]) == 0
        # A walk of /p that no longer sees sub/b.jpg marks it gone; files outside /p are untouched.
        lib.record([_record("/q/d.jpg", 1, rng)], "m1")
        assert lib.mark_gone(["/p"], {"/p/a.jpg", "/p/c.txt"}) == 1
        present = lib.files(present_only=True)
        assert set(present) == {"/p/a.jpg", "/p/c.txt", "/q/d.jpg"}
        assert lib.stats()["gone"] == 1


def test_walk_order_key_sorts_as_the_walk_does(tmp_path):
    for rel in ("b.jpg", "a/z.jpg", "a/b/c.jpg", "a/a.jpg", "z.jpg", "a/b/a.jpg", "aa.jpg", "a b/x.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    walked = [e.path for e in walk_files([tmp_path])]
    assert sorted(walked, key=walk_order_key) == walked


def test_foreign_newer_and_broken_databases_are_refused_untouched(tmp_path):
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    newer = tmp_path / "newer.db"
    Library.open(newer).close()
    con = sqlite3.connect(newer)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    text = tmp_path / "notes.db"
    text.write_text("not a database at all, just text\n" * 10)
    for path, why in ((foreign, "another application"), (newer, "newer than this faceverify"),
                      (text, "not an SQLite database|cannot open")):
        before = path.read_bytes()
        for readonly in (False, True):
            with pytest.raises(LibraryError, match=why) as e:
                Library.open(path, readonly=readonly)
            assert str(path) in str(e.value) and "\n" not in str(e.value)
        assert path.read_bytes() == before
    con = sqlite3.connect(newer)
    assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    con.close()
    with pytest.raises(LibraryError, match="no library index here yet"):
        Library.open(tmp_path / "absent.db", readonly=True)


def test_one_writer_at_a_time(tmp_path):
    db = tmp_path / "lib.db"
    first, second = Library.open(db), Library.open(db)
    try:
        first.acquire()
        with pytest.raises(LibraryBusy, match="another scan is writing"):
            second.acquire(timeout=0.2)
        first.release()
        second.acquire()  # free again
    finally:
        first.close()
        second.close()


@pytest.fixture
def readonly_mount(tmp_path):
    """A tmpfs mounted read-only (a read-only disk); skips where mounting is not allowed."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): no read-only disk to test with")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_index_on_a_read_only_disk_refuses_writes_and_still_reads(readonly_mount, rng):
    db = readonly_mount / "lib.db"
    with Library.open(db) as lib:
        lib.ensure_model("m1", 8)
        lib.record([_record("/p/a.jpg", 1, rng)], "m1")
    assert subprocess.run(["mount", "-o", "remount,ro", str(readonly_mount)], capture_output=True).returncode == 0
    with pytest.raises(LibraryError, match="cannot be written|read-only") as e:
        lib = Library.open(db)
        lib.acquire()
        lib.record([_record("/p/b.jpg", 1, rng)], "m1")
    assert "\n" not in str(e.value)
    with Library.open(db, readonly=True) as lib:  # readers still work
        assert set(lib.files()) == {"/p/a.jpg"}
        assert len(lib.embeddings("m1")[0]) == 1


# ------------------------------------------------------------------------------------------
# Scans into the index, with real faces
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "model.pt", threshold=THRESHOLD, calibration={})


@pytest.fixture(scope="module")
def other_model_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model2") / "other.pt", seed=1, threshold=THRESHOLD,
                           calibration={})


@pytest.fixture(scope="module")
def embedder(model_path):
    from verify.model.file import Embedder

    return Embedder.load(model_path)


@pytest.fixture(scope="module")
def detector():
    from verify.faces import FaceDetector

    return FaceDetector(DETECTOR)


@pytest.fixture(scope="module")
def lfw_photos(lfw_root) -> dict[str, list[Path]]:
    lfw = lfw_root / "lfw-deepfunneled"
    return {n: sorted((lfw / n).glob("*.jpg")) for n in (PERSON, *OTHERS)}


def make_matcher(embedder, detector, photos: list[Path]):
    from verify.faces import FacePipeline
    from verify.identity.scoring import IdentityMatcher, pool_photos

    results = FacePipeline(detector, embedder=embedder).process(photos)
    _, pooled = pool_photos(np.stack([r.embeddings[0] for r in results]), np.arange(len(results)))
    return IdentityMatcher({PERSON: pooled}, {}, default_similarity_threshold=THRESHOLD)


@pytest.fixture(scope="module")
def matcher(embedder, detector, lfw_photos):
    return make_matcher(embedder, detector, lfw_photos[PERSON][:3])


def fill_folder(root: Path, lfw_photos: dict[str, list[Path]]) -> Path:
    """Photos of the person and others in subfolders, a no-face image, a text file, a broken JPEG."""
    from PIL import Image

    (root / "me").mkdir(parents=True)
    (root / "others" / "deep").mkdir(parents=True)
    for p in lfw_photos[PERSON][3:6]:
        shutil.copy(p, root / "me" / p.name)
    for i, name in enumerate(OTHERS):
        shutil.copy(lfw_photos[name][0], root / "others" / ("deep" if i % 2 else "") / lfw_photos[name][0].name)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(root / "noise.png")
    (root / "notes.txt").write_text("not a photo\n")
    (root / "broken.jpg").write_bytes(lfw_photos[PERSON][0].read_bytes()[:900])
    return root


def index_state(db: Path, model: str | None = None) -> dict:
    """What the index holds for present files: per path, the file's analysis and its faces."""
    with Library.open(db, readonly=True) as lib:
        files = lib.files(present_only=True)
        faces = lib.faces([s.id for s in files.values()], model)
        state = {}
        for path, s in files.items():
            _, recs, emb = faces.get(s.id, ([], [], None))
            state[path] = (s.status, s.error, s.faces, s.sha256,
                           [(r.box, r.prob, r.landmarks.tolist()) for r in recs],
                           None if emb is None else emb)
        return state


def assert_same_state(a: dict, b: dict, atol: float = 0.0, embedding_atol: float = 1e-5) -> None:
    """Same files and detections (exactly, or boxes within `atol` px); embeddings within `embedding_atol`:
    a face embedded in a batch of other faces rounds differently in the last float bits."""
    assert a.keys() == b.keys()
    for path in a:
        (*fa, ea), (*fb, eb) = a[path], b[path]
        if atol == 0.0:
            assert fa == fb, path
        else:
            assert fa[:4] == fb[:4], path
            for (box_a, p_a, lm_a), (box_b, p_b, lm_b) in zip(fa[4], fb[4]):
                np.testing.assert_allclose(box_a, box_b, atol=1e-2)
                np.testing.assert_allclose(lm_a, lm_b, atol=1e-2)
        assert (ea is None) == (eb is None), path
        if ea is not None:
            np.testing.assert_allclose(ea, eb, atol=embedding_atol, rtol=0)


def indexed_scan(folder: Path, db: Path, embedder, matcher, detector, out: Path, **kw):
    from verify.scan.indexed import run_indexed_scan

    with Library.open(db) as lib:
        return run_indexed_scan([folder], library=lib, embedder=embedder, matcher=matcher, detector=detector,
                                out=out, workers=kw.pop("workers", 0), batch_size=kw.pop("batch_size", 4),
                                progress=False, **kw)


def test_second_scan_reads_nothing_and_reports_the_same(tmp_path, lfw_photos, embedder, matcher, detector):
    folder = fill_folder(tmp_path / "photos", lfw_photos)
    db = tmp_path / "lib.db"
    first = indexed_scan(folder, db, embedder, matcher, detector, tmp_path / "r1.csv")
    assert first.index["analysed"] == first.index["walked"] == 10  # every regular file is read once
    state = index_state(db, embedder.fingerprint)
    second = indexed_scan(folder, db, embedder, matcher, detector, tmp_path / "r2.csv")
    assert second.index["analysed"] == 0 and second.images_processed == 0
    assert second.index["reused"] == second.index["walked"] == 10
    assert (tmp_path / "r1.csv").read_bytes() == (tmp_path / "r2.csv").read_bytes()
    assert_same_state(state, index_state(db, embedder.fingerprint))


def test_find_and_indexed_scan_report_what_a_one_shot_scan_reports(tmp_path, lfw_photos, embedder, matcher,
                                                                    detector):
    from verify.scan.indexed import find_rows
    from verify.scan.report import write_report

    folder = fill_folder(tmp_path / "photos", lfw_photos)
    run_scan([folder], embedder=embedder, matcher=matcher, detector=detector, out=tmp_path / "oneshot.csv",
             workers=0, batch_size=4, progress=False)
    db = tmp_path / "lib.db"
    indexed_scan(folder, db, embedder, matcher, detector, tmp_path / "indexed.csv")
    with Library.open(db, readonly=True) as lib:
        write_report(find_rows(lib, embedder.fingerprint, matcher), tmp_path / "find.csv")
    oneshot = (tmp_path / "oneshot.csv").read_bytes()
    assert oneshot.count(b"\n") > 10 and b",True," in oneshot  # faces, a match, errors: a real report
    assert (tmp_path / "indexed.csv").read_bytes() == oneshot
    assert (tmp_path / "find.csv").read_bytes() == oneshot


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_find_name_searches_the_library_faces_and_reports_what_the_full_report_holds(
        tmp_path, lfw_photos, embedder, matcher, detector, kind, monkeypatch):
    from index import facesearch
    from verify.queries import find as library_mod
    from verify.scan.indexed import find_rows

    folder = fill_folder(tmp_path / "photos", lfw_photos)
    db = tmp_path / "lib.db"
    indexed_scan(folder, db, embedder, matcher, detector, tmp_path / "indexed.csv")
    monkeypatch.setattr(facesearch, "IVF_MIN_FACES", 0 if kind == "ivf" else 10**9)
    with Library.open(db) as lib:
        n_faces = lib.stats()["faces"]
        # The tiny random model accepts every face at THRESHOLD: put the threshold at the median score
        # of the library's faces, so that some match and some do not.
        from verify.identity.scoring import IdentityMatcher, identity_scores

        _, vectors = lib.embeddings(embedder.fingerprint)
        median = float(np.median(identity_scores(vectors, matcher.pooled[PERSON], matcher.top_k)))
        matcher = IdentityMatcher(matcher.pooled, {}, default_similarity_threshold=median)
        candidates = library_mod.candidate_faces(lib, embedder.fingerprint, matcher, [PERSON])
        full = [r for r in find_rows(lib, embedder.fingerprint, matcher) if r["match"] and r["identity"] == PERSON]
        pruned = [r for r in find_rows(lib, embedder.fingerprint, matcher, only_faces=candidates)
                  if r["match"] and r["identity"] == PERSON]
        cache = library_mod.search_cache_path(lib, embedder.fingerprint)
        assert cache.is_file() == (kind == "ivf")  # IVF is kept on disk, flat is rebuilt
        generation = lib.generation()
    assert full and pruned == full
    assert 0 < len(candidates) < n_faces  # the search pruned: strangers were never scored
    if kind == "ivf":
        # a changed library makes the kept index stale: the next search rebuilds it under a new key
        (folder / "others" / lfw_photos[OTHERS[0]][0].name).unlink()
        indexed_scan(folder, db, embedder, matcher, detector, tmp_path / "again.csv")
        with Library.open(db) as lib:
            assert lib.generation() > generation
            library_mod.candidate_faces(lib, embedder.fingerprint, matcher, [PERSON])
            assert facesearch.FaceSearch.read_key(cache) == f"{embedder.fingerprint}:{lib.generation()}"


def test_added_changed_deleted_moved_files_between_scans(tmp_path, lfw_photos, embedder, matcher, detector):
    folder = fill_folder(tmp_path / "photos", lfw_photos)
    db = tmp_path / "lib.db"
    indexed_scan(folder, db, embedder, matcher, detector, tmp_path / "r1.csv")
    me = sorted((folder / "me").iterdir())
    # added; replaced under the same name by another photo; deleted; touched (same content); folder renamed
    shutil.copy(lfw_photos[PERSON][6], folder / "me" / "new.jpg")
    shutil.copy(lfw_photos[OTHERS[0]][1], me[0])
    me[1].unlink()
    os.utime(me[2], (1e9, 1e9))
    os.rename(folder / "others", folder / "strangers")
    n_moved = sum(1 for _ in (folder / "strangers").rglob("*.jpg"))
    summary = indexed_scan(folder, db, embedder, matcher, detector, tmp_path / "r2.csv")
    c = summary.index
    assert c["analysed"] == 2, c  # new.jpg and the replaced photo: nothing else is decoded
    assert summary.images_processed == 2
    assert c["moved"] == n_moved, c
    assert c["gone"] == 1 + n_moved, c  # the deleted photo and the old folder's paths
    # The index now holds what a fresh index of the changed folder holds, and the report is a fresh scan's.
    fresh = tmp_path / "fresh.db"
    indexed_scan(folder, fresh, embedder, matcher, detector, tmp_path / "fresh.csv")
    assert_same_state(index_state(db, embedder.fingerprint), index_state(fresh, embedder.fingerprint))
    run_scan([folder], embedder=embedder, matcher=matcher, detector=detector, out=tmp_path / "oneshot.csv",
             workers=0, progress=False)
    assert (tmp_path / "r2.csv").read_bytes() == (tmp_path / "oneshot.csv").read_bytes()
    with Library.open(db, readonly=True) as lib:
        replaced = lib.files([str(me[0])])[str(me[0])]
        assert replaced.sha256 is not None and replaced.present
        assert str(me[1]) not in lib.files(present_only=True)


def test_another_model_re_embeds_stored_faces_without_detecting(tmp_path, lfw_photos, embedder, matcher, detector,
                                                               other_model_path):
    from verify.model.file import Embedder

    folder = fill_folder(tmp_path / "photos", lfw_photos)
    db = tmp_path / "lib.db"
    indexed_scan(folder, db, embedder, matcher, detector, tmp_path / "r1.csv")
    before = index_state(db, embedder.fingerprint)
    other = Embedder.load(other_model_path)
    other_matcher = make_matcher(other, detector, lfw_photos[PERSON][:3])

    class NoDetection:  # re-embedding must never detect
        config = DETECTOR

        def detect(self, images):
            raise AssertionError("re-embedding ran the detector")

    summary = indexed_scan(folder, db, other, other_matcher, NoDetection(), tmp_path / "r2.csv")
    with_faces = sum(1 for s in before.values() if s[0] == "face")
    assert summary.index["reembedded"] == with_faces and summary.index["analysed"] == 0
    # Each model keeps its own vectors; the new ones are what a fresh scan with that model computes.
    assert_same_state(before, index_state(db, embedder.fingerprint))
    fresh = tmp_path / "fresh.db"
    indexed_scan(folder, fresh, other, other_matcher, detector, tmp_path / "fresh.csv")
    assert_same_state(index_state(fresh, other.fingerprint), index_state(db, other.fingerprint), atol=1e-2)
    with Library.open(db, readonly=True) as lib:
        assert lib.models() == {embedder.fingerprint: len(lib.embeddings(embedder.fingerprint)[0]),
                                other.fingerprint: len(lib.embeddings(embedder.fingerprint)[0])}


def test_two_scans_at_once_one_refuses(tmp_path, lfw_photos, embedder, matcher, detector):
    from verify.scan.indexed import run_indexed_scan

    folder = fill_folder(tmp_path / "photos", lfw_photos)
    db = tmp_path / "lib.db"
    holder = Library.open(db)
    holder.acquire()
    try:
        with Library.open(db) as lib, pytest.raises(LibraryBusy, match="another scan"):
            run_indexed_scan([folder], library=lib, embedder=embedder, matcher=matcher, detector=detector,
                             out=tmp_path / "r.csv", workers=0, progress=False, wait=0.1)
        assert not (tmp_path / "r.csv").exists()
    finally:
        holder.close()
    with Library.open(db, readonly=True) as lib:
        assert lib.files() == {}  # the refused scan wrote nothing


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from index.library import Library
    from verify.faces import DetectorConfig
    from verify.model.file import Embedder
    from verify.scan.indexed import run_indexed_scan
    from verify.identity.scoring import IdentityMatcher

    folder, db, out, model, pooled = sys.argv[1:6]
    record = Library.record

    def slow_record(self, *a, **kw):  # >= 0.4 s per committed batch: time to kill the scan midway
        record(self, *a, **kw)
        time.sleep(0.4)

    Library.record = slow_record
    matcher = IdentityMatcher({"p": np.load(pooled)}, {}, default_similarity_threshold=0.8)
    if __name__ == "__main__":
        with Library.open(db) as lib:
            run_indexed_scan([folder], library=lib, embedder=Embedder.load(model), matcher=matcher, out=out,
                             workers=2, batch_size=1, progress=False,
                             detector_config=DetectorConfig(device="cpu", min_face_size=60))
""")


def test_kill_mid_scan_then_scan_again_gives_the_uninterrupted_index_and_readers_work_meanwhile(
        tmp_path, lfw_photos, embedder, matcher, detector, model_path):
    from verify.scan.indexed import find_rows

    folder = fill_folder(tmp_path / "photos", lfw_photos)
    pooled = tmp_path / "pooled.npy"
    np.save(pooled, matcher.pooled[PERSON])
    reference = tmp_path / "reference.db"
    indexed_scan(folder, reference, embedder, matcher, detector, tmp_path / "reference.csv")
    total = len(index_state(reference))

    db = tmp_path / "lib.db"
    script = tmp_path / "scan_script.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(folder), str(db), str(tmp_path / "killed.csv"),
                             str(model_path), str(pooled)], cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    seen_counts = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:  # a reader while the scan writes: consistent snapshots, every file complete
                    with Library.open(db, readonly=True) as lib:
                        rows = find_rows(lib, embedder.fingerprint, matcher) if lib.model_dim(
                            embedder.fingerprint) else []
                        n = len(lib.files())
                except LibraryError:
                    n, rows = 0, []  # the schema is not there yet
                for r in rows:
                    assert r["status"] != "error" or "not embedded" not in (r["error"] or ""), r
                seen_counts.append(n)
                if n >= 4:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"scan ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert seen_counts == sorted(seen_counts)  # readers only ever saw the index grow
    partial = index_state(db)
    assert 4 <= len(partial) < total  # killed midway
    assert not (tmp_path / "killed.csv").exists()

    summary = indexed_scan(folder, db, embedder, matcher, detector, tmp_path / "resumed.csv")
    assert summary.index["reused"] >= 4 and summary.index["analysed"] == total - summary.index["reused"] - \
        summary.index["moved"]
    # Same index as the uninterrupted scan: no file lost or twice (face ids aside), the same report.
    # (boxes to 1e-3 px: worker processes run the detector with other thread counts than the reference)
    assert_same_state(index_state(reference, embedder.fingerprint), index_state(db, embedder.fingerprint),
                      atol=1e-3)
    with Library.open(db, readonly=True) as lib:
        n_faces = lib.stats()["faces"]
    with Library.open(reference, readonly=True) as lib:
        assert n_faces == lib.stats()["faces"]
    import pandas as pd

    a, b = pd.read_csv(tmp_path / "reference.csv"), pd.read_csv(tmp_path / "resumed.csv")
    assert list(a["path"]) == list(b["path"]) and list(a["status"]) == list(b["status"])
    assert list(a["match"]) == list(b["match"])


def test_ivfpq_candidates_widened_to_the_cells_recall():
    """IVF-PQ compares *estimated* similarities with the bound: `find` widens its range search by the
    error measured when the index was built, so the faces at or above the bound are found as often as
    with exact vectors in the same cells (the matcher then decides on the stored float32 embeddings)."""
    from index.facesearch import FaceSearch
    from verify.queries.find import approximate_margin

    rng = np.random.default_rng(5)
    dim = 32
    centres = rng.standard_normal((500, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(500), 20)
    sigma = np.float32(np.sqrt((1 / 0.7 - 1) / dim))
    x = centres[labels] + sigma * rng.standard_normal((len(labels), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = centres[:40] + sigma * rng.standard_normal((40, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ids = np.arange(len(x), dtype=np.int64) * 7 + 3
    bound = 0.5
    exact = set(ids[np.flatnonzero(((q @ x.T) >= bound).any(0))].tolist())
    assert len(exact) > 500

    assert approximate_margin(FaceSearch.build(x, ids, "flat", key="k")) == 0.0
    pq = FaceSearch.build(x, ids, "ivfpq", pq_m=8, key="k")
    margin = approximate_margin(pq)
    assert 0.0 < margin < 0.5
    _, plain, _ = pq.range_search(q, bound)
    _, wide, _ = pq.range_search(q, bound - margin)
    recall_plain = len(exact & set(plain.tolist())) / len(exact)
    recall_wide = len(exact & set(wide.tolist())) / len(exact)
    assert recall_plain < 0.95  # estimated similarities alone miss faces near the bound (0.88 here)
    assert recall_wide >= 0.99  # what the probed cells hold (nprobe is calibrated to 0.99), as with IVF-Flat
