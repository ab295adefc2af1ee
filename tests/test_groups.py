"""index.groups: BCubed against a per-item brute force, grouping on synthetic clustered unit vectors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index.groups import (CENTRE_PRIOR_FACES, DEFAULT_MAX_DISTANCE, METHODS, bcubed, centre_on, chinese_whispers,
                          connected_components, group_faces, library_mean, range_edges)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Reference implementations (slow, obvious)
# --------------------------------------------------------------------------------------------


def bcubed_brute(true: list, pred: list) -> tuple[float, float, float]:
    n = len(true)
    # -1 = a singleton: give each its own id that no other item has
    pred = [("alone", i) if p == -1 else p for i, p in enumerate(pred)]
    ps, rs = [], []
    for i in range(n):
        same_pred = [j for j in range(n) if pred[j] == pred[i]]
        same_true = [j for j in range(n) if true[j] == true[i]]
        both = [j for j in same_pred if true[j] == true[i]]
        ps.append(len(both) / len(same_pred))
        rs.append(len(both) / len(same_true))
    p, r = sum(ps) / n, sum(rs) / n
    return p, r, 2 * p * r / (p + r)


def components_brute(x: np.ndarray, max_distance: float) -> np.ndarray:
    """Component id per row by BFS over the full distance matrix (the smallest member index)."""
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))  # (N, N)
    adj = d <= max_distance
    comp = np.full(len(x), -1)
    for s in range(len(x)):
        if comp[s] >= 0:
            continue
        comp[s], todo = s, [s]
        while todo:
            i = todo.pop()
            for j in np.flatnonzero(adj[i] & (comp < 0)):
                comp[j] = s
                todo.append(j)
    return comp


def expected_labels(comp: np.ndarray, min_faces: int) -> np.ndarray:
    """The contract's numbering, spelled out: by size descending, ties by smallest member, small -> -1."""
    groups = {}
    for i, c in enumerate(comp):
        groups.setdefault(c, []).append(i)
    order = sorted(groups.values(), key=lambda m: (-len(m), min(m)))
    out = np.full(len(comp), -1)
    for k, members in enumerate(m for m in order if len(m) >= min_faces):
        out[members] = k
    return out


def mixture(sizes: list[int], dim: int = 32, noise: float = 0.03, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around random well-separated centres ((N, dim) float32) and their true cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[y] + noise * rng.normal(size=(len(y), dim))
    perm = rng.permutation(len(y))  # members interleaved, not in blocks
    x, y = x[perm], y[perm]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the two labelings group the items identically (ids may differ)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --------------------------------------------------------------------------------------------
# BCubed
# --------------------------------------------------------------------------------------------


def test_bcubed_matches_brute_force_on_random_labelings() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(1, 40))
        true = rng.integers(0, int(rng.integers(1, 8)), n)
        pred = rng.integers(-1, int(rng.integers(1, 8)), n)  # -1s included
        assert bcubed(true, pred) == pytest.approx(bcubed_brute(true.tolist(), pred.tolist()), abs=1e-12)


def test_bcubed_hand_cases() -> None:
    true = np.array([0, 0, 0, 1, 1, 2])
    assert bcubed(true, np.array([5, 5, 5, 9, 9, 7])) == pytest.approx((1.0, 1.0, 1.0))
    # everything in one cluster: recall 1, precision = sum of squared class fractions
    p, r, f = bcubed(true, np.zeros(6, int))
    assert r == 1.0 and p == pytest.approx((3 / 6) ** 2 + (2 / 6) ** 2 + (1 / 6) ** 2)
    assert f == pytest.approx(2 * p / (p + 1))
    # everything ungrouped: precision 1, recall = mean over items of 1 / |class|
    p, r, _ = bcubed(true, np.full(6, -1))
    assert p == 1.0 and r == pytest.approx((3 * (1 / 3) + 2 * (1 / 2) + 1) / 6)
    # -1 is a singleton per item, not one cluster of all -1 items
    assert bcubed(true, np.array([-1, -1, -1, 1, 1, 2])) == bcubed(true, np.array([10, 11, 12, 1, 1, 2]))
    # one wrong member: items 0,1 precision 2/3 (cluster {0,1,3}), item 3 precision 1/3, recall 1/2
    p, r, _ = bcubed(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0]))
    assert p == pytest.approx((2 / 3 + 2 / 3 + 1 + 1 / 3) / 4)
    assert r == pytest.approx((1 + 1 + 1 / 2 + 1 / 2) / 4)


