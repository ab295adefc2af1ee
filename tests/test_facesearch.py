"""index.facesearch.FaceSearch: FAISS range / k-NN search vs brute-force numpy, the size policy,
persistence (atomic save, stale key, corrupt files), input checks. Pure numpy/faiss: no torch, no data."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import index.facesearch as fsmod
from index.facesearch import ivfpq as ivfpq_mod
from index.facesearch import policy
from index.facesearch import storage as storage_mod
from index.facesearch import FaceSearch, FaceSearchError, StaleIndexError, choose_kind, unit_rows

DIM = 32
REPO = Path(__file__).resolve().parents[1]


def _faces(rng: np.random.Generator, n_ids: int, per_id: int, dim: int = DIM, intra: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Face-like unit vectors: n_ids random centres on the sphere, per_id points near each with
    pairwise cosine ~intra. Returns (vectors (N, D) float32, labels (N,))."""
    centres = unit_rows(rng.standard_normal((n_ids, dim)))
    labels = np.repeat(np.arange(n_ids), per_id)
    sigma = np.sqrt((1 / intra - 1) / dim)
    x = centres[labels] + sigma * rng.standard_normal((len(labels), dim)).astype(np.float32)
    return unit_rows(x), labels


def _ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Catalogue-like ids: unique, arbitrary, far from 0..N-1."""
    return rng.choice(np.int64(1) << 50, n, replace=False).astype(np.int64) + (np.int64(1) << 40)


def _brute_range(x: np.ndarray, ids: np.ndarray, q: np.ndarray, bound: float) -> list[dict[int, float]]:
    sims = q @ x.T  # (Q, N)
    return [{int(ids[j]): float(s[j]) for j in np.flatnonzero(s >= bound)} for s in sims]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x, labels = _faces(rng, 200, 20)  # (4000, 32)
    ids = _ids(rng, len(x))
    # Queries: fresh faces of library identities (an enrolled person's new photos) and library faces.
    q, _ = _faces(np.random.default_rng(1), 1, 1)
    fresh = unit_rows(x[labels == 3].mean(0, keepdims=True) + 0.1 * np.random.default_rng(2).standard_normal((5, DIM)))
    return x, labels, ids, np.concatenate([fresh, x[::400], q]).astype(np.float32)


@pytest.fixture(scope="module")
def ivf(data) -> FaceSearch:
    x, _, ids, _ = data
    return FaceSearch.build(x, ids, "ivf", key="fp:1")


# ------------------------------------------------------------------------------------------------
# Search results
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", [0.3, 0.5, 0.8])
def test_flat_range_search_equals_numpy(data, bound):
    x, _, ids, q = data
    fs = FaceSearch.build(x, ids, "flat")
    lims, got_ids, sims = fs.range_search(q, bound)
    assert lims.shape == (len(q) + 1,) and lims[0] == 0 and lims[-1] == len(got_ids) == len(sims)
    assert got_ids.dtype == np.int64 and sims.dtype == np.float32
    want = _brute_range(x, ids, q, bound)
    for i, exact in enumerate(want):
        found = dict(zip(got_ids[lims[i] : lims[i + 1]].tolist(), sims[lims[i] : lims[i + 1]].tolist()))
        # Same sets, except that a pair within float rounding of the bound may fall either way (FAISS and
        # numpy sum the products in different orders).
        differ = set(found) ^ set(exact)
        assert all(abs(float(q[i] @ x[np.flatnonzero(ids == j)[0]]) - bound) < 1e-5 for j in differ)
        assert len(differ) <= 1
        for j, s in found.items():
            assert abs(s - exact.get(j, bound)) < 1e-5
        # most similar first
        assert np.all(np.diff(sims[lims[i] : lims[i + 1]]) <= 0)
    assert lims[-1] > 0  # the test is not vacuous


def test_range_bound_is_inclusive():
    v = np.eye(4, dtype=np.float32)
    fs = FaceSearch.build(v, np.array([10, 11, 12, 13]), "flat")
    lims, got, sims = fs.range_search(v[:1], 1.0)  # similarity exactly 1.0 with itself
    assert got.tolist() == [10] and sims.tolist() == [1.0]
    lims, got, _ = fs.range_search(v[:1], 0.0)  # exactly 0 with the others: kept too (>=)
    assert sorted(got.tolist()) == [10, 11, 12, 13]


def test_flat_knn_equals_numpy_with_arbitrary_ids(data):
    x, _, ids, q = data
    fs = FaceSearch.build(x, ids, "flat")
    sims, got = fs.search(q, 7)
    full = q @ x.T
    order = np.argsort(-full, axis=1)[:, :7]
    assert got.shape == sims.shape == (len(q), 7)
    np.testing.assert_array_equal(got, ids[order])
    np.testing.assert_allclose(sims, np.take_along_axis(full, order, 1), atol=1e-5)
    assert got.min() >= 1 << 40  # catalogue ids, not row numbers


def test_missing_neighbours_are_minus_one_and_minus_inf(data):
    x, _, ids, _ = data
    fs = FaceSearch.build(x[:3], ids[:3], "flat")
    sims, got = fs.search(x[:2], 5)
    assert (got[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()
    assert set(got[0, :3].tolist()) == set(ids[:3].tolist())
    empty = FaceSearch.build(np.zeros((0, DIM), np.float32), np.zeros(0, np.int64), "flat")
    sims, got = empty.search(x[:2], 3)
    assert (got == -1).all() and np.isneginf(sims).all()
    lims, got, sims = empty.range_search(x[:2], 0.5)
    assert lims.tolist() == [0, 0, 0] and len(got) == len(sims) == 0


def test_ivf_range_recall_on_clustered_data(data, ivf):
    x, _, ids, q = data
    assert ivf.kind == "ivf" and 1 <= ivf.nprobe <= ivf.nlist
    assert ivf.header.calibration["recall"] >= 0.99
    for bound in (0.5, 0.6):
        lims, got, sims = ivf.range_search(q, bound)
        want = _brute_range(x, ids, q, bound)
        hits = sum(len(set(got[lims[i] : lims[i + 1]].tolist()) & set(w)) for i, w in enumerate(want))
        total = sum(len(w) for w in want)
        assert total > 50 and hits / total >= 0.95
        # IVF never invents results: every hit is a true one, with the right similarity
        for i, w in enumerate(want):
            for j, s in zip(got[lims[i] : lims[i + 1]].tolist(), sims[lims[i] : lims[i + 1]].tolist()):
                assert j in w and abs(s - w[j]) < 1e-5


def test_ivf_knn_recall_and_nprobe_override(data, ivf):
    x, _, ids, q = data
    exact = ids[np.argsort(-(q @ x.T), axis=1)[:, :10]]
    _, got = ivf.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), exact.tolist())]) >= 0.95
    _, all_cells = ivf.search(q, 10, nprobe=ivf.nlist)  # every cell: exact
    np.testing.assert_array_equal(all_cells, exact)
    with pytest.raises(ValueError, match="nprobe"):
        ivf.search(q, 10, nprobe=ivf.nlist + 1)
    flat = FaceSearch.build(x, ids, "flat")
    with pytest.raises(ValueError, match="nprobe"):
        flat.search(q, 10, nprobe=4)


# ------------------------------------------------------------------------------------------------
# Size policy
# ------------------------------------------------------------------------------------------------


def test_auto_picks_by_size(monkeypatch, data):
    x, _, ids, _ = data
    assert choose_kind(0) == "flat" and choose_kind(fsmod.IVF_MIN_FACES - 1) == "flat"
    assert choose_kind(fsmod.IVF_MIN_FACES) == "ivf"
    monkeypatch.setattr(policy, "IVF_MIN_FACES", 2000)
    assert FaceSearch.build(x[:1999], ids[:1999]).kind == "flat"
    big = FaceSearch.build(x[:2000], ids[:2000], key="k")
    assert big.kind == "ivf" and big.nlist == fsmod.ivf_nlist(2000) and big.key == "k"


def test_constants_set_on_the_package_reach_the_modules_that_read_them(monkeypatch, data):
    """Callers patched `index.facesearch.X` when it was one module: that still changes what the code does."""
    x, _, ids, _ = data
    monkeypatch.setattr(fsmod, "IVF_MIN_FACES", 2000)
    assert policy.IVF_MIN_FACES == fsmod.IVF_MIN_FACES == 2000
    assert choose_kind(2000) == "ivf" and FaceSearch.build(x[:2000], ids[:2000]).kind == "ivf"
    monkeypatch.setattr(fsmod, "MIN_TRAIN_PER_LIST", 100)  # read by policy and by ivf (imported by name there)
    assert fsmod.ivf_nlist(4000) == 40
    from index.facesearch import ivf as ivf_mod

    assert ivf_mod.MIN_TRAIN_PER_LIST == 100 and ivf_mod.kmeans_sample_size(10_000, 10, 1) == 1000
    monkeypatch.undo()
    assert policy.IVF_MIN_FACES == fsmod.IVF_MIN_FACES == 1_000_000
    assert ivf_mod.MIN_TRAIN_PER_LIST == policy.MIN_TRAIN_PER_LIST == 39


def test_nlist_rule():
    assert fsmod.ivf_nlist(1_000_000) == 4000
    assert fsmod.ivf_nlist(100_000) == 1265
    assert fsmod.ivf_nlist(4000) == 4000 // 39  # capped: >= 39 training points per cell
    assert fsmod.ivf_nlist(10) == 1


# ------------------------------------------------------------------------------------------------
# Persistence
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_round_trip(tmp_path, data, ivf, kind):
    x, _, ids, q = data
    fs = ivf if kind == "ivf" else FaceSearch.build(x, ids, "flat", key="fp:1")
    path = tmp_path / "library.fsidx"
    fs.save(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # biometric data
    assert [p.name for p in tmp_path.iterdir()] == ["library.fsidx"]  # no temp file left
    header = FaceSearch.read_header(path)
    assert (header.n, header.dim, header.kind, header.key) == (len(x), DIM, kind, "fp:1")
    back = FaceSearch.load(path, expected_key="fp:1")
    assert (back.kind, back.n, back.dim, back.nlist, back.nprobe) == (fs.kind, fs.n, fs.dim, fs.nlist, fs.nprobe)
    for a, b in zip(fs.range_search(q, 0.5), back.range_search(q, 0.5)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fs.search(q, 5), back.search(q, 5)):
        np.testing.assert_array_equal(a, b)


def test_stale_key_detected_without_loading(tmp_path, data):
    x, _, ids, _ = data
    path = tmp_path / "lib.fsidx"
    fs = FaceSearch.build(x, ids, "flat", key="model-a:gen7")
    fs.save(path)
    assert FaceSearch.read_key(path) == "model-a:gen7"
    with pytest.raises(StaleIndexError, match="stale"):
        FaceSearch.load(path, expected_key="model-a:gen8")
    fs.save(path, key="model-a:gen8")  # save may set the key; the file is replaced
    assert FaceSearch.read_key(path) == "model-a:gen8" and FaceSearch.load(path, expected_key="model-a:gen8").n == len(x)
    # read_key reads only the header: it works on a file whose vectors are cut off
    raw = path.read_bytes()
    (tmp_path / "cut.fsidx").write_bytes(raw[:2000])
    assert FaceSearch.read_key(tmp_path / "cut.fsidx") == "model-a:gen8"


def _one_line_error(path: Path, exc: pytest.ExceptionInfo) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg


def test_corrupt_truncated_and_foreign_files(tmp_path, data):
    x, _, ids, _ = data
    good = tmp_path / "good.fsidx"
    FaceSearch.build(x[:500], ids[:500], "flat", key="k").save(good)
    raw = good.read_bytes()

    cases = {
        "truncated": raw[: len(raw) // 2],
        "flipped": raw[:-1000] + bytes([raw[-1000] ^ 0xFF]) + raw[-999:],  # one bit of a vector
        "foreign": b"just some text\n" * 100,
        "empty": b"",
        "badheader": raw[:12] + b"{" * (len(raw) - 12),
    }
    # a real FAISS index file, not ours
    import faiss

    faiss.write_index(faiss.IndexFlatIP(DIM), str(tmp_path / "foreign.faiss"))
    for name, blob in cases.items():
        p = tmp_path / f"{name}.fsidx"
        p.write_bytes(blob)
        with pytest.raises(ValueError) as exc:
            FaceSearch.load(p)
        _one_line_error(p, exc)
    for p in (tmp_path / "foreign.faiss", tmp_path / "missing.fsidx"):
        with pytest.raises(FaceSearchError) as exc:
            FaceSearch.load(p)
        _one_line_error(p, exc)
        with pytest.raises(FaceSearchError):
            FaceSearch.read_key(p)


def test_header_lying_about_its_index_is_refused(tmp_path, data):
    """A well-formed file whose header does not describe its FAISS payload (edited by hand)."""
    x, _, ids, _ = data
    path = tmp_path / "a.fsidx"
    FaceSearch.build(x[:100], ids[:100], "flat", key="k").save(path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<I", raw[8:12])
    header = json.loads(raw[12 : 12 + length])
    header["n"] = 99
    new = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(raw[:8] + struct.pack("<I", len(new)) + new + raw[12 + length :])
    with pytest.raises(FaceSearchError, match="does not match its header"):
        FaceSearch.load(path)


def test_save_failure_keeps_old_file(tmp_path, data, monkeypatch):
    x, _, ids, _ = data
    path = tmp_path / "lib.fsidx"
    FaceSearch.build(x[:50], ids[:50], "flat", key="old").save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(storage_mod.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        FaceSearch.build(x, ids, "flat", key="new").save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lib.fsidx"]


# ------------------------------------------------------------------------------------------------
# Input validation
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_value_errors(data):
    x, _, ids, q = data
    bad_nan = x[:10].copy()
    bad_nan[3, 0] = np.nan
    cases = [
        (lambda: FaceSearch.build(x[:10, :5].ravel(), ids[:50]), "shape"),
        (lambda: FaceSearch.build(x[:10], ids[:9]), "ids"),
        (lambda: FaceSearch.build(x[:10], ids[:10].reshape(2, 5)), "ids"),
        (lambda: FaceSearch.build(bad_nan, ids[:10]), "row 3 has NaN"),
        (lambda: FaceSearch.build(2 * x[:10], ids[:10]), "norm"),
        (lambda: FaceSearch.build(np.zeros((2, DIM), np.float32), ids[:2]), "norm"),
        (lambda: FaceSearch.build(x[:10].astype(np.int32), ids[:10]), "float"),
        (lambda: FaceSearch.build(x[:2], np.array([5, 5])), "duplicated"),
        (lambda: FaceSearch.build(x[:2], np.array([5, -1])), "negative"),
        (lambda: FaceSearch.build(x[:2], np.array([5.0, 6.0])), "integers"),
        (lambda: FaceSearch.build(x[:10], ids[:10], "hnsw"), "kind"),
        (lambda: FaceSearch.build(x[:10], ids[:10], "flat", nlist=4), "nlist"),
        (lambda: FaceSearch.build(x[:10], ids[:10], "ivf", nlist=11), "nlist"),
        (lambda: FaceSearch.build(x[:10], ids[:10], key=3), "key"),
    ]
    fs = FaceSearch.build(x[:100], ids[:100], "flat")
    cases += [
        (lambda: fs.range_search(q[:, :16], 0.5), "shape"),
        (lambda: fs.range_search(q[0], 0.5), "shape"),
        (lambda: fs.range_search(q * 1.01, 0.5), "norm"),
        (lambda: fs.range_search(q, float("nan")), "finite"),
        (lambda: fs.search(q, 0), "k must"),
        (lambda: fs.search(q, 2.5), "k must"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as exc:
            fn()
        assert "\n" not in str(exc.value)


def test_near_unit_vectors_accepted():
    rng = np.random.default_rng(5)
    x = unit_rows(rng.standard_normal((20, DIM))) * np.float32(1 + 5e-5)  # within NORM_TOLERANCE
    fs = FaceSearch.build(x, np.arange(20) * 3, "flat")
    assert fs.n == 20 and fs.search(x[:1], 1)[1][0, 0] == 0


def test_module_never_imports_torch_or_verify():
    code = ("import sys, numpy as np; from index.facesearch import FaceSearch; "
            "FaceSearch.build(np.eye(4, dtype=np.float32), np.arange(4), 'flat').search(np.eye(4, dtype=np.float32), 1); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'verify'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


# ------------------------------------------------------------------------------------------------
# IVF-PQ and the size policy flat -> ivf -> ivfpq (bench/bench_search_scale.py has the 1e6-1e7 numbers)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_opq():
    """OPQ and PQ trained with less effort (OPQ: 4,096 residuals, 4 rounds instead of 65,536 and 25; PQ:
    8,192 residuals instead of 65,536): same code path, seconds less per build."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ivfpq_mod, "OPQ_TRAIN_ROWS", 4096)
        mp.setattr(ivfpq_mod, "OPQ_ITERATIONS", 4)
        mp.setattr(ivfpq_mod, "PQ_TRAIN_ROWS", 8192)
        yield


