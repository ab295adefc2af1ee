"""Decisions about faces (confirm / reject / ignore / undo): stored in the library index, applied last
by every matcher path. Storage on synthetic records (no model); the commands on real LFW photos with
the shipped model."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from index.library import FaceRecord, FileRecord, Library, LibraryError
from verify.cli import app
from verify.identity.decisions import FaceVerdict, Verdicts, apply_decisions
from verify.identity.scoring import Match

from test_library_cli import copy_photos, person

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _record(path: str, sha: str, n_faces: int) -> FileRecord:
    faces = [FaceRecord((10.0 * k, 0.0, 10.0 * k + 8, 8.0), 0.99, np.zeros((5, 2), np.float32)) for k in range(n_faces)]
    emb = np.eye(4, dtype=np.float32)[:n_faces] if n_faces else None
    return FileRecord(path, path, 100, 1, 1, 1, "face" if n_faces else "no-face", sha256=sha, detector="d",
                      faces=faces, embeddings=emb)


def test_decisions_are_kept_by_content_and_survive_a_move(tmp_path):
    lib = Library.open(tmp_path / "lib.db")
    lib.ensure_model("m", 4)
    lib.record([_record("/p/a.jpg", "aa", 2), _record("/p/b.jpg", "bb", 1)], "m")
    ids = lib.add_decisions([("reject", "aa", 1, "ann", "/p/a.jpg"), ("confirm", "bb", 0, "bob", "/p/b.jpg")], "test")
    assert [d.kind for d in lib.decisions(standing_only=True)] == ["reject", "confirm"]
    # the photo moves (same content under a new path): the decision follows it
    lib.copy_file(lib.files(["/p/a.jpg"])["/p/a.jpg"].id, FileRecord("/q/a.jpg", "/q/a.jpg", 100, 2, 2, 2, "error"))
    lib.mark_gone(["/p"], {"/p/b.jpg"})
    decided = lib.decided_faces()
    assert [f.path for f in decided[ids[0]]] == ["/q/a.jpg"] and [f.face for f in decided[ids[1]]] == [0]
    undo_id = lib.undo_decision(ids[0], "test")
    assert [d.id for d in lib.decisions(standing_only=True)] == [ids[1]]
    assert next(d for d in lib.decisions() if d.id == ids[0]).undone_by == undo_id
    with pytest.raises(LibraryError, match="undone already"):
        lib.undo_decision(ids[0], "test")
    with pytest.raises(LibraryError, match="is an undo"):
        lib.undo_decision(undo_id, "test")
    with pytest.raises(LibraryError, match="no decision 99"):
        lib.undo_decision(99, "test")
    with pytest.raises(ValueError, match="needs a name"):
        lib.add_decisions([("confirm", "aa", 0, None, None)], "test")
    assert len(lib.decisions()) == 3  # the failed ones wrote nothing
    lib.close()


def test_a_decision_follows_its_face_when_the_faces_are_numbered_again(tmp_path):
    lib = Library.open(tmp_path / "lib.db")
    lib.ensure_model("m", 4)
    lib.record([_record("/p/a.jpg", "aa", 2)], "m")
    _, recs, _ = lib.faces([lib.files(["/p/a.jpg"])["/p/a.jpg"].id])[1]
    (d,) = lib.add_decisions([("reject", "aa", 1, "ann", "/p/a.jpg", recs[1].box)], "test")
    # analysed again (other detector settings): the same two faces, numbered the other way round
    again = _record("/p/a.jpg", "aa", 2)
    again.faces.reverse()
    lib.record([again], "m")
    assert [f.face for f in lib.decided_faces()[d]] == [0]
    verdicts = Verdicts.load(lib)
    assert verdicts.of("aa", 0).rejected == {"ann": d} and verdicts.of("aa", 1) is None
    # analysed again with that face no longer found: the decision is about a face that is gone
    lib.record([_record("/p/a.jpg", "aa", 1)], "m")
    assert d not in lib.decided_faces() and len(Verdicts.load(lib)) == 0
    from verify.identity.decisions import face_gone

    assert face_gone(lib) == {d}
    lib.close()


def test_an_index_of_schema_1_gets_the_decisions_table_from_a_writer(tmp_path):
    db = tmp_path / "lib.db"
    Library.open(db).close()
    with sqlite3.connect(db) as c:  # make it a schema-1 index as an older faceverify left it
        c.execute("DROP TABLE decisions")
        c.execute("DROP INDEX files_sha256")
        for column in ("quality", "blur", "outside"):  # schema 3's
            c.execute(f"ALTER TABLE faces DROP COLUMN {column}")
        c.execute("PRAGMA user_version = 1")
    ro = Library.open(db, readonly=True)
    assert ro.decisions() == [] and ro.decided_faces() == {}  # a reader sees it as it is
    ro.close()
    lib = Library.open(db)
    assert lib.add_decisions([("ignore", "aa", 0, None, None)], "test") == [1]
    lib.close()


def test_apply_decisions_overrules_only_what_was_decided():
    ann = Match("ann", 0.3, 0.4, True, 1e-3)
    near = Match("bob", 0.45, 0.4, False, 1e-2)
    v_reject = FaceVerdict(rejected={"ann": 7})
    v_confirm = FaceVerdict(confirmed="bob", confirmed_by=8)
    out, notes = apply_decisions([ann, near, ann, ann], [v_reject, v_confirm, None, FaceVerdict(ignored_by=9)])
    assert (out[0].match, out[0].identity, notes[0]) == (False, None, "rejected as ann (decision 7)")
    assert (out[1].match, out[1].identity, out[1].distance) == (True, "bob", 0.45) and "confirmed as bob" in notes[1]
    assert out[2] is ann and notes[2] is None
    assert out[3].identity is None and not out[3].match and math.isinf(out[3].distance) and "ignored" in notes[3]
    # known impostors: a face matched to ann that looks more like the faces rejected as ann than like
    # her is not matched (it stays her near miss); from 3 rejected faces on, never from fewer
    rng = np.random.default_rng(0)
    impostor = rng.standard_normal(8)
    faces = np.stack([impostor + 0.1 * rng.standard_normal(8) for _ in range(4)]).astype(np.float32)  # (4, D)
    faces /= np.linalg.norm(faces, axis=1, keepdims=True)
    query = np.stack([faces[3], -faces[3]])  # (2, D): like the impostors; unlike them
    out, notes = apply_decisions([ann, ann], [None, None], vectors=query, impostors={"ann": faces[:3]})
    assert (out[0].identity, out[0].match, out[0].distance) == ("ann", False, 0.3) and "rejected as ann" in notes[0]
    assert out[1] is ann and notes[1] is None
    assert apply_decisions([ann], [None], vectors=query[:1], impostors={"ann": faces[:2]})[0] == [ann]
    # a reject of someone else leaves the match alone; a later confirm overrides an earlier reject
    assert apply_decisions([ann], [FaceVerdict(rejected={"bob": 1})])[0] == [ann]
    v = FaceVerdict()
    from index.library import Decision

    v.add(Decision(1, "t", "o", "reject", "s", 0, "ann", None, None))
    v.add(Decision(2, "t", "o", "confirm", "s", 0, "ann", None, None))
    assert v.confirmed == "ann" and v.rejected == {}


@pytest.fixture(scope="module")
def indexed(lfw_root, tmp_path_factory):
    """jlo enrolled from 3 photos (shipped model); 3 more of hers and 4 of others scanned into an index."""
    tmp = tmp_path_factory.mktemp("decisions")
    g, db = tmp / "gallery", tmp / "lib.db"
    jlo = person(lfw_root, "Jennifer_Lopez")
    assert invoke("enroll", "jlo", *jlo[:3], "--gallery", g, "--device", "cpu", "--augment", 1).exit_code == 0
    photos = tmp / "photos"
    copy_photos(photos / "me", jlo[3:6])
    copy_photos(photos / "others", [person(lfw_root, n)[0] for n in ("Hans_Blix", "Paul_Wolfowitz", "Ricardo_Lagos",
                                                                     "Donald_Rumsfeld")])
    r = invoke("scan", photos, "--gallery", g, "--device", "cpu", "--workers", 0, "--index", db, "--out", tmp / "r.csv")
    assert r.exit_code == 0, r.output
    return tmp, g, db, photos


def _find(tmp: Path, g: Path, db: Path, out: str, *names: str) -> pd.DataFrame:
    r = invoke("find", *names, "--gallery", g, "--index", db, "--out", tmp / out)
    assert r.exit_code in (0, 1), r.output
    return pd.read_csv(tmp / out)


def test_reject_confirm_undo_through_the_commands(indexed, tmp_path):
    tmp, g, db, photos = indexed
    before = _find(tmp, g, db, "all0.csv")
    theirs = before[(before["match"] == True) & (before["identity"] == "jlo")]  # noqa: E712
    assert len(theirs) >= 2, before
    victim = theirs.iloc[0]

    # reject: that face is gone from find jlo, and nothing else changed
    r = invoke("reject", victim["path"], "--face", int(victim["face"]), "--as", "jlo", "--index", db)
    assert r.exit_code == 0 and r.output.startswith("decision 1:"), r.output
    after = _find(tmp, g, db, "all1.csv")
    changed = ~((before == after) | (before.isna() & after.isna())).all(axis=1)
    assert changed.sum() == 1 and after.loc[changed.idxmax(), "path"] == victim["path"]
    row = after.loc[changed.idxmax()]
    assert row["match"] == False and pd.isna(row["identity"]) and row["note"] == "rejected as jlo (decision 1)"  # noqa: E712
    only = _find(tmp, g, db, "jlo1.csv", "jlo")
    assert victim["path"] not in set(only["path"]) and len(only) == len(theirs) - 1
    # verify of that photo (in the index) gets the decision too
    r = invoke("verify", victim["path"], "--gallery", g, "--index", db, "--device", "cpu")
    assert "rejected as jlo (decision 1)" in r.output and "MATCH jlo" not in r.output.split(victim["path"])[1][:60]

    # confirm a face that did not match: find jlo reports it
    stranger = before[(before["status"] == "face") & (before["match"] != True)  # noqa: E712
                      & before["path"].str.contains("Hans_Blix")].iloc[0]
    r = invoke("confirm", stranger["path"], "--face", int(stranger["face"]), "--as", "jlo", "--index", db,
               "--gallery", g, "--device", "cpu", "--augment", 1)
    assert r.exit_code == 0 and "\ndecision 2: face" in "\n" + r.output, r.output
    only = _find(tmp, g, db, "jlo2.csv", "jlo")
    hit = only[only["path"] == stranger["path"]]
    assert len(hit) == 1 and hit.iloc[0]["note"] == "confirmed as jlo (decision 2)"

    # undo the reject: the face is hers again; undo the confirm: the stranger's photo leaves her gallery
    r = invoke("undo", 1, "--index", db)
    assert r.exit_code == 0 and "undone: decision 1 (reject jlo" in r.output
    assert victim["path"] in set(_find(tmp, g, db, "jlo3.csv", "jlo")["path"])
    r = invoke("undo", 2, "--index", db, "--gallery", g, "--device", "cpu")
    assert r.exit_code == 0, r.output
    from index import Gallery

    assert not (Gallery.open(g).vectors("jlo")[1]["source"].str.contains("Hans_Blix")).any()
    assert stranger["path"] not in set(_find(tmp, g, db, "jlo4.csv", "jlo")["path"])
    r = runner.invoke(app, ["undo", "2", "--index", str(db)])
    assert r.exit_code == 2 and "undone already" in r.output and len(r.output.strip().splitlines()) == 1

    # the log, as CSV; a decision about a face that is gone is one line
    r = invoke("ignore", photos / "others" / Path(stranger["path"]).name, "--face", 0, "--index", db)
    assert r.exit_code == 0
    invoke("decisions", "--index", db, "--out", tmp_path / "d.csv")
    log = pd.read_csv(tmp_path / "d.csv")
    assert list(log["kind"]) == ["reject", "confirm", "undo", "undo", "ignore"] and not log["face_gone"].any()
    (photos / "others" / Path(stranger["path"]).name).unlink()
    invoke("scan", photos, "--gallery", g, "--device", "cpu", "--workers", 0, "--index", db, "--out", tmp / "r2.csv")
    r = invoke("decisions", "--index", db)
    assert [line for line in r.output.splitlines() if "face gone" in line] == \
        [line for line in r.output.splitlines() if line.startswith("5\t")]

    # a renamed folder: the index follows the moved photos (no decode), and so does a decision
    r = invoke("reject", victim["path"], "--face", int(victim["face"]), "--as", "jlo", "--index", db)
    assert r.output.startswith("decision 6:"), r.output
    moved = tmp / "renamed"
    photos.rename(moved)
    try:
        r = invoke("scan", moved, "--gallery", g, "--device", "cpu", "--workers", 0, "--index", db,
                   "--out", tmp / "r3.csv")
        assert " 0 analysed" in r.output and "moved or copied" in r.output, r.output
        new_path = victim["path"].replace(str(photos), str(moved))
        rows = pd.read_csv(tmp / "r3.csv")
        row = rows[(rows["path"] == new_path) & (rows["face"] == victim["face"])].iloc[0]
        assert row["match"] == False and row["note"] == "rejected as jlo (decision 6)"  # noqa: E712
    finally:
        moved.rename(photos)


def test_decision_commands_name_bad_input_in_one_line(indexed, tmp_path):
    tmp, g, db, photos = indexed
    some = next((photos / "me").iterdir())
    for args, message in ((["reject", str(tmp_path / "nope.jpg"), "--as", "jlo"], "not in the library index"),
                          (["reject", str(some), "--face", "9", "--as", "jlo"], "has no face 9"),
                          (["reject", str(some), "--as", " "], "must not be empty"),
                          (["undo", "999"], "no decision 999")):
        r = runner.invoke(app, [*args, "--index", str(db)])
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)


def test_scan_with_nobody_enrolled_fills_the_index_and_people_groups(lfw_root, tmp_path):
    photos = tmp_path / "photos"
    copy_photos(photos, person(lfw_root, "Hans_Blix") + person(lfw_root, "Donald_Rumsfeld") + person(lfw_root, "Paul_Wolfowitz"))
    db, g = tmp_path / "lib.db", tmp_path / "no-gallery"
    r = invoke("scan", photos, "--gallery", g, "--device", "cpu", "--workers", 0, "--index", db,
               "--out", tmp_path / "r.csv")
    assert r.exit_code == 1 and "nobody enrolled yet" in r.output, r.output
    report = pd.read_csv(tmp_path / "r.csv")
    assert (report["status"] == "face").sum() >= 20 and not report["match"].fillna(False).astype(bool).any()
    r = invoke("people", "--gallery", g, "--index", db, "--min-faces", 3, "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    grouped = pd.read_csv(tmp_path / "p.csv")
    blix = grouped.loc[grouped["path"].str.contains("Hans_Blix"), "group"]
    blix = blix[blix >= 0]  # group -1: faces below the quality gate, listed apart
    assert len(blix) >= 5 and blix.nunique() == 1  # his photos form one group of their own
    assert (grouped.loc[grouped["group"] == blix.iloc[0], "path"].str.contains("Hans_Blix")).mean() >= 0.8
