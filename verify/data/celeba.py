"""Read a CelebA download (complete or partial) into one table.

A root is laid out as released: `img_align_celeba/*.jpg` plus the annotation files, either in `Anno/`
(or `Eval/` for the partition file) or at the root itself:

- `list_attr_celeba.txt`: a count line, a line with the 40 attribute names, then `name  1 -1 ...`;
- `identity_CelebA.txt`: `name id`;
- `list_eval_partition.txt`: `name 0|1|2` (0 train, 1 validation, 2 test);

or the widely used CSV variants (`list_attr_celeba.csv` with an `image_id` column,
`list_eval_partition.csv`, `identity_CelebA.csv`), and any of these as a `.zip` holding that one file.

Only annotated images that exist on disk are used: a partial download is normal, so missing images are
counted and logged, not an error. Several roots combine; an image name found in two roots is kept
once, from the first root that has it. A root without its own annotation files (e.g. a resized copy of
the images) uses those of the first other root that has them: CelebA's annotations are global.
"""

from __future__ import annotations

import io
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)  # fmt: skip

PARTITIONS = {"train": 0, "val": 1, "test": 2}
IMAGE_DIR = "img_align_celeba"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# kind -> base file name (without .txt / .csv)
_STEMS = {"attributes": "list_attr_celeba", "identity": "identity_CelebA", "partition": "list_eval_partition"}
_SUBDIRS = ("Anno", "Eval", "")


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and, where it applies, the line."""


@dataclass(frozen=True)
class RootReport:
    """What one root contributed. `present` counts annotated images found on disk, `duplicates` those
    of them already taken from an earlier root, `unannotated` image files with no annotation row."""

    root: str
    annotated: int
    present: int
    missing: int
    duplicates: int = 0
    unannotated: int = 0


@dataclass
class CelebA:
    """`table` columns: image, path (absolute), root, identity (int, -1 if not loaded), partition
    (0/1/2, -1 if not loaded), then the 40 attributes as uint8 0/1 (absent if not loaded).
    Rows are sorted by image name."""

    table: pd.DataFrame
    report: dict[str, RootReport] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(a for a in ATTRIBUTES if a in self.table.columns)


# ---------------------------------------------------------------------------------------------------
# finding and reading the files


def _file_names(kind: str) -> list[str]:
    stem = _STEMS[kind]
    return [f"{stem}.txt", f"{stem}.csv", f"{stem}.txt.zip", f"{stem}.csv.zip", f"{stem}.zip"]


def _candidates(root: Path, kind: str) -> list[Path]:
    return [root / sub / name if sub else root / name for sub in _SUBDIRS for name in _file_names(kind)]


def find_annotation(root: Path, kind: str) -> Path | None:
    """The first annotation file of `kind` in `root` (Anno/, Eval/, then the root), or None."""
    for p in _candidates(root, kind):
        if p.is_file():
            return p
    return None


def _read_bytes(path: Path) -> tuple[bytes, str, str]:
    """(content, format 'txt'|'csv', label for messages). A .zip must hold one annotation file."""
    if path.suffix.lower() != ".zip":
        return path.read_bytes(), ("csv" if path.suffix.lower() == ".csv" else "txt"), str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if not m.endswith("/") and not m.startswith("__MACOSX")]
            if len(members) != 1:
                raise AnnotationError(f"{path}: expected one file in the zip, found {len(members)}: {members[:5]}")
            member = members[0]
            data = zf.read(member)
    except zipfile.BadZipFile as e:
        raise AnnotationError(f"{path}: not a readable zip file ({e})") from e
    fmt = "csv" if member.lower().endswith(".csv") else "txt"
    return data, fmt, f"{path}!{member}"


_LINE_RE = re.compile(r"line (\d+), saw (\d+)")


def _parse_table(data: bytes, fmt: str, label: str, n_values: int, first_line: int) -> pd.DataFrame:
    """Headerless rows `name v1 .. vn` -> DataFrame with columns 0..n (column 0 the name, str).

    `first_line` is the file line number of the first row (the header lines were split off).
    Too many fields are caught by pandas' tokenizer, too few show up as NaN in `_values`.
    """
    names = list(range(n_values + 1))
    if not data.strip():  # a header and no rows
        return pd.DataFrame({c: pd.Series([], dtype=object if c == 0 else np.int64) for c in names})
    data = data.rstrip() + b"\n"  # trailing blank lines are harmless, blank lines inside are not
    kw = dict(header=None, skip_blank_lines=False, dtype={0: object}, names=names)
    kw["sep"] = "," if fmt == "csv" else r"\s+"
    try:
        df = pd.read_csv(io.BytesIO(data), engine="c", **kw)
    except pd.errors.ParserError as e:
        m = _LINE_RE.search(str(e))
        if m is None:
            raise AnnotationError(f"{label}: cannot parse ({e})") from e
        line = int(m.group(1)) + first_line - 1
        raise AnnotationError(
            f"{label}: line {line}: expected {n_values + 1} fields (name + {n_values} values), found {m.group(2)}"
        ) from e
    return df


def _values(
    df: pd.DataFrame, label: str, first_line: int, allowed: tuple[int, ...] | None, what: str,
    columns: Sequence[str] | None = None,
) -> np.ndarray:
    """The value columns as int64 (N, n); the first blank, short or bad row is an error with its line."""
    if df[0].isna().any():
        i = int(np.flatnonzero(df[0].isna().to_numpy())[0])
        raise AnnotationError(f"{label}: line {first_line + i}: blank line")
    cols = df.columns[1:]
    if all(pd.api.types.is_integer_dtype(df[c].dtype) for c in cols):
        ints = df[cols].to_numpy(dtype=np.int64)  # (N, n): the usual case, already clean
    else:
        numeric = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)  # (N, n)
        bad = np.isnan(numeric)
        if bad.any():
            i, j = map(int, np.argwhere(bad)[0])
            raw = df.iat[i, j + 1]
            if pd.isna(raw):
                found = int(df.iloc[i].notna().sum())
                raise AnnotationError(
                    f"{label}: line {first_line + i}: expected {len(cols) + 1} fields (name + {len(cols)} values),"
                    f" found {found}"
                )
            raise AnnotationError(f"{label}: line {first_line + i}: {_what(what, columns, j)} value '{raw}' is not an integer")
        ints = numeric.astype(np.int64)
        if (ints != numeric).any():
            i, j = map(int, np.argwhere(ints != numeric)[0])
            raise AnnotationError(
                f"{label}: line {first_line + i}: {_what(what, columns, j)} value '{df.iat[i, j + 1]}' is not an integer"
            )
    if allowed is not None:
        ok = np.zeros(ints.shape, dtype=bool)
        for a in allowed:  # a few comparisons beat np.isin's sort on 8M values
            ok |= ints == a
        if not ok.all():
            i, j = map(int, np.argwhere(~ok)[0])
            expect = " or ".join(str(a) for a in allowed)
            raise AnnotationError(
                f"{label}: line {first_line + i}: {_what(what, columns, j)} value '{df.iat[i, j + 1]}' is not {expect}"
            )
    return ints


def _what(what: str, columns: Sequence[str] | None, j: int) -> str:
    return f"{what} {columns[j]}" if columns is not None else what


def _check_unique(names: pd.Series, label: str, first_line: int) -> None:
    dup = names.duplicated(keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)
        first = names.iloc[rows[0]]
        lines = [first_line + int(r) for r in rows if names.iloc[r] == first][:2]
        raise AnnotationError(f"{label}: image {first} is listed twice (lines {lines[0]} and {lines[1]})")


def _split_head(data: bytes, n: int, label: str) -> tuple[list[str], bytes]:
    """The first n lines (decoded, stripped) and the rest of the bytes."""
    parts = data.split(b"\n", n)
    if len(parts) < n or (len(parts) == n and not parts[-1].strip()):
        raise AnnotationError(f"{label}: file ends after {len(parts) - 1} line(s), expected {n} header line(s)")
    if len(parts) == n:  # the header without a final newline: no rows
        parts.append(b"")
    head = [p.decode("utf-8-sig", errors="replace").strip() for p in parts[:n]]
    return head, parts[n]


def read_attributes(path: str | Path) -> pd.DataFrame:
    """`list_attr_celeba.txt`/`.csv` (or zipped) -> DataFrame indexed by image, 40 uint8 0/1 columns in
    official order (-1 -> 0)."""
    data, fmt, label = _read_bytes(Path(path))
    if fmt == "txt":
        (count_line, names_line), body = _split_head(data, 2, label)
        try:
            count = int(count_line)
        except ValueError:
            raise AnnotationError(f"{label}: line 1: expected the image count, found {count_line[:40]!r}") from None
        names = names_line.split()
        names_at, first_line = "line 2", 3
    else:
        (header,), body = _split_head(data, 1, label)
        names = [h.strip() for h in header.split(",")][1:]
        count, names_at, first_line = None, "line 1 (header)", 2
    if len(names) != len(ATTRIBUTES):
        raise AnnotationError(f"{label}: {names_at}: expected {len(ATTRIBUTES)} attribute names, found {len(names)}")
    if set(names) != set(ATTRIBUTES):
        unknown = sorted(set(names) - set(ATTRIBUTES))
        raise AnnotationError(f"{label}: {names_at}: unknown attribute names {unknown[:5]}")
    df = _parse_table(body, fmt, label, len(names), first_line)
    if count is not None and count != len(df):
        raise AnnotationError(f"{label}: line 1: the count line says {count} images but the file has {len(df)} rows")
    values = _values(df, label, first_line, (1, -1), "attribute", names)  # (N, 40)
    _check_unique(df[0], label, first_line)
    out = pd.DataFrame((values > 0).astype(np.uint8), columns=names, index=pd.Index(df[0], name="image"))
    return out[list(ATTRIBUTES)]


def _read_two_columns(path: str | Path, column: str, allowed: tuple[int, ...] | None) -> pd.Series:
    data, fmt, label = _read_bytes(Path(path))
    first_line = 1
    if fmt == "csv":
        (header,), data = _split_head(data, 1, label)
        if len(header.split(",")) != 2:
            raise AnnotationError(f"{label}: line 1 (header): expected 2 columns (image_id,{column}), found {header!r}")
        first_line = 2
    df = _parse_table(data, fmt, label, 1, first_line)
    values = _values(df, label, first_line, allowed, column)[:, 0]
    _check_unique(df[0], label, first_line)
    return pd.Series(values, index=pd.Index(df[0], name="image"), name=column)


def read_identity(path: str | Path) -> pd.Series:
    """`identity_CelebA.txt`/`.csv` -> Series image -> identity (int64)."""
    return _read_two_columns(path, "identity", None)


def read_partition(path: str | Path) -> pd.Series:
    """`list_eval_partition.txt`/`.csv` -> Series image -> 0/1/2 (int64)."""
    return _read_two_columns(path, "partition", (0, 1, 2))


_READERS = {"attributes": read_attributes, "identity": read_identity, "partition": read_partition}
_parsed: dict[tuple, pd.DataFrame | pd.Series] = {}  # (kind, path, size, mtime) -> parsed, per process


def _load_kind(kind: str, path: Path):
    st = path.stat()
    key = (kind, str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _parsed:
        if len(_parsed) >= 12:  # a handful of datasets at most; keep memory bounded
            _parsed.pop(next(iter(_parsed)))
        _parsed[key] = _READERS[kind](path)
    return _parsed[key]


# ---------------------------------------------------------------------------------------------------
# the table


def _image_dir(root: Path) -> Path:
    d = root / IMAGE_DIR
    if (d / IMAGE_DIR).is_dir():  # the Kaggle archive nests the folder in itself
        d = d / IMAGE_DIR
    if not d.is_dir():
        raise FileNotFoundError(f"{root}: no {IMAGE_DIR}/ folder with the images")
    return d


def _resolve_files(roots: list[Path], kinds: list[str]) -> dict[Path, dict[str, Path]]:
    """Per root and kind, its own annotation file, else the first other root's."""
    found = {r: {k: find_annotation(r, k) for k in kinds} for r in roots}
    absent = [k for k in kinds if all(found[r][k] is None for r in roots)]
    if absent:
        where = ", ".join(map(str, roots))
        looked = "; ".join(f"{k}: {', '.join(_file_names(k))}" for k in absent)
        dirs = " and ".join(f"{d}/" for d in _SUBDIRS if d)
        raise FileNotFoundError(
            f"no {', '.join(absent)} annotation file in {where} (looked in {dirs} and the root for {looked})"
        )
    out: dict[Path, dict[str, Path]] = {}
    for r in roots:
        out[r] = {}
        for k in kinds:
            p = found[r][k] or next(found[o][k] for o in roots if found[o][k] is not None)
            if found[r][k] is None:
                log.info("%s has no %s annotation file: using %s", r, k, p)
            out[r][k] = p
    return out