@pytest.fixture(scope="module")
def scale_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """20,000 clustered faces (1,000 identities x 20) and 300 fresh faces of 100 of those identities."""
    rng = np.random.default_rng(10)
    centres = unit_rows(rng.standard_normal((1000, DIM)))
    labels = np.repeat(np.arange(1000), 20)
    sigma = np.float32(np.sqrt((1 / 0.7 - 1) / DIM))
    x = unit_rows(centres[labels] + sigma * rng.standard_normal((len(labels), DIM)).astype(np.float32))
    people = np.repeat(rng.choice(1000, 100, replace=False), 3)
    q = unit_rows(centres[people] + sigma * rng.standard_normal((len(people), DIM)).astype(np.float32))
    return x, _ids(rng, len(x)), q, labels


@pytest.fixture(scope="module")
def scale_indexes(scale_data, fast_opq) -> dict[str, FaceSearch]:
    x, ids, _, _ = scale_data
    pq = FaceSearch.build(x, ids, "ivfpq", key="fp:pq")  # 16 x 8 bits + OPQ: the default
    coarse = {"centroids": pq.centroids(), "assignment": _assignment(pq, ids)}
    return {
        "ivfpq": pq,
        "ivf": FaceSearch.build(x, ids, "ivf", **coarse),
        "ivfpq8": FaceSearch.build(x, ids, "ivfpq", pq_m=8, **coarse),
    }


