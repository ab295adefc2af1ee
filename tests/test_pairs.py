from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from verify.data.pairs import PairsFileError, lfw_image_path, make_identity_pairs, read_lfw_pairs


@pytest.mark.parametrize("fname, n", [("pairsDevTrain.txt", 1100), ("pairsDevTest.txt", 500)])
def test_real_view1_files(lfw_root, fname, n):
    df = read_lfw_pairs(lfw_root / fname)
    assert list(df.columns) == ["name1", "idx1", "name2", "idx2", "same", "fold"]
    assert len(df) == 2 * n
    assert df["same"].sum() == n and df["same"].iloc[:n].all() and not df["same"].iloc[n:].any()
    assert (df["fold"] == -1).all()
    same = df[df["same"]]
    assert (same["name1"] == same["name2"]).all() and (same["idx1"] != same["idx2"]).all()
    diff = df[~df["same"]]
    assert (diff["name1"] != diff["name2"]).all()
    if fname == "pairsDevTrain.txt":
        assert tuple(df.iloc[0][["name1", "idx1", "name2", "idx2"]]) == ("Aaron_Peirsol", 1, "Aaron_Peirsol", 2)
        assert tuple(df.iloc[n][["name1", "idx1", "name2", "idx2"]]) == ("AJ_Cook", 1, "Marsha_Thomason", 1)
    # Every referenced image is present in the shared deep-funneled folder.
    images = lfw_root / "lfw-deepfunneled"
    if images.is_dir():
        missing = [
            str(lfw_image_path(images, name, idx))
            for name, idx in set(zip(df["name1"], df["idx1"])) | set(zip(df["name2"], df["idx2"]))
            if not lfw_image_path(images, name, idx).is_file()
        ]
        assert not missing, missing[:5]


def test_lfw_image_path():
    assert lfw_image_path("/x", "Aaron_Peirsol", 3) == Path("/x/Aaron_Peirsol/Aaron_Peirsol_0003.jpg")


def _write(tmp_path, text, name="pairs.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _view2(folds=3, per=2):
    lines = [f"{folds}\t{per}"]
    for f in range(folds):
        lines += [f"Same_{f}_{k}\t1\t{k + 2}" for k in range(per)]
        lines += [f"A_{f}_{k}\t{k + 1}\tB_{f}_{k}\t1" for k in range(per)]
    return "\r\n".join(lines) + "\r\n"  # CRLF, as some copies of the files have


def test_synthetic_view2(tmp_path):
    df = read_lfw_pairs(_write(tmp_path, _view2(3, 2)))
    assert len(df) == 12
    assert df["fold"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert df["same"].tolist() == [True, True, False, False] * 3
    assert df.iloc[5][["name1", "idx1", "name2", "idx2"]].tolist() == ["Same_1_1", 1, "Same_1_1", 3]
    assert df.iloc[11][["name1", "idx1", "name2", "idx2"]].tolist() == ["A_2_1", 2, "B_2_1", 1]
    assert Counter(df["fold"]) == {0: 4, 1: 4, 2: 4}


@pytest.mark.parametrize(
    "text, match",
    [
        ("2\nA\t1\t2\nB\t1\t2\nC\t1\tD\t1\n", r"pairs.txt:4: header '2' announces 4 pairs, file has 3"),
        ("1\nA\t1\t2\nC\t1\tD\t1\nE\t1\tF\t1\n", r"announces 2 pairs, file has 3"),
        ("1\nA\t1\tB\t2\nC\t1\tD\t1\n", r"pairs.txt:2: expected a same-person line"),
        ("1\nA\t1\t2\nC\t1\tD\n", r"pairs.txt:3: expected a different-person line"),
        ("1\nA\tone\t2\nC\t1\tD\t1\n", r"pairs.txt:2: image number 'one'"),
        ("1\nA\t1\t1\nC\t1\tD\t1\n", r"pairs.txt:2: same-person pair uses image 1 twice"),
        ("ten 300\n", r"pairs.txt:1: header must be"),
        ("", r"empty pair file"),
        ("1\nA\t1\t2\nC\t1\tC\t2\n", r"pairs.txt:3: different-person pair names 'C' twice"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, text, match):
    with pytest.raises(PairsFileError, match=match):
        read_lfw_pairs(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_lfw_pairs(tmp_path / "nope.txt")


def _check_pairs(ids, i, j, same):
    assert len(i) == len(j) == len(same)
    assert np.all(i != j)
    keys = {(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist())}
    assert len(keys) == len(i)  # no duplicates, in either order
    assert np.array_equal(ids[i] == ids[j], same)


def test_identity_pairs_properties_and_balance():
    rng = np.random.default_rng(0)
    counts = [2, 3, 10, 10, 10, 1, 25, 7]
    ids = rng.permutation(np.repeat(np.array([f"id{c}" for c in range(len(counts))]), counts))
    i, j, same = make_identity_pairs(ids, n_genuine=60, n_impostor=80, seed=1)
    _check_pairs(ids, i, j, same)
    assert same.sum() == 60 and (~same).sum() == 80
    per_id = Counter(ids[i[same]])
    assert per_id["id0"] == 1 and per_id["id1"] == 3  # capped by C(2,2) and C(3,2)
    assert "id5" not in per_id  # a singleton has no genuine pair
    rest = [per_id[f"id{c}"] for c in (2, 3, 4, 6, 7)]
    assert max(rest) - min(rest) <= 1 and sum(rest) == 56
    # An identity's first ceil(n/2) pairs cover all of its images; with fewer pairs, no image repeats.
    used = set(i[same].tolist()) | set(j[same].tolist())
    for c in (2, 3, 4, 6, 7):
        members = set(np.flatnonzero(ids == f"id{c}").tolist())
        n_pairs = per_id[f"id{c}"]
        if n_pairs >= (len(members) + 1) // 2:
            assert members <= used
        else:  # id6: 25 images, ~11 pairs
            assert len(members & used) == 2 * n_pairs
    again = make_identity_pairs(ids, 60, 80, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip((i, j, same), again))
    other = make_identity_pairs(ids, 60, 80, seed=2)
    assert not np.array_equal(i, other[0])


def test_identity_pairs_dense_and_limits():
    ids = np.repeat(np.arange(3), 3)  # 9 images: 9 genuine pairs, 27 impostor pairs possible
    i, j, same = make_identity_pairs(ids, n_genuine=9, n_impostor=27, seed=0)
    _check_pairs(ids, i, j, same)
    assert same.sum() == 9 and (~same).sum() == 27
    with pytest.raises(ValueError, match="allow only 9"):
        make_identity_pairs(ids, n_genuine=10, n_impostor=0)
    with pytest.raises(ValueError, match="allows only 27"):
        make_identity_pairs(ids, n_genuine=0, n_impostor=28)
