"""CelebA reader: the real annotation files (txt, zip), CSV variants, partial downloads, several
roots, and clear errors for malformed or missing annotation files."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from verify.data.celeba import ATTRIBUTES, AnnotationError, load_celeba, read_attributes, split


def _raw_rows(celeba_root: Path, names: list[str]) -> dict[str, dict]:
    """Independent of the reader: the raw official rows for `names`, split by hand."""
    want = set(names)
    out: dict[str, dict] = {n: {} for n in names}
    with zipfile.ZipFile(celeba_root / "Anno" / "list_attr_celeba.txt.zip") as zf:
        lines = zf.read("list_attr_celeba.txt").decode().splitlines()
    header = lines[1].split()
    for line in lines[2:]:
        parts = line.split()
        if parts[0] in want:
            out[parts[0]]["attrs"] = [int(v) for v in parts[1:]]
    for fname, key in (("identity_CelebA.txt", "identity"), ("list_eval_partition.txt", "partition")):
        for line in (celeba_root / "Anno" / fname).read_text().splitlines():
            name, value = line.split()
            if name in want:
                out[name][key] = int(value)
    assert header == list(ATTRIBUTES)
    return out


@pytest.fixture(scope="module")
def celeba(celeba_root):
    return load_celeba(celeba_root)


def test_real_sample_counts_and_partitions(celeba, celeba_root):
    t = celeba.table
    rep = celeba.report[str(celeba_root.resolve())]
    assert (rep.annotated, rep.present, rep.missing) == (202_599, 6_000, 196_599)
    assert len(t) == 6_000 and t["identity"].nunique() == 200
    assert list(t.columns[:5]) == ["image", "path", "root", "identity", "partition"]
    assert tuple(t.columns[5:]) == ATTRIBUTES
    assert all(t[a].dtype == np.uint8 for a in ATTRIBUTES)
    assert set(np.unique(t[list(ATTRIBUTES)].to_numpy())) <= {0, 1}
    assert t["image"].is_monotonic_increasing
    assert all(os.path.isabs(p) and os.path.exists(p) for p in t["path"].iloc[::500])
    expected = {0: (152, 4_560), 1: (26, 780), 2: (22, 660)}
    ids = {}
    for p, (n_ids, n_images) in expected.items():
        part = split(t, p)
        assert (part["identity"].nunique(), len(part)) == (n_ids, n_images)
        ids[p] = set(part["identity"])
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]), "partitions share identities"
    assert len(split(t, "val")) == 780


def test_labels_match_the_raw_rows(celeba, celeba_root):
    t = celeba.table.iloc[[0, 1234, 5999]]
    raw = _raw_rows(celeba_root, list(t["image"]))
    for _, row in t.iterrows():
        r = raw[row["image"]]
        assert row["identity"] == r["identity"] and row["partition"] == r["partition"]
        assert row[list(ATTRIBUTES)].tolist() == [1 if v == 1 else 0 for v in r["attrs"]]


def test_max_images_keeps_first_by_name(celeba, celeba_root):
    small = load_celeba(celeba_root, max_images=50).table
    pd.testing.assert_frame_equal(small, celeba.table.iloc[:50].reset_index(drop=True))


def test_need_flags(celeba_root):
    t = load_celeba(celeba_root, need_attributes=False, need_partition=False, max_images=10).table
    assert list(t.columns) == ["image", "path", "root", "identity", "partition"]
    assert (t["partition"] == -1).all() and (t["identity"] > 0).all()
    with pytest.raises(ValueError, match="without the partition file"):
        split(t, 0)


def test_several_roots_first_wins(celeba_root, celeba_half_root):
    full = set(os.listdir(celeba_root / "img_align_celeba"))
    half = set(os.listdir(celeba_half_root / "img_align_celeba"))
    both = full & half
    assert both, "the shared sample is expected to overlap"
    data = load_celeba([celeba_root, celeba_half_root])
    t = data.table
    assert len(t) == len(full | half) and t["image"].is_unique
    roots = dict(zip(t["image"], t["root"]))
    assert {roots[n] for n in both} == {str(celeba_root.resolve())}
    assert data.report[str(celeba_half_root.resolve())].duplicates == len(both)
    flipped = load_celeba([celeba_half_root, celeba_root]).table
    roots = dict(zip(flipped["image"], flipped["root"]))
    assert {roots[n] for n in both} == {str(celeba_half_root.resolve())}


def test_half_root_alone_names_what_is_missing(celeba_half_root):
    with pytest.raises(FileNotFoundError) as e:
        load_celeba(celeba_half_root)
    msg = str(e.value)
    assert str(celeba_half_root.resolve()) in msg and "identity_CelebA.txt" in msg


# ---------------------------------------------------------------------------------------------------
# CSV variants, written from the real rows of a subset


def _link_images(src_root: Path, dst_root: Path, names: list[str]) -> None:
    d = dst_root / "img_align_celeba"
    d.mkdir(parents=True)
    for n in names:
        (d / n).symlink_to(src_root / "img_align_celeba" / n)


def test_csv_variants_match_txt(tmp_path, celeba, celeba_root):
    present = list(celeba.table["image"].iloc[::60])  # 100 images on disk
    missing = ["000001.jpg", "000003.jpg"]  # annotated, not in the sample
    assert not set(missing) & set(celeba.table["image"])
    names = sorted(present + missing)
    raw = _raw_rows(celeba_root, names)
    root = tmp_path / "kaggle"
    _link_images(celeba_root, root, present)
    attr_csv = "image_id," + ",".join(ATTRIBUTES) + "\n"
    attr_csv += "".join(n + "," + ",".join(map(str, raw[n]["attrs"])) + "\n" for n in names)
    (root / "list_attr_celeba.csv").write_text(attr_csv)
    part_csv = "image_id,partition\n" + "".join(f"{n},{raw[n]['partition']}\n" for n in names)
    with zipfile.ZipFile(root / "list_eval_partition.csv.zip", "w") as zf:
        zf.writestr("list_eval_partition.csv", part_csv)
    (root / "identity_CelebA.csv").write_text(
        "image_id,identity\r\n" + "".join(f"{n},{raw[n]['identity']}\r\n" for n in names)
    )
    data = load_celeba(root)
    rep = data.report[str(root.resolve())]
    assert (rep.annotated, rep.present, rep.missing) == (len(names), len(present), len(missing))
    expected = celeba.table[celeba.table["image"].isin(present)].reset_index(drop=True)
    cols = ["image", "identity", "partition", *ATTRIBUTES]
    pd.testing.assert_frame_equal(data.table[cols], expected[cols])


def test_lf_crlf_and_zip_read_alike(tmp_path, celeba_root):
    with zipfile.ZipFile(celeba_root / "Anno" / "list_attr_celeba.txt.zip") as zf:
        text = zf.read("list_attr_celeba.txt").decode()
    lines = text.splitlines()[:502]  # count line + names + 500 rows
    lines[0] = "500"
    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lf.write_bytes(("\n".join(lines) + "\n").encode())
    crlf.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    with zipfile.ZipFile(tmp_path / "list_attr_celeba.txt.zip", "w") as zf:
        zf.write(crlf, "list_attr_celeba.txt")
    a, b, c = (read_attributes(p) for p in (lf, crlf, tmp_path / "list_attr_celeba.txt.zip"))
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)
    assert len(a) == 500 and a.index[0] == "000001.jpg" and a.index[-1] == "000500.jpg"
    for line in (lines[2], lines[301]):  # hand-split rows: -1 -> 0, 1 -> 1
        name, *values = line.split()
        assert a.loc[name].tolist() == [1 if v == "1" else 0 for v in values]


# ---------------------------------------------------------------------------------------------------
# errors

_ROWS = [("000001.jpg", 1), ("000002.jpg", 1), ("000003.jpg", 2), ("000004.jpg", 2)]


def _attr_line(name: str, values: list[int]) -> str:
    return name + " " + " ".join(f"{v:2d}" for v in values)


def _small_root(tmp_path: Path, attr_lines: list[str] | None = None, count: int | None = None,
                names_line: str | None = None, identity: str | None = None) -> Path:  # fmt: skip
    root = tmp_path / "small"
    (root / "Anno").mkdir(parents=True)
    (root / "img_align_celeba").mkdir()
    rng = np.random.default_rng(0)
    if attr_lines is None:
        attr_lines = [_attr_line(n, list(rng.choice([-1, 1], size=40))) for n, _ in _ROWS]
    header = [str(len(attr_lines) if count is None else count), names_line or " ".join(ATTRIBUTES) + " "]
    (root / "Anno" / "list_attr_celeba.txt").write_bytes("\r\n".join(header + attr_lines).encode() + b"\r\n")
    (root / "Anno" / "identity_CelebA.txt").write_text(identity or "".join(f"{n} {i}\n" for n, i in _ROWS))
    (root / "Anno" / "list_eval_partition.txt").write_text("".join(f"{n} 0\n" for n, _ in _ROWS))
    return root


def test_small_root_loads(tmp_path):
    root = _small_root(tmp_path)
    data = load_celeba(root)
    assert len(data.table) == 0 and data.report[str(root.resolve())].missing == 4


@pytest.mark.parametrize(
    "row, problem",
    [
        (_attr_line("000003.jpg", [1] * 41), "expected 41 fields"),
        (_attr_line("000003.jpg", [1] * 39), "expected 41 fields"),
        (_attr_line("000003.jpg", [1] * 20 + [0] + [1] * 19), "attribute Male value '0' is not 1 or -1"),
        (_attr_line("000003.jpg", [1] * 39) + " x", "'x' is not an integer"),
        ("", "blank line"),
        (_attr_line("000001.jpg", [1] * 40), "listed twice"),
    ],
)
def test_malformed_attribute_row_names_file_and_line(tmp_path, row, problem):
    lines = [_attr_line(n, [1] * 40) for n, _ in _ROWS]
    lines[2] = row  # file line 5: count, names, then rows
    root = _small_root(tmp_path, attr_lines=lines)
    with pytest.raises(AnnotationError) as e:
        load_celeba(root)
    msg = str(e.value)
    assert "list_attr_celeba.txt" in msg and problem in msg
    assert re.search(r"\bline 5\b|\blines 3 and 5\b", msg), msg


def test_wrong_attribute_count(tmp_path):
    root = _small_root(tmp_path, names_line=" ".join(ATTRIBUTES[:39]))
    with pytest.raises(AnnotationError, match=r"list_attr_celeba\.txt: line 2: expected 40 attribute names, found 39"):
        load_celeba(root)


def test_count_line_mismatch(tmp_path):
    root = _small_root(tmp_path, count=5)
    with pytest.raises(AnnotationError, match=r"list_attr_celeba\.txt: line 1: .*says 5 images.*has 4 rows"):
        load_celeba(root)


def test_bad_identity_and_partition(tmp_path):
    root = _small_root(tmp_path, identity="000001.jpg 1\n000002.jpg\n")
    with pytest.raises(AnnotationError, match=r"identity_CelebA\.txt: line 2: expected 2 fields"):
        load_celeba(root)
    (root / "Anno" / "identity_CelebA.txt").write_text("".join(f"{n} {i}\n" for n, i in _ROWS))
    (root / "Anno" / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 3\n")
    with pytest.raises(AnnotationError, match=r"list_eval_partition\.txt: line 2: partition value '3' is not 0 or 1 or 2"):
        load_celeba(root)


def test_missing_annotation_file(tmp_path):
    root = _small_root(tmp_path)
    (root / "Anno" / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_celeba(root)
    msg = str(e.value)
    assert str(root.resolve()) in msg
    assert "list_eval_partition.txt" in msg and "list_eval_partition.csv" in msg and "Anno/" in msg
    assert "list_attr_celeba" not in msg  # only what is missing
    assert len(load_celeba(root, need_partition=False).table) == 0  # not needed: no error


def test_missing_root_and_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_celeba(tmp_path / "nope")
    root = _small_root(tmp_path)
    (root / "img_align_celeba").rmdir()
    with pytest.raises(FileNotFoundError, match="no img_align_celeba/ folder"):
        load_celeba(root)