def _assignment(fs: FaceSearch, ids: np.ndarray) -> np.ndarray:
    """fs.cells() put back into the row order of `ids`."""
    cell_ids, cells = fs.cells()
    order = np.argsort(cell_ids)
    return cells[order][np.searchsorted(cell_ids[order], ids)]


def _recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def test_kind_by_size_flat_ivf_ivfpq(monkeypatch, scale_data, fast_opq):
    x, ids, _, _ = scale_data
    assert 0 < fsmod.IVF_MIN_FACES < fsmod.IVFPQ_MIN_FACES
    assert [kind for _, kind in fsmod.kind_table()] == ["flat", "ivf", "ivfpq"]
    assert choose_kind(fsmod.IVFPQ_MIN_FACES - 1) == "ivf" and choose_kind(fsmod.IVFPQ_MIN_FACES) == "ivfpq"
    assert choose_kind(10**8) == "ivfpq"
    monkeypatch.setattr(policy, "IVF_MIN_FACES", 2000)
    monkeypatch.setattr(policy, "IVFPQ_MIN_FACES", 6000)
    assert [choose_kind(n) for n in (1999, 2000, 5999, 6000)] == ["flat", "ivf", "ivf", "ivfpq"]
    assert FaceSearch.build(x[:1999], ids[:1999]).kind == "flat"
    assert FaceSearch.build(x[:5999], ids[:5999]).kind == "ivf"
    big = FaceSearch.build(x[:6000], ids[:6000], key="k")
    assert (big.kind, big.nlist, big.key) == ("ivfpq", fsmod.ivf_nlist(6000), "k")
    assert (big.header.pq_m, big.header.pq_bits, big.header.opq, big.header.code_bytes) == (16, 8, True, 16)


