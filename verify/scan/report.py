"""The scan report: its columns, formats (by extension) and atomic writing, and the totals over it.

Formats by the extension of `out`: .csv (also the default for no extension), .json (one JSON array of
row objects), .jsonl / .ndjson (JSON lines), .parquet. Distances are cosine distances (1 - the
identity's similarity score); a face matches when its distance is at most its distance threshold.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from verify.atomic import atomic_path

from verify.scan.walk import ScanError, report_text

COLUMNS = (
    "path",  # absolute path as walked (symlinks not resolved)
    "face",  # face index in the photo, largest first; -1 for rows that are not a face
    "faces",  # faces found in the photo (0 for no-face; empty for error/skipped)
    "status",  # face | no-face | error | skipped
    "x1", "y1", "x2", "y2",  # face box in original image pixels (may extend past the edge)
    "prob",  # detector probability
    "quality",  # face quality in (0, 1) (index.quality; faceverify people leaves faces below --min-quality out)
    "identity",  # matched identity, empty when no match
    "nearest",  # best-scoring identity, even when not a match
    "distance",  # cosine distance to `nearest` (1 - identity similarity score)
    "threshold",  # distance threshold of `nearest` (match when distance <= threshold)
    "match",  # True / False for faces; empty otherwise
    "far",  # estimated false-accept rate at this score (when calibrated)
    "threshold_source",  # which estimate set `threshold`: cohort:<source> (hardest source), cohort, model
    "error",  # why a file is an error or skipped
    "note",  # e.g. why a passing face was not counted as a match
)
STATUSES = ("face", "no-face", "error", "skipped")
FORMATS = {"": "csv", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


@dataclass
class ScanSummary:
    """Totals over the whole report (resumed rows included); seconds and rates for this run only."""

    report: Path
    files: int = 0  # files in the report (every row group)
    images: int = 0  # files decoded as images (status face or no-face)
    faces: int = 0
    matches: int = 0
    no_face: int = 0
    errors: int = 0
    skipped: int = 0
    resumed: int = 0  # files taken over from an interrupted scan's journal
    face_workers: int = 0  # worker processes that also detected, aligned and embedded (0: the main process did)
    processed: int = 0  # files processed by this run
    images_processed: int = 0  # images decoded by this run
    seconds: float = 0.0
    images_per_s: float = 0.0  # images_processed / seconds
    stage_seconds: dict[str, float] = field(default_factory=dict)  # work done in workers: summed worker time
    index: dict[str, int] | None = None  # with the library index: files walked, analysed, reused, moved, ...
    engine: dict[str, Any] | None = None  # the Ray engine: start-up seconds, files per node, actor processes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["report"] = str(self.report)
        return d


def report_format(out: str | os.PathLike) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise ScanError(f"{out}: unsupported report format {suffix!r} (use .csv, .json, .jsonl or .parquet)")
    return FORMATS[suffix]


def empty_row(path: str, status: str, error: str | None = None, faces: int | None = None) -> dict[str, Any]:
    """A row that is not a face (face = -1): no-face, error or skipped."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(path=path, face=-1, faces=faces, status=status, error=report_text(error) if error else None)
    return row


def dumps(obj: dict) -> str:
    """One JSON line (the journal's and the JSON reports' encoding)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _csv_value(v: Any) -> Any:
    return "" if v is None else v


def _parquet_schema():
    import pyarrow as pa

    types = {"path": pa.string(), "face": pa.int32(), "faces": pa.int32(), "status": pa.string(),
             "identity": pa.string(), "nearest": pa.string(), "match": pa.bool_(), "error": pa.string(), "threshold_source": pa.string(),
             "note": pa.string()}
    return pa.schema([(c, types.get(c, pa.float64())) for c in COLUMNS])


def write_report(rows: Iterable[dict[str, Any]], out: str | os.PathLike, chunk: int = 10_000) -> int:
    """Write rows (dicts with COLUMNS) to `out` in the format its extension names, atomically."""
    out = Path(out)
    fmt = report_format(out)
    n = 0
    with atomic_path(out) as tmp:
        if fmt == "csv":
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(COLUMNS)
                for r in rows:
                    w.writerow([_csv_value(r.get(c)) for c in COLUMNS])
                    n += 1
        elif fmt in ("json", "jsonl"):
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                if fmt == "json":
                    f.write("[")
                for r in rows:
                    line = dumps({c: r.get(c) for c in COLUMNS})
                    if fmt == "json":
                        f.write(("\n" if n == 0 else ",\n") + line)
                    else:
                        f.write(line + "\n")
                    n += 1
                if fmt == "json":
                    f.write("\n]\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = _parquet_schema()
            with pq.ParquetWriter(tmp, schema) as writer:
                buf: list[dict[str, Any]] = []

                def flush() -> None:
                    writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                    buf.clear()

                for r in rows:
                    buf.append({c: r.get(c) for c in COLUMNS})
                    n += 1
                    if len(buf) >= chunk:
                        flush()
                if buf or n == 0:
                    flush()
    return n


def read_report(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a finished report in any format `write_report` writes, with empty cells as None.
    Raises ScanError (one line, naming the file) for a missing file, another format or other columns."""
    import pandas as pd

    path = Path(path)
    fmt = report_format(path)
    if not path.is_file():
        raise ScanError(f"{path}: report not found")
    try:
        if fmt == "csv":
            df = pd.read_csv(path, dtype={"path": str, "identity": str, "nearest": str, "error": str, "note": str},
                             keep_default_na=False, na_values=[""])
        elif fmt == "parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_json(path, lines=fmt == "jsonl", orient="records", dtype=False)
    except Exception as exc:
        raise ScanError(f"{path}: cannot read this report ({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    missing = [c for c in ("path", "face", "status") if c not in df.columns]
    if missing:
        raise ScanError(f"{path}: not a faceverify scan report (no column {missing[0]!r})")
    df = df.reindex(columns=list(COLUMNS))
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    for r in rows:
        for k in ("face", "faces"):
            if r[k] is not None:
                r[k] = int(r[k])
        if isinstance(r["match"], str):  # CSV spells booleans out
            r["match"] = {"True": True, "False": False}.get(r["match"])
        elif r["match"] is not None:
            r["match"] = bool(r["match"])
    return rows


def count_rows(summary: ScanSummary, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pass rows through while adding them up in `summary`."""
    last = None
    for r in rows:
        if r["path"] != last:
            last = r["path"]
            summary.files += 1
            st = r["status"]
            summary.images += st in ("face", "no-face")
            summary.no_face += st == "no-face"
            summary.errors += st == "error"
            summary.skipped += st == "skipped"
        summary.faces += r["status"] == "face"
        summary.matches += bool(r.get("match"))
        yield r
