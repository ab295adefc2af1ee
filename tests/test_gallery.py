"""index.Gallery: FAISS results vs brute-force numpy, persistence, locking, atomicity, refusals.

Pure numpy/faiss: no torch, no real data.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import index.store as store_mod
from index import Gallery, GalleryError

DIM = 32
FP = "facenet-test@abc123"


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng: np.random.Generator, n_ids: int, per_id: int, dim: int = DIM, noise: float = 0.6):
    """Face-like data: one centre per identity plus noise. Returns (vectors (N, D) float32, labels (N,))."""
    centres = rng.standard_normal((n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per_id)
    x = centres[labels] + noise * rng.standard_normal((len(labels), dim))
    return x.astype(np.float32), labels


def _brute(gallery_x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine: (sims (Q, k), row positions (Q, k)), best first."""
    sims = _unit(queries) @ _unit(gallery_x).T  # (Q, N)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def _sha(i: int) -> str:
    return hashlib.sha256(f"photo-{i}".encode()).hexdigest()


def _fill(g: Gallery, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Add each identity's vectors with one photo hash per vector; returns ids in row order of x."""
    ids = np.empty(len(x), np.int64)
    for lab in np.unique(labels):
        rows = np.flatnonzero(labels == lab)
        ids[rows] = g.add(
            x[rows], f"id{lab}", sources=[f"/photos/{r}.jpg" for r in rows], sha256s=[_sha(r) for r in rows],
            views=[r % 3 for r in rows],
        )
    return ids


def _assert_exact(res, gallery_x: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> None:
    """FAISS answer == brute force: same sorted similarities, and each returned id really has that similarity."""
    ref_sims, ref_rows = _brute(gallery_x, queries, k)
    np.testing.assert_allclose(res.similarities, ref_sims, atol=1e-5)
    row_of_id = {int(i): r for r, i in enumerate(ids)}
    all_sims = _unit(queries) @ _unit(gallery_x).T  # (Q, N)
    got_rows = np.vectorize(row_of_id.__getitem__)(res.ids)  # (Q, k)
    np.testing.assert_allclose(np.take_along_axis(all_sims, got_rows, axis=1), res.similarities, atol=1e-5)
    # Away from near-ties the ids themselves agree.
    assert (res.ids[:, 0] == ids[ref_rows[:, 0]]).mean() > 0.98


# ---------------------------------------------------------------- search correctness


def test_flat_search_equals_numpy_brute_force(tmp_path, rng):
    x, labels = _clustered(rng, 40, 50)
    g = Gallery.create(tmp_path / "g", DIM, FP)
    ids = _fill(g, x, labels)
    queries = x[rng.choice(len(x), 60)] + 0.3 * rng.standard_normal((60, DIM)).astype(np.float32)
    res = g.search(queries, k=10)
    assert res.ids.shape == res.similarities.shape == res.identities.shape == (60, 10)
    _assert_exact(res, x, ids, queries, 10)
    np.testing.assert_allclose(res.distances, 1.0 - res.similarities, atol=1e-6)
    assert np.all(np.diff(res.similarities, axis=1) <= 1e-6)  # best first
    name_of_id = dict(zip(ids, (f"id{lab}" for lab in labels)))
    assert [[name_of_id[i] for i in row] for row in res.ids] == res.identities.tolist()


def test_ivf_exact_at_full_nprobe_and_recall_at_small_nprobe(tmp_path, rng):
    nlist = 16
    x, labels = _clustered(rng, 60, 50)  # 3000 >= 39 * 16: trains on first add past that
    g = Gallery.create(tmp_path / "g", DIM, FP, kind="ivf", nlist=nlist, nprobe=2)
    ids = _fill(g, x, labels)
    assert g.trained and g.info()["nlist"] == nlist
    queries = x[rng.choice(len(x), 200)] + 0.5 * rng.standard_normal((200, DIM)).astype(np.float32)

    _assert_exact(g.search(queries, k=5, nprobe=nlist), x, ids, queries, 5)

    _, ref_rows = _brute(x, queries, 1)
    recall = {p: float((g.search(queries, k=1, nprobe=p).ids[:, 0] == ids[ref_rows[:, 0]]).mean()) for p in (1, 2, 4)}
    assert recall[1] <= recall[2] + 0.02 <= recall[4] + 0.04, recall
    assert recall[4] >= 0.85, f"IVF recall@1 at nprobe 4/{nlist}: {recall}"
    assert recall[1] >= 0.4, f"IVF recall@1 at nprobe 1/{nlist}: {recall}"
    # the gallery's own nprobe (2) is the default
    np.testing.assert_array_equal(g.search(queries, k=1).ids, g.search(queries, k=1, nprobe=2).ids)


def test_ivf_is_exact_flat_until_enough_vectors(tmp_path, rng):
    x, labels = _clustered(rng, 10, 20)  # 200 < 39 * 16
    g = Gallery.create(tmp_path / "g", DIM, FP, kind="ivf", nlist=16, nprobe=1)
    ids = _fill(g, x, labels)
    assert not g.trained
    _assert_exact(g.search(x[:30], k=5), x, ids, x[:30], 5)
    g.save()
    assert not Gallery.open(tmp_path / "g").trained


def test_missing_neighbours_and_empty_gallery(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", DIM, FP)
    q = rng.standard_normal((2, DIM)).astype(np.float32)
    res = g.search(q, k=3)
    assert (res.ids == -1).all() and np.isneginf(res.similarities).all() and np.isposinf(res.distances).all()
    assert (res.identities == None).all()  # noqa: E711 - object array
    g.add(q[:1], "solo")
    res = g.search(q, k=3)
    assert (res.ids[:, 0] == 0).all() and (res.ids[:, 1:] == -1).all()
    assert res.identities[:, 0].tolist() == ["solo", "solo"] and res.identities[0, 1] is None
    assert res.similarities[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_add_validates_and_normalises(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", DIM, FP)
    x = rng.standard_normal((4, DIM)).astype(np.float32)
    bad_nan = x.copy()
    bad_nan[2, 5] = np.nan
    bad_zero = x.copy()
    bad_zero[1] = 0
    for bad, msg in [
        (x[:, :-1], "shape"),
        (x.astype(np.int64), "dtype"),
        (bad_nan, "row 2 has NaN"),
        (bad_zero, "row 1 has zero norm"),
    ]:
        with pytest.raises(ValueError, match=msg):
            g.add(bad, "a")
    with pytest.raises(ValueError, match="identity has 3 entries for 4"):
        g.add(x, ["a", "b", "c"])
    with pytest.raises(ValueError, match="not a hex SHA-256"):
        g.add(x, "a", sha256s="abc")
    with pytest.raises(ValueError, match="views"):
        g.add(x, "a", views=-1)
    assert len(g) == 0 and not g.dirty  # failed adds change nothing
    g.add((5.0 * x).astype(np.float64), "a")  # float64, not unit length: accepted and normalised
    v, meta = g.vectors("a")
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(v, _unit(x), atol=1e-6)
    assert meta["view"].tolist() == [0] * 4


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_open_round_trip(tmp_path, rng, kind):
    x, labels = _clustered(rng, 20, 40)  # 800 >= 39 * 16
    kw = {"nlist": 16, "nprobe": 4} if kind == "ivf" else {}
    g = Gallery.create(tmp_path / "g", DIM, FP, threshold=0.42, kind=kind, extra={"run": "r1"}, **kw)
    _fill(g, x, labels)
    g.set_identity_info("id3", {"threshold": 0.61, "far": 1e-3})
    g.save()
    v0, m0 = g.vectors()

    h = Gallery.open(tmp_path / "g", fingerprint=FP, dim=DIM)
    v1, m1 = h.vectors()
    np.testing.assert_array_equal(v1, v0)
    pd.testing.assert_frame_equal(m1, m0)
    assert list(m1.columns) == ["id", "identity", "source", "sha256", "view", "time"]
    assert str(m1["time"].dtype) == "datetime64[us, UTC]" and m1["id"].dtype == np.int64
    assert m1["source"].iloc[0].startswith("/photos/") and m1["sha256"].iloc[0] == _sha(m1["id"].iloc[0])
    assert h.identity_info("id3") == {"threshold": 0.61, "far": 1e-3} and h.identity_info("id4") == {}
    assert (h.threshold, h.extra, h.kind, h.trained) == (0.42, {"run": "r1"}, kind, kind == "ivf")
    pd.testing.assert_frame_equal(h.identities(), g.identities())
    q = x[::37]
    np.testing.assert_array_equal(h.search(q, 5).ids, g.search(q, 5).ids)

    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    for key in ("format_version", "fingerprint", "dim", "metric", "kind", "threshold", "created", "updated", "extra"):
        assert key in manifest
    assert manifest["metric"] == "ip" and manifest["dim"] == DIM and manifest["fingerprint"] == FP


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_remove_identity(tmp_path, rng, kind):
    x, labels = _clustered(rng, 20, 40)
    kw = {"nlist": 16, "nprobe": 16} if kind == "ivf" else {}
    g = Gallery.create(tmp_path / "g", DIM, FP, kind=kind, **kw)
    ids = _fill(g, x, labels)
    g.set_identity_info("id7", {"threshold": 0.5})
    assert g.remove_identity("id7") == 40
    assert g.remove_identity("nobody") == 0
    assert len(g) == len(x) - 40 and "id7" not in set(g.identities()["identity"])
    with pytest.raises(KeyError):
        g.identity_info("id7")

    keep = labels != 7
    res = g.search(x[labels == 7], k=20)  # queries that are id7's own vectors
    assert "id7" not in set(res.identities.ravel()) and not np.isin(res.ids, ids[~keep]).any()
    _assert_exact(res, x[keep], ids[keep], x[labels == 7], 20)

    v, meta = g.vectors()  # survivors keep their ids and vectors
    np.testing.assert_array_equal(meta["id"].to_numpy(), ids[keep])
    np.testing.assert_allclose(v, _unit(x[keep]), atol=1e-6)

    new = g.add(x[:2], "late")  # ids are never reused
    assert new.min() > ids.max()
    g.save()
    h = Gallery.open(tmp_path / "g", fingerprint=FP)
    assert len(h) == len(x) - 40 + 2 and not h.has_photo("id7", _sha(int(np.flatnonzero(labels == 7)[0])))
    assert "id7" not in set(h.search(x[labels == 7], k=5).identities.ravel())


def test_has_photo_detects_duplicates(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", DIM, FP)
    sha = hashlib.sha256(b"jpeg bytes").hexdigest()
    assert not g.has_photo("ann", sha)
    g.add(rng.standard_normal((3, DIM)).astype(np.float32), "ann", sources="a.jpg", sha256s=sha, views=[0, 1, 2])
    assert g.has_photo("ann", sha) and g.has_photo("ann", sha.upper()) and g.has_photo(None, sha)
    assert not g.has_photo("bob", sha) and not g.has_photo("ann", _sha(1))
    assert g.identities().to_dict("records") == [{"identity": "ann", "vectors": 3, "photos": 1}]
    g.remove_identity("ann")
    assert not g.has_photo(None, sha)
    with pytest.raises(ValueError):
        g.has_photo("ann", "")


# ---------------------------------------------------------------- refusals and corruption


def test_foreign_model_and_wrong_dim_refused(tmp_path, rng):
    path = tmp_path / "g"
    Gallery.create(path, DIM, FP).add(rng.standard_normal((2, DIM)).astype(np.float32), "a")
    with pytest.raises(GalleryError) as e:
        Gallery.open(path, fingerprint="other-model@999")
    msg = str(e.value)
    assert str(path) in msg and FP in msg and "other-model@999" in msg and "\n" not in msg
    with pytest.raises(GalleryError, match="32-d vectors, not 64-d"):
        Gallery.open(path, fingerprint=FP, dim=64)
    with pytest.raises(GalleryError, match="other-model@999"):
        Gallery.open_or_create(path, DIM, "other-model@999")
    with pytest.raises(GalleryError, match="already holds a gallery"):
        Gallery.create(path, DIM, FP)
    assert Gallery.open_or_create(path, DIM, FP).fingerprint == FP
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"x")
    with pytest.raises(GalleryError, match="not empty and not a gallery"):
        Gallery.create(tmp_path / "photos", DIM, FP)
    with pytest.raises(GalleryError, match="no such gallery folder"):
        Gallery.open(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()  # a failed open creates nothing


def _saved_gallery(path: Path, rng) -> None:
    g = Gallery.create(path, DIM, FP)
    g.add(rng.standard_normal((50, DIM)).astype(np.float32), "a")
    g.save()


@pytest.mark.parametrize(
    "name, damage",
    [
        ("manifest.json", lambda p: p.write_text("{not json")),
        ("manifest.json", lambda p: p.write_text(json.dumps({"format_version": 1}))),
        ("manifest.json", lambda p: p.unlink()),
        ("index.faiss", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
        ("index.faiss", lambda p: p.write_bytes(b"")),
        ("vectors.parquet", lambda p: p.write_bytes(p.read_bytes()[:100])),
        ("identities.json", lambda p: p.write_text("[1, 2]")),
    ],
)
def test_corrupt_files_give_gallery_error_naming_the_file(tmp_path, rng, name, damage):
    path = tmp_path / "g"
    _saved_gallery(path, rng)
    damage(path / name)
    with pytest.raises(GalleryError) as e:
        Gallery.open(path, fingerprint=FP)
    assert str(path / name) in str(e.value) and "\n" not in str(e.value)


def test_mismatched_files_are_inconsistent(tmp_path, rng):
    _saved_gallery(tmp_path / "a", rng)
    g = Gallery.create(tmp_path / "b", DIM, FP)
    g.add(rng.standard_normal((7, DIM)).astype(np.float32), "b")
    g.save()
    os.replace(tmp_path / "a" / "index.faiss", tmp_path / "b" / "index.faiss")
    with pytest.raises(GalleryError, match="inconsistent gallery"):
        Gallery.open(tmp_path / "b")


# ---------------------------------------------------------------- files, atomicity, locking


def test_private_file_modes(tmp_path, rng):
    old = os.umask(0)  # even with a permissive umask
    try:
        path = tmp_path / "g"
        _saved_gallery(path, rng)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    files = sorted(p.name for p in path.iterdir())
    assert {"index.faiss", "vectors.parquet", "identities.json", "manifest.json"} <= set(files)
    for p in path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p.name, oct(p.stat().st_mode))
    assert not [n for n in files if n.startswith(".")]  # no temp files left behind


def test_failed_save_keeps_previous_gallery(tmp_path, rng, monkeypatch):
    path = tmp_path / "g"
    _saved_gallery(path, rng)
    before = {n: (path / n).read_bytes() for n in ("index.faiss", "vectors.parquet", "manifest.json")}
    g = Gallery.open(path, fingerprint=FP)
    g.add(rng.standard_normal((10, DIM)).astype(np.float32), "b")

    def boom(*a, **k):  # index.faiss is already written when the parquet write dies
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(OSError, match="disk full"):
        g.save()
    monkeypatch.undo()
    assert {n: (path / n).read_bytes() for n in before} == before
    assert len(Gallery.open(path, fingerprint=FP)) == 50
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")]
    g.save()  # the in-memory copy is still intact and can be saved once the problem is gone
    assert len(Gallery.open(path, fingerprint=FP)) == 60


def test_crash_after_commit_point_is_rolled_forward(tmp_path, rng, monkeypatch):
    path = tmp_path / "g"
    _saved_gallery(path, rng)
    g = Gallery.open(path, fingerprint=FP)
    g.add(rng.standard_normal((10, DIM)).astype(np.float32), "b")
    real_replace = os.replace

    def crash_on_parquet(src, dst):  # "power cut" after index.faiss was swapped in, before the others
        if Path(dst).name == "vectors.parquet" and Path(src).name == ".vectors.parquet.new":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", crash_on_parquet)
    with pytest.raises(KeyboardInterrupt):
        g.save()
    monkeypatch.undo()
    assert (path / "commit.json").exists()
    h = Gallery.open(path, fingerprint=FP)  # finishes the interrupted commit under the lock
    assert len(h) == 60 and not (path / "commit.json").exists()
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")]


def test_stale_copy_cannot_overwrite_and_locked_reloads(tmp_path, rng):
    path = tmp_path / "g"
    _saved_gallery(path, rng)
    a = Gallery.open(path, fingerprint=FP)
    b = Gallery.open(path, fingerprint=FP)
    b.add(rng.standard_normal((5, DIM)).astype(np.float32), "b")
    b.save()
    a.add(rng.standard_normal((3, DIM)).astype(np.float32), "a2")
    with pytest.raises(GalleryError, match="changed on disk"):
        a.save()  # would lose b's 5 vectors
    c = Gallery.open(path, fingerprint=FP)
    b.add(rng.standard_normal((4, DIM)).astype(np.float32), "b")
    b.save()
    with c.locked():  # reloads b's latest save first, saves on exit
        c.add(rng.standard_normal((2, DIM)).astype(np.float32), "c")
    assert len(Gallery.open(path, fingerprint=FP)) == 50 + 5 + 4 + 2
    with pytest.raises(RuntimeError, match="oops"):
        with c.locked():
            c.add(rng.standard_normal((2, DIM)).astype(np.float32), "c")
            raise RuntimeError("oops")
    assert len(c) == 61 and len(Gallery.open(path)) == 61  # the failed block's change was discarded


def test_writable_open_holds_the_lock(tmp_path, rng):
    path = tmp_path / "g"
    _saved_gallery(path, rng)
    with Gallery.open(path, fingerprint=FP, writable=True) as w:
        w.add(rng.standard_normal((5, DIM)).astype(np.float32), "w")
        t0 = time.monotonic()
        with pytest.raises(GalleryError, match="locked by another process"):
            Gallery.open(path, lock_timeout=0.2)
        assert time.monotonic() - t0 < 5
    assert len(Gallery.open(path, lock_timeout=0.2)) == 55  # saved and released on exit


def _concurrent_writer(path: str, worker: int, n_batches: int, batch: int, barrier) -> None:
    rng = np.random.default_rng(100 + worker)
    barrier.wait()
    for b in range(n_batches):
        x = rng.standard_normal((batch, DIM)).astype(np.float32)
        if b % 2 == 0:
            g = Gallery.open(path, fingerprint=FP)
            with g.locked():
                g.add(x, f"w{worker}", views=b)
        else:
            with Gallery.open(path, fingerprint=FP, writable=True) as g:
                g.add(x, f"w{worker}", views=b)


def test_two_processes_adding_concurrently_lose_nothing(tmp_path):
    path = tmp_path / "g"
    Gallery.create(path, DIM, FP)
    n_workers, n_batches, batch = 2, 8, 16
    ctx = mp.get_context("spawn")  # no fork after OpenMP threads started
    barrier = ctx.Barrier(n_workers + 1)
    procs = [
        ctx.Process(target=_concurrent_writer, args=(str(path), w, n_batches, batch, barrier)) for w in range(n_workers)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    seen = []
    while any(p.is_alive() for p in procs):  # readers meanwhile only ever see whole saves
        n = len(Gallery.open(path, fingerprint=FP))
        assert n % batch == 0
        seen.append(n)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    g = Gallery.open(path, fingerprint=FP)
    assert len(g) == n_workers * n_batches * batch
    assert len(np.unique(g.vectors()[1]["id"])) == len(g)
    for w in range(n_workers):
        rng = np.random.default_rng(100 + w)
        expected = np.concatenate([rng.standard_normal((batch, DIM)).astype(np.float32) for _ in range(n_batches)])
        v, meta = g.vectors(f"w{w}")
        np.testing.assert_allclose(v, _unit(expected), atol=1e-6)  # all there, in order
        assert meta["view"].tolist() == list(np.repeat(np.arange(n_batches), batch))


def test_index_package_does_not_import_torch_or_verify():
    code = "import sys, index; bad = {'torch', 'verify'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