def test_ivf_and_ivfpq_recall_at_10_against_brute_force(scale_data, scale_indexes):
    """recall@10 of fresh faces vs numpy brute force. PQ at 16 bytes for 32-d is 4 bits per dimension
    (at 128-d it is 1 bit per dimension and recall@10 is ~0.6: see the bench); re-scoring the index's top
    50 with the exact vectors gets back what the codes lose."""
    x, ids, q, _ = scale_data
    exact = ids[np.argsort(-(q @ x.T), axis=1)[:, :10]]  # (Q, 10)
    ivf, pq, pq8 = scale_indexes["ivf"], scale_indexes["ivfpq"], scale_indexes["ivfpq8"]
    assert _recall_at(ivf.search(q, 10)[1], exact) >= 0.95
    assert _recall_at(pq.search(q, 10)[1], exact) >= 0.9
    assert _recall_at(pq8.search(q, 10)[1], exact) >= 0.6
    _, cand = pq.search(q, 50)
    rows = np.searchsorted(ids, cand, sorter=np.argsort(ids))
    rows = np.argsort(ids)[rows]
    best = np.take_along_axis(cand, np.argsort(-np.einsum("qd,qkd->qk", q, x[rows]), axis=1)[:, :10], 1)
    assert _recall_at(best, exact) >= 0.99
    # The calibration: the probed cells hold >= 99% of the range pairs, and it says what PQ loses.
    cal = pq.header.calibration
    assert cal["cell_recall"] >= 0.99 and 1 <= pq.nprobe <= pq.nlist
    assert 0.5 <= cal["range_recall"] <= 1 and 0 < cal["similarity_error"]["sd"] < 0.1
    assert set(cal["seconds"]) >= {"kmeans", "opq", "pq", "assign", "add", "calibrate", "train"}