def _annotations(files: dict[str, Path], need_attributes: bool, need_identity: bool, need_partition: bool) -> pd.DataFrame:
    """The inner join of the requested annotation files, indexed by image name."""
    parts: list[pd.DataFrame] = []
    if need_identity:
        parts.append(_load_kind("identity", files["identity"]).to_frame())
    if need_partition:
        parts.append(_load_kind("partition", files["partition"]).to_frame())
    if need_attributes:
        parts.append(_load_kind("attributes", files["attributes"]))
    if not parts:
        raise ValueError("load_celeba: at least one of attributes, identity, partition is needed")
    joined = parts[0]
    for p in parts[1:]:
        joined = joined.join(p, how="inner")
    dropped = max(len(p) for p in parts) - len(joined)
    if dropped:
        log.warning("%d images are listed in some annotation files but not all: skipped", dropped)
    return joined


def load_celeba(
    roots: str | Path | Sequence[str | Path],
    max_images: int | None = None,
    need_attributes: bool = True,
    need_identity: bool = True,
    need_partition: bool = True,
) -> CelebA:
    """Read one or more CelebA roots into a `CelebA` table of the annotated images present on disk.

    The same image name in two roots is kept once: the first root wins. `max_images` keeps the first
    N rows by image name, after the missing-image filter.
    """
    root_list = [roots] if isinstance(roots, (str, Path)) else list(roots)
    if not root_list:
        raise ValueError("load_celeba: no root given")
    paths = [Path(r).expanduser().resolve() for r in root_list]
    for p in paths:
        if not p.is_dir():
            raise FileNotFoundError(f"CelebA root {p} does not exist or is not a folder")
    kinds = [k for k, need in (("attributes", need_attributes), ("identity", need_identity),
                               ("partition", need_partition)) if need]  # fmt: skip
    files = _resolve_files(paths, kinds)

    frames, report, taken = [], {}, pd.Index([], dtype=str)
    for root in paths:
        ann = _annotations(files[root], need_attributes, need_identity, need_partition)
        img_dir = _image_dir(root)
        # names only: os.listdir does not stat, which matters with 200k entries
        on_disk = pd.Index([n for n in os.listdir(img_dir) if n.lower().endswith(IMAGE_SUFFIXES)], dtype=object)
        present_mask = ann.index.isin(on_disk)
        present = ann[present_mask]
        new_mask = ~present.index.isin(taken)
        rows = present[new_mask]
        taken = taken.append(rows.index)
        rep = RootReport(
            root=str(root),
            annotated=len(ann),
            present=int(present_mask.sum()),
            missing=int(len(ann) - present_mask.sum()),
            duplicates=int((~new_mask).sum()),
            unannotated=int((~on_disk.isin(ann.index)).sum()),
        )
        report[str(root)] = rep
        log.info(
            "%s: %d of %d annotated images present, %d missing (a partial download is fine)%s%s",
            root, rep.present, rep.annotated, rep.missing,
            f", {rep.duplicates} already taken from an earlier root" if rep.duplicates else "",
            f", {rep.unannotated} image files without annotations ignored" if rep.unannotated else "",
        )  # fmt: skip
        t = rows.reset_index()
        prefix = str(img_dir) + os.sep
        t.insert(1, "path", [prefix + n for n in t["image"]])
        t.insert(2, "root", str(root))
        frames.append(t)

    table = pd.concat(frames, ignore_index=True).sort_values("image", kind="stable").reset_index(drop=True)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        table = table.iloc[:max_images].reset_index(drop=True)
    if "identity" not in table.columns:
        table.insert(3, "identity", np.int64(-1))
    if "partition" not in table.columns:
        table.insert(4, "partition", np.int64(-1))
    table["identity"] = table["identity"].astype(np.int64)
    table["partition"] = table["partition"].astype(np.int64)
    table["image"] = table["image"].astype(str)
    cols = ["image", "path", "root", "identity", "partition"] + [a for a in ATTRIBUTES if a in table.columns]
    table = table[cols]
    if table.empty:
        log.warning("no annotated image found on disk under %s", ", ".join(map(str, paths)))
    return CelebA(table=table, report=report)


def split(table: pd.DataFrame, partition: int | str) -> pd.DataFrame:
    """The rows of one official partition: 0/'train', 1/'val', 2/'test'."""
    p = PARTITIONS.get(partition, partition) if isinstance(partition, str) else partition
    if p not in (0, 1, 2):
        raise ValueError(f"unknown partition {partition!r}: use 0/1/2 or train/val/test")
    if (table["partition"] < 0).all() and len(table):
        raise ValueError("this table was loaded without the partition file (need_partition=False)")
    return table[table["partition"] == p].reset_index(drop=True)