def test_bcubed_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="length"):
        bcubed(np.zeros(3), np.zeros(4))


# --------------------------------------------------------------------------------------------
# group_faces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [*METHODS, "auto"])
def test_recovers_well_separated_clusters(method: str) -> None:
    sizes = [12, 9, 9, 5, 3]
    x, y = mixture(sizes)
    labels = group_faces(x, max_distance=0.6, min_faces=2, method=method)
    assert labels.dtype == np.int64 and labels.shape == (len(x),)
    assert (labels >= 0).all() and same_partition(labels, y)
    assert bcubed(y, labels) == pytest.approx((1.0, 1.0, 1.0))
    # numbered by size, largest first; the two groups of 9 by their smallest member index
    counts = np.bincount(labels)
    assert counts.tolist() == sorted(sizes, reverse=True)
    first = [np.flatnonzero(labels == k).min() for k in (1, 2)]
    assert first[0] < first[1]


@pytest.mark.parametrize("method", METHODS)
def test_min_faces_and_far_outlier(method: str) -> None:
    x, y = mixture([10, 6, 2, 1], seed=3)
    outlier = np.flatnonzero(y == 3)[0]
    pair = np.flatnonzero(y == 2)
    labels = group_faces(x, max_distance=0.6, min_faces=3, method=method)
    assert labels[outlier] == -1
    assert (labels[pair] == -1).all()  # a group of 2 < min_faces 3
    assert np.bincount(labels[labels >= 0]).tolist() == [10, 6]
    assert labels[y == 0].tolist() == [0] * 10 and labels[y == 1].tolist() == [1] * 6
    labels2 = group_faces(x, max_distance=0.6, min_faces=2, method=method)
    assert labels2[outlier] == -1 and len(set(labels2[pair].tolist())) == 1 and labels2[pair[0]] == 2


def test_max_distance_too_small_groups_nothing() -> None:
    x, _ = mixture([5, 5], noise=0.2, dim=64)
    assert (group_faces(x, max_distance=1e-3, method="graph") == -1).all()