def test_ivfpq_range_search_similarities_are_estimates(scale_data, scale_indexes):
    x, ids, q, labels = scale_data
    pq = scale_indexes["ivfpq"]
    lims, got, sims = pq.range_search(q, 0.5)
    assert lims.shape == (len(q) + 1,) and lims[-1] == len(got) == len(sims) > 0
    row = {int(i): r for r, i in enumerate(ids)}
    exact_sims = np.array([float(q[qi] @ x[row[int(j)]]) for qi in range(len(q)) for j in got[lims[qi] : lims[qi + 1]]])
    assert np.all(sims >= 0.5) and np.abs(sims - exact_sims).max() < 0.15  # estimates, close to the truth
    for i in range(len(q)):
        assert np.all(np.diff(sims[lims[i] : lims[i + 1]]) <= 0)  # most similar first
    want = _brute_range(x, ids, q, 0.5)
    hits = sum(len(set(got[lims[i] : lims[i + 1]].tolist()) & set(w)) for i, w in enumerate(want))
    assert hits / sum(len(w) for w in want) >= 0.85
    # nprobe reaches the IVF through the OPQ wrapper: one cell finds less than the calibrated nprobe,
    # every cell at least as much
    one, every = pq.range_search(q, 0.5, nprobe=1)[0][-1], pq.range_search(q, 0.5, nprobe=pq.nlist)[0][-1]
    assert one < lims[-1] <= every
    with pytest.raises(ValueError, match="nprobe"):
        pq.search(q, 10, nprobe=pq.nlist + 1)


