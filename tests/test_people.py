"""verify.queries.people on a synthetic library (no photo, no model): known people are recovered,
low-quality faces never form or join a group and are listed, the page shows groups, spread and the
excluded band; index.groups' second pass (merge_close_groups) and group_spread."""

from __future__ import annotations

import numpy as np
import pytest

from index.groups import bcubed, group_spread, merge_close_groups
from index.library import FaceRecord, FileRecord, Library
from index.quality import DEFAULT_MIN_QUALITY
from verify.queries.people import unknown_people, write_people_page

DIM = 64
FRONTAL = np.array([[135, 160], [165, 160], [150, 178], [138, 195], [162, 195]], np.float32)
BOX = (110.0, 130.0, 190.0, 220.0)


def person_vectors(n_people: int, per_person: int, spread: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, DIM) unit vectors scattered around n_people random centres, (N,) person."""
    centres = rng.normal(size=(n_people, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(n_people), per_person)
    x = centres[y] + spread * rng.normal(size=(len(y), DIM)) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def synthetic_library(db, n_people: int = 12, per_person: int = 6, n_junk: int = 8, seed: int = 0):
    """A library of `n_people` known people (good, frontal faces, one photo each) plus `n_junk` faces of
    as many different people that all look alike to the model (half faces cut off at the photo's
    border, small and unsure: the junk of issue 30). Returns (face ids in insertion order, truth:
    person id, or -1 - k for the k-th junk face)."""
    rng = np.random.default_rng(seed)
    x, y = person_vectors(n_people, per_person, 0.45, rng)
    junk_centre = rng.normal(size=DIM)
    junk = junk_centre / np.linalg.norm(junk_centre) + 0.2 * rng.normal(size=(n_junk, DIM)) / np.sqrt(DIM)
    junk = (junk / np.linalg.norm(junk, axis=1, keepdims=True)).astype(np.float32)
    records, vectors, truth = [], [], []
    for i, (v, p) in enumerate(zip(x, y)):
        face = FaceRecord(BOX, 0.999, FRONTAL, outside=0.0)
        records.append(FileRecord(f"/lib/p{p}_{i}.jpg", f"/lib/p{p}_{i}.jpg", 1, 1, 1, i, "face", faces=[face]))
        vectors.append(v)
        truth.append(int(p))
    for k, v in enumerate(junk):
        # a 36 px face at the left border, half of it outside, turned, found with 0.93
        lm = FRONTAL * 0.45 + np.array([-60, 0], np.float32)
        lm[2, 0] += 8
        face = FaceRecord((-18.0, 130.0, 18.0, 170.0), 0.93, lm, outside=0.5)
        records.append(FileRecord(f"/lib/junk_{k}.jpg", f"/lib/junk_{k}.jpg", 1, 1, 1, 1000 + k, "face", faces=[face]))
        vectors.append(v)
        truth.append(-1 - k)
    order = rng.permutation(len(records))  # people and junk interleaved in the index
    with Library.open(db) as lib:
        lib.ensure_model("m", DIM)
        for j in order:
            records[j].embeddings = vectors[j][None]
            lib.record([records[j]], "m")
        ids, _ = lib.embeddings("m")
    # face ids grow in insertion order
    truth_by_id = dict(zip(ids.tolist(), np.asarray(truth)[order].tolist()))
    return truth_by_id


def test_known_people_are_recovered_and_junk_never_groups(tmp_path) -> None:
    db = tmp_path / "lib.db"
    truth = synthetic_library(db)
    with Library.open(db) as lib:
        r = unknown_people(lib, None, "m", min_faces=3)
        saved = lib.groups("m")
    assert r.min_quality == DEFAULT_MIN_QUALITY > 0
    # every junk face is left out, listed with its path and quality, and in no group
    junk = {f for f, t in truth.items() if t < 0}
    listed = {e["path"] for e in r.excluded}
    assert listed == {f"/lib/junk_{k}.jpg" for k in range(len(junk))}
    assert all(e["quality"] < r.min_quality for e in r.excluded)
    grouped = {f for m in r.groups.values() for f in m}
    assert not grouped & junk and saved == r.groups
    # the known people come back (BCubed over every face, junk as singletons of their own)
    label = {f: g for g, m in r.groups.items() for f in m}
    ids = sorted(truth)
    p, rec, f = bcubed(np.array([truth[i] for i in ids]), np.array([label.get(i, -1) for i in ids]))
    assert f >= 0.95, (p, rec, f)
    assert len(r.groups) == 12 and r.faces_considered == len(truth)
    # page order: largest first; each group has its spread and quality
    sizes = [len(r.groups[g]) for g in sorted(r.groups)]
    assert sizes == sorted(sizes, reverse=True) and set(r.spread) == set(r.quality) == set(r.groups)

    # without the gate the junk (different people who look alike to the model) forms a group of its own
    with Library.open(db) as lib:
        open_gate = unknown_people(lib, None, "m", min_faces=3, min_quality=0.0)
    assert not open_gate.excluded
    mixed = [g for g, m in open_gate.groups.items() if set(m) & junk]
    assert mixed and max(open_gate.spread[g] for g in mixed) > 0  # it exists, so the gate is what keeps it out


def test_people_page_shows_spread_and_the_excluded_band(tmp_path, monkeypatch) -> None:
    db = tmp_path / "lib.db"
    synthetic_library(db, n_people=4, per_person=4, n_junk=3)
    import verify.scan.html as html

    monkeypatch.setattr(html, "_make_missing", lambda folder, shown: 0)  # no photos to cut thumbnails from
    with Library.open(db) as lib:
        r = unknown_people(lib, None, "m", min_faces=3)
        write_people_page(r, tmp_path / "people.html", lib)
    page = (tmp_path / "people.html").read_text()
    assert page.count('<section data-group="') == len(r.groups) + 1
    assert 'data-group="excluded"' in page and "left out for low quality: 3 faces" in page
    assert all(f"spread {r.spread[g]:.2f}" in page for g in r.groups)
    assert page.count("junk_") == 3 and page.index("junk_") > page.index('data-group="excluded"')


def test_merge_close_groups_joins_split_people_only() -> None:
    rng = np.random.default_rng(1)
    x, y = person_vectors(6, 8, 0.3, rng)
    # person 0 split in two groups, everyone else one group each
    labels = y.copy()
    half = np.flatnonzero(y == 0)[:4]
    labels[half] = 6
    labels[np.flatnonzero(y == 5)[0]] = -1  # an ungrouped face stays ungrouped
    merged = merge_close_groups(x, labels, 0.5)
    assert merged[np.flatnonzero(y == 5)[0]] == -1
    assert len(np.unique(merged[merged >= 0])) == 6
    assert len(set(merged[y == 0])) == 1 and bcubed(y, merged)[0] == 1.0
    # a distance that reaches between people merges them all; 0 merges nothing
    assert len(np.unique(merge_close_groups(x, labels, 2.0))) == 2  # one group and the -1
    assert len(np.unique(merge_close_groups(x, labels, 1e-6))) == 8


def test_group_spread_is_larger_for_a_mixed_group() -> None:
    rng = np.random.default_rng(2)
    x, y = person_vectors(2, 10, 0.4, rng)
    one = group_spread(x[y == 0])
    mixed = group_spread(np.concatenate([x[y == 0][:7], x[y == 1][:3]]))
    assert 0 < one < mixed
    assert group_spread(np.repeat(x[:1], 3, axis=0)) == pytest.approx(0.0, abs=1e-6)


def test_people_centres_on_the_library_mean(tmp_path) -> None:
    """A library whose people share one direction (poor faces of different people crowd around it):
    `people` (centred on the library's mean by default) recovers them better than without centring."""
    rng = np.random.default_rng(0)
    n_people, per_person = 150, 4
    people = rng.normal(size=(n_people, DIM))
    people /= np.linalg.norm(people, axis=1, keepdims=True)
    shared = rng.normal(size=DIM)
    y = np.repeat(np.arange(n_people), per_person)
    x = rng.uniform(0.2, 1.0, (len(y), 1)) * people[y] + 2.0 * shared / np.linalg.norm(shared)
    x += 0.1 * rng.normal(size=x.shape)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    recs = [FileRecord(f"/lib/{i}.jpg", f"/lib/{i}.jpg", 1, 1, 1, i, "face", faces=[FaceRecord(BOX, 0.999, FRONTAL, outside=0.0)],
                       embeddings=x[i:i + 1]) for i in range(len(y))]
    db = tmp_path / "lib.db"
    with Library.open(db) as lib:
        lib.ensure_model("m", DIM)
        lib.record(recs, "m")
        ids, _ = lib.embeddings("m")
        truth = dict(zip(ids.tolist(), y.tolist()))  # face ids in insertion order
        scores = {}
        for centre in (True, False, None):
            r = unknown_people(lib, None, "m", min_faces=2, centre=centre)
            label = {f: g for g, m in r.groups.items() for f in m}
            scores[centre] = bcubed(np.array([truth[i] for i in ids.tolist()]),
                                    np.array([label.get(i, -1) for i in ids.tolist()]))[2]
    assert scores[None] == scores[True]  # the default centres
    assert scores[True] > scores[False] + 0.05, scores