def test_graph_matches_brute_force_components() -> None:
    rng = np.random.default_rng(7)
    for trial in range(4):
        x = rng.normal(size=(200, 4)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        r = [0.2, 0.3, 0.4, 0.5][trial]  # from many small components to a few large ones
        comp = components_brute(x, r)
        for min_faces in (1, 2, 4):
            got = group_faces(x, max_distance=r, min_faces=min_faces, method="graph")
            np.testing.assert_array_equal(got, expected_labels(comp, min_faces))


def test_range_edges_are_exactly_the_pairs_within_max_distance() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(150, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src, dst = range_edges(x, 0.7, chunk=40)  # several query chunks
    d = np.sqrt(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1))
    want = {(i, j) for i, j in zip(*np.nonzero(d <= 0.7)) if i != j}
    assert set(zip(src.tolist(), dst.tolist())) == want
    assert len(src) == len(want)  # no duplicates


def test_connected_components_on_a_long_chain() -> None:
    # a path 0-1-...-999 given in shuffled order: one component (pointer jumping must finish it)
    rng = np.random.default_rng(0)
    a = np.arange(999)
    perm = rng.permutation(1000)
    src, dst = perm[a], perm[a + 1]
    comp = connected_components(1000, np.concatenate([src, dst]), np.concatenate([dst, src]))
    assert (comp == 0).all()


def test_whispers_does_not_chain_through_one_bridge() -> None:
    # two 8-cliques joined by one edge: components merge them, chinese whispers keeps them apart
    edges = [(i, j) for block in (range(0, 8), range(8, 16)) for i in block for j in block if i != j]
    edges += [(7, 8), (8, 7)]
    src, dst = (np.array(e, np.int64) for e in zip(*edges))
    assert len(set(connected_components(16, src, dst).tolist())) == 1
    labels = chinese_whispers(16, src, dst)
    assert len(set(labels[:8].tolist())) == 1 and len(set(labels[8:].tolist())) == 1
    assert labels[0] != labels[8]


def test_dbscan_with_min_faces_2_is_the_graph_method() -> None:
    # min_samples 2 makes every face with one neighbour a core point: DBSCAN = connected components
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for r in (0.3, 0.45):
        np.testing.assert_array_equal(group_faces(x, max_distance=r, method="dbscan"),
                                      group_faces(x, max_distance=r, method="graph"))


def test_hdbscan_on_the_knn_graph_equals_exact_hdbscan() -> None:
    """The k-NN-graph HDBSCAN (+ cap) gives scikit-learn's exact HDBSCAN on the full feature matrix,
    followed by the cap computed over all pairs."""
    from sklearn.cluster import HDBSCAN

    x, _ = mixture([30, 20, 12, 6, 4, 2, 1, 1], dim=16, noise=0.12, seed=11)
    extra = np.random.default_rng(11).normal(size=(40, 16))  # scattered faces of nobody in particular
    x = np.vstack([x, (extra / np.linalg.norm(extra, axis=1, keepdims=True)).astype(np.float32)])
    for max_distance in (0.3, 0.6, 2.0):
        raw = HDBSCAN(min_cluster_size=2, copy=True).fit_predict(x.astype(np.float64))
        d = np.sqrt(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        mate = ((raw[:, None] == raw[None]) & (d <= max_distance)).any(1) & (raw >= 0)
        want = np.where(mate, raw, -1)
        got = group_faces(x, max_distance=max_distance, min_faces=2, method="hdbscan")
        assert same_partition(np.where(want < 0, -1 - np.arange(len(x)), want),
                              np.where(got < 0, -1 - np.arange(len(x)), got))
        assert ((got < 0) == (want < 0)).all()


def test_scikit_learn_methods_say_when_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    x, _ = mixture([4, 4])
    for method in ("auto", "hdbscan", "dbscan"):
        with pytest.raises(ModuleNotFoundError, match="scikit-learn"):
            group_faces(x, max_distance=0.5, method=method)
    assert (group_faces(x, max_distance=0.5, method="whispers") >= 0).all()  # no scikit-learn needed


def test_deterministic() -> None:
    x, _ = mixture([20, 15, 10], noise=0.12, seed=5)
    for method in METHODS:
        a = group_faces(x, max_distance=0.9, method=method)
        np.testing.assert_array_equal(a, group_faces(x.copy(), max_distance=0.9, method=method))


def test_empty_and_single() -> None:
    out = group_faces(np.zeros((0, 128), np.float32), max_distance=DEFAULT_MAX_DISTANCE)
    assert out.dtype == np.int64 and out.shape == (0,)
    for method in METHODS:
        assert group_faces(np.eye(1, 8, dtype=np.float32), max_distance=0.5, method=method).tolist() == [-1]


def test_bad_input() -> None:
    x, _ = mixture([4, 4])
    x[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        group_faces(x, max_distance=0.5)
    with pytest.raises(ValueError, match="2-D"):
        group_faces(np.ones(8, np.float32), max_distance=0.5)
    with pytest.raises(ValueError, match="method"):
        group_faces(np.eye(3, dtype=np.float32), max_distance=0.5, method="kmeans")
    with pytest.raises(ValueError, match="max_distance"):
        group_faces(np.eye(3, dtype=np.float32), max_distance=0.0)


# --------------------------------------------------------------------------------------------
# Centring on the library's mean (domain normalisation)
# --------------------------------------------------------------------------------------------


def offset_library(n_people: int, per_person: int, offset: float, dim: int = 32, noise: float = 0.1,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (N, dim) of people who all share one direction: face = w * person + offset * shared +
    noise, w uniform in 0.2..1 (how much of the person a face shows: a poor face is mostly the shared
    direction, so poor faces of different people crowd together, as a model's embeddings do in a new
    domain), and the true person (N,)."""
    rng = np.random.default_rng(seed)
    people = rng.normal(size=(n_people, dim))
    people /= np.linalg.norm(people, axis=1, keepdims=True)
    shared = rng.normal(size=dim)
    shared /= np.linalg.norm(shared)
    y = np.repeat(np.arange(n_people), per_person)
    w = rng.uniform(0.2, 1.0, size=(len(y), 1))
    x = w * people[y] + offset * shared + noise * rng.normal(size=(len(y), dim))
    perm = rng.permutation(len(y))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)[perm], y[perm]


def test_centring_recovers_people_who_share_an_offset() -> None:
    x, y = offset_library(150, 4, offset=2.0)
    x_free, _ = offset_library(150, 4, offset=0.0)  # the same faces without the shared direction
    f_plain = bcubed(y, group_faces(x, max_distance=DEFAULT_MAX_DISTANCE, min_faces=2))[2]
    f_free = bcubed(y, group_faces(x_free, max_distance=DEFAULT_MAX_DISTANCE, min_faces=2))[2]
    f_centred = bcubed(y, group_faces(centre_on(x, library_mean(x)), max_distance=DEFAULT_MAX_DISTANCE, min_faces=2))[2]
    f_full = bcubed(y, group_faces(centre_on(x, library_mean(x, prior_faces=0)), max_distance=DEFAULT_MAX_DISTANCE,
                                   min_faces=2))[2]
    assert f_plain < f_free - 0.1  # the shared direction costs the grouping
    assert f_centred > f_plain + 0.05  # the default (600 faces: the mean weighs 0.75) wins much of it back
    assert f_full > f_free - 0.03  # the full mean removes it: as good as without it


def test_library_mean_is_shrunk_for_a_small_library() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=16)
    b = a + 0.3 * rng.normal(size=16)
    pair = np.stack([a / np.linalg.norm(a), b / np.linalg.norm(b)]).astype(np.float32)  # one person's 2 faces
    before = float(np.linalg.norm(pair[0] - pair[1]))
    # the full mean of 2 faces is their person: subtracted, it leaves them opposite (distance 2)
    full = centre_on(pair, library_mean(pair, prior_faces=0))
    assert np.linalg.norm(full[0] - full[1]) == pytest.approx(2.0, abs=1e-5)
    # shrunk by 2 / (2 + CENTRE_PRIOR_FACES), they stay about as close as they were, and still group
    shrunk = centre_on(pair, library_mean(pair))
    np.testing.assert_allclose(library_mean(pair), pair.mean(axis=0) * 2 / (2 + CENTRE_PRIOR_FACES), rtol=1e-6)
    assert abs(float(np.linalg.norm(shrunk[0] - shrunk[1])) - before) < 0.05
    assert group_faces(shrunk, max_distance=before + 0.1, min_faces=2, method="graph").tolist() == [0, 0]
    # a large library's mean is hardly shrunk
    big, _ = offset_library(100, 20, offset=1.0)
    np.testing.assert_allclose(library_mean(big), big.mean(axis=0) * 2000 / (2000 + CENTRE_PRIOR_FACES), rtol=1e-5)


def test_centre_on_gives_unit_rows_and_zero_for_the_mean_itself() -> None:
    x, _ = mixture([5, 5], dim=8)
    out = centre_on(np.vstack([x, x.mean(axis=0, keepdims=True)]), x.mean(axis=0))
    assert out.dtype == np.float32 and out.shape == (11, 8) and np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out[:10], axis=1), 1.0, rtol=1e-5)
    assert not out[10].any()  # a face equal to the mean has no direction left
    assert library_mean(np.zeros((0, 8), np.float32)).shape == (8,)


def test_does_not_import_torch() -> None:
    code = ("import sys, numpy as np; from index.groups import centre_on, group_faces, library_mean; "
            "x = np.eye(4, dtype=np.float32); group_faces(centre_on(x, library_mean(x)), max_distance=0.5, method='graph'); "
            "assert 'torch' not in sys.modules and 'verify' not in sys.modules, 'torch or verify imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