def test_shared_coarse_quantiser_gives_the_same_cells(scale_data, scale_indexes):
    x, ids, _, _ = scale_data
    pq, ivf, pq8 = scale_indexes["ivfpq"], scale_indexes["ivf"], scale_indexes["ivfpq8"]
    assert pq.nlist == ivf.nlist == pq8.nlist
    np.testing.assert_allclose(ivf.centroids(), pq.centroids(), atol=1e-5)
    for other in (ivf, pq8):
        np.testing.assert_array_equal(_assignment(other, ids), _assignment(pq, ids))
    assert pq8.header.calibration["trained_on"]["kmeans"] == 0  # no k-means ran
    # Without the assignment, the faces are assigned again under the given centroids: the same cells.
    again = FaceSearch.build(x, ids, "ivf", centroids=pq.centroids())
    np.testing.assert_array_equal(_assignment(again, ids), _assignment(pq, ids))


def test_ivfpq_save_load_round_trip_and_bytes_per_face(tmp_path, scale_data, scale_indexes):
    x, ids, q, _ = scale_data
    for name, m in (("ivfpq", 16), ("ivfpq8", 8)):
        fs = scale_indexes[name]
        path = tmp_path / f"{name}.fsidx"
        fs.save(path)
        header = FaceSearch.read_header(path)
        assert (header.kind, header.pq_m, header.pq_bits, header.opq, header.nprobe) == ("ivfpq", m, 8, True, fs.nprobe)
        back = FaceSearch.load(path, expected_key=fs.key)
        assert repr(back) == repr(fs)
        for a, b in zip(fs.search(q, 10), back.search(q, 10)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(fs.range_search(q, 0.5), back.range_search(q, 0.5)):
            np.testing.assert_array_equal(a, b)
        # Per face: m bytes of code + the 8-byte int64 id of the IVF list. The rest is fixed: centroids,
        # OPQ rotation, PQ tables (float32), the header.
        fixed = 4 * (fs.nlist * DIM + DIM * DIM + m * 256 * (DIM // m)) + 64 * 1024
        assert m * len(x) < path.stat().st_size - fixed <= (m + 8) * len(x)


def test_ivfpq_without_opq_round_trips(tmp_path, scale_data, scale_indexes):
    x, ids, q, _ = scale_data
    pq = scale_indexes["ivfpq"]
    plain = FaceSearch.build(x, ids, "ivfpq", opq=False, centroids=pq.centroids(), assignment=_assignment(pq, ids))
    assert plain.header.opq is False and "opq" not in repr(plain)
    exact = ids[np.argsort(-(q @ x.T), axis=1)[:, :10]]
    assert _recall_at(plain.search(q, 10)[1], exact) >= 0.8
    plain.save(tmp_path / "plain.fsidx")
    back = FaceSearch.load(tmp_path / "plain.fsidx")
    np.testing.assert_array_equal(back.search(q, 5)[1], plain.search(q, 5)[1])


def test_flat_and_ivf_headers_unchanged_and_ivfpq_header_checked(tmp_path, data, scale_indexes):
    x, _, ids, _ = data
    path = tmp_path / "flat.fsidx"
    FaceSearch.build(x[:100], ids[:100], "flat").save(path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<I", raw[8:12])
    assert not {"pq_m", "pq_bits", "opq"} & set(json.loads(raw[12 : 12 + length]))  # old readers see what they saw
    pq_path = tmp_path / "pq.fsidx"
    scale_indexes["ivfpq"].save(pq_path)
    raw = pq_path.read_bytes()
    (length,) = struct.unpack("<I", raw[8:12])
    header = json.loads(raw[12 : 12 + length])
    for change, match in (({"pq_m": 8}, "does not match its header"), ({"opq": False}, "does not match its header"),
                          ({"pq_m": None}, "corrupt"), ({"kind": "ivf"}, "does not match its header")):
        new = json.dumps({**header, **change}, sort_keys=True).encode()
        bad = tmp_path / "bad.fsidx"
        bad.write_bytes(raw[:8] + struct.pack("<I", len(new)) + new + raw[12 + length :])
        with pytest.raises(FaceSearchError, match=match) as exc:
            FaceSearch.load(bad)
        _one_line_error(bad, exc)


def test_ivfpq_bad_arguments_are_one_line_value_errors(scale_data, data):
    x, ids, _, _ = scale_data
    small_x, _, small_ids, _ = data
    c = unit_rows(x[:64])
    cases = [
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "ivfpq", pq_m=5), "pq_m must divide"),
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "ivfpq", pq_m=2.0), "pq_m must be an int"),
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "ivfpq", pq_bits=20), "pq_bits"),
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "ivfpq", opq="yes"), "opq must be a bool"),
        (lambda: FaceSearch.build(x[:200], ids[:200], "ivfpq"), "at least 256"),
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "ivf", pq_m=8), "only apply to kind='ivfpq'"),
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "flat", centroids=c), "only apply"),
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "ivf", assignment=np.zeros(1000, int)), "centroids"),
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "ivf", centroids=c[:, :8]), "shape"),
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "ivf", centroids=2 * c), "norm"),
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "ivf", centroids=c, nlist=32), "centroids"),
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "ivf", centroids=c, assignment=np.zeros(999, int)),
         "assignment"),
        (lambda: FaceSearch.build(x[:1000], ids[:1000], "ivf", centroids=c, assignment=np.full(1000, 64)),
         "assignment"),
        (lambda: FaceSearch.build(small_x[:100], small_ids[:100], "flat").centroids(), "no cells"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as exc:
            fn()
        assert "\n" not in str(exc.value)


def test_search_rescore_recovers_recall_from_stored_vectors(scale_data, scale_indexes):
    """search(rescore=): the index's top `shortlist` re-ranked by exact similarity with vectors the
    caller reads by id (the catalogue's embeddings): recall@10 vs brute force back to ~1 at 8 bytes/face."""
    x, ids, q, _ = scale_data
    sorter = np.argsort(ids)
    asked: list[np.ndarray] = []

    def vectors(want: np.ndarray) -> np.ndarray:
        asked.append(want)
        return x[sorter[np.searchsorted(ids, want, sorter=sorter)]]

    exact = ids[np.argsort(-(q @ x.T), axis=1)[:, :10]]  # (Q, 10)
    pq8 = scale_indexes["ivfpq8"]
    raw = _recall_at(pq8.search(q, 10)[1], exact)
    sims, got = pq8.search(q, 10, rescore=vectors)  # default shortlist 20 x 10 = 200
    assert got.shape == sims.shape == (len(q), 10)
    assert _recall_at(got, exact) >= 0.98 > raw
    # one call, each id once, ascending; the similarities returned are the exact ones, best first
    assert len(asked) == 1 and np.all(np.diff(asked[0]) > 0)
    assert set(got.ravel().tolist()) <= set(asked[0].tolist())
    rows = sorter[np.searchsorted(ids, got, sorter=sorter)]
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", q, x[rows]), atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 0)
    # a shortlist of k re-scores the index's own top k: the same ids, reordered exactly
    s10, g10 = pq8.search(q, 10, rescore=vectors, shortlist=10)
    np.testing.assert_array_equal(np.sort(g10, axis=1), np.sort(pq8.search(q, 10)[1], axis=1))
    # flat is exact already: re-scoring changes nothing
    flat = FaceSearch.build(x, ids, "flat")
    np.testing.assert_array_equal(flat.search(q, 10, rescore=vectors)[1], flat.search(q, 10)[1])
    # fewer candidates than k: -1 / -inf padding, as without re-scoring
    tiny = FaceSearch.build(x[:5], ids[:5], "flat")
    s5, g5 = tiny.search(q[:2], 8, rescore=vectors)
    assert np.all(g5[:, 5:] == -1) and np.all(np.isneginf(s5[:, 5:])) and np.all(g5[:, :5] >= 0)


def test_search_rescore_bad_arguments(scale_data, scale_indexes):
    x, ids, q, _ = scale_data
    pq8 = scale_indexes["ivfpq8"]
    for kwargs, match in (
        ({"shortlist": 50}, "shortlist only applies with rescore"),
        ({"rescore": lambda i: x[: len(i)], "shortlist": 5}, "shortlist must be an int >= k"),
        ({"rescore": lambda i: x[: len(i)], "shortlist": 50.0}, "shortlist must be an int"),
        ({"rescore": "sqlite"}, "rescore must be a callable"),
        ({"rescore": lambda i: x[: len(i) - 1]}, "expected .* rows, one per id"),
        ({"rescore": lambda i: 2 * x[: len(i)]}, "rescore vectors: row 0 has norm"),
        ({"rescore": lambda i: x[: len(i), :8]}, "rescore vectors: expected shape"),
    ):
        with pytest.raises(ValueError, match=match):
            pq8.search(q, 10, **kwargs)
