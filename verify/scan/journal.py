"""The scan journal, `<out>.partial.jsonl`: rows as they are made, so a killed scan can resume.

JSON lines: a header, then rows, appended one batch at a time with flush + fsync; a file's rows are
always written together and carry `faces`, so a file is complete when face 0..faces-1 (or its one
face=-1 row) are present. When the scan finishes, the report is written from the journal atomically
and the journal is deleted. A kill at any moment therefore leaves either the finished report, or a
journal whose last line may be torn. Resuming drops a torn tail and any file whose rows are
incomplete, and scans only the files not yet reported: no row is lost or duplicated. Without resume,
an existing report or journal is an error (ScanError), never silently overwritten.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator

from verify.atomic import atomic_path

from verify.scan.report import dumps
from verify.scan.walk import ScanError

log = logging.getLogger(__name__)

JOURNAL_KIND = "faceverify-scan-journal"
JOURNAL_VERSION = 1

Rows = list[dict[str, Any]]


def journal_path(out: str | os.PathLike) -> Path:
    """Where a scan writing `out` keeps its journal while it runs."""
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


def _file_complete(rows: Rows) -> bool:
    if any(r.get("face") == -1 for r in rows):
        return len(rows) == 1
    n = rows[0].get("faces")
    return isinstance(n, int) and sorted(r.get("face") for r in rows) == list(range(n))


def read_journal(path: Path) -> tuple[dict | None, OrderedDict[str, Rows], int]:
    """(header, rows per completed file, number of lines dropped as torn or incomplete)."""
    lines = path.read_bytes().split(b"\n")
    parsed: list[dict | None] = []
    for raw in lines[:-1]:  # the piece after the last newline is torn (or empty)
        try:
            obj = json.loads(raw.decode("utf-8"))
            parsed.append(obj if isinstance(obj, dict) else None)
        except (UnicodeDecodeError, ValueError):
            parsed.append(None)
    dropped = 1 if lines[-1] else 0
    # Garbage at the end is a torn write (or NUL blocks after a crash); in the middle it is damage.
    while parsed and parsed[-1] is None:
        parsed.pop()
        dropped += 1
    if any(p is None for p in parsed):
        bad = next(i for i, p in enumerate(parsed) if p is None) + 1
        raise ScanError(f"{path}: line {bad} is corrupt (not at the end): cannot resume safely; "
                        "move the journal away and scan again")
    if not parsed or parsed[0].get("journal") != JOURNAL_KIND:
        if parsed:
            raise ScanError(f"{path}: not a faceverify scan journal")
        return None, OrderedDict(), dropped
    header, body = parsed[0], parsed[1:]
    if header.get("version", 0) > JOURNAL_VERSION:
        raise ScanError(f"{path}: journal version {header.get('version')} is newer than this faceverify")
    groups: OrderedDict[str, Rows] = OrderedDict()
    for row in body:
        p = row.get("path")
        if not isinstance(p, str):
            raise ScanError(f"{path}: a row without a path: cannot resume safely")
        groups.setdefault(p, []).append(row)
    complete: OrderedDict[str, Rows] = OrderedDict()
    for p, rows in groups.items():
        if _file_complete(rows):
            complete[p] = rows
        else:
            log.warning("%s: rows of %s are incomplete (interrupted write); it will be scanned again", path, p)
            dropped += len(rows)
    return header, complete, dropped


def open_journal(out: Path, header: dict, resume: bool) -> OrderedDict[str, Rows]:
    """Check that a scan writing `out` may start (or resume), and return the rows per file already
    reported by the interrupted scan (empty when starting afresh). Raises ScanError when the report
    or journal exists without `resume`, when the scan is already complete, or when the journal
    belongs to other folders or another model."""
    journal = journal_path(out)
    done: OrderedDict[str, Rows] = OrderedDict()
    if not resume:
        for p, what in ((out, "report"), (journal, "journal of an interrupted scan")):
            if p.exists():
                raise ScanError(f"{p}: a scan {what} already exists; resume it (--resume) or choose another --out")
    elif journal.exists():
        old_header, done, dropped = read_journal(journal)
        if old_header is not None:
            if old_header.get("folders") != header["folders"]:
                raise ScanError(f"{journal}: this journal scans {old_header.get('folders')}, not {header['folders']}; "
                                "resume with the same folders or choose another --out")
            if old_header.get("model") != header["model"]:
                raise ScanError(f"{journal}: this journal was written with model {old_header.get('model')}, not "
                                f"{header['model']}; resume with the same model or choose another --out")
        if dropped:
            log.warning("%s: dropped %d torn or incomplete line(s); those files are scanned again", journal, dropped)
        log.info("resuming: %d files already reported in %s", len(done), journal)
    elif out.exists():
        raise ScanError(f"{out}: this scan is already complete (no journal to resume); choose another --out")
    return done


class Journal:
    """Appends rows to the journal, one fsync per batch. `start` (re)writes it atomically first,
    keeping only complete files, so appends continue after a clean line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = None

    def start(self, header: dict, rows: Iterable[dict[str, Any]] = ()) -> "Journal":
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(dumps(header) + "\n")
                for r in rows:
                    f.write(dumps(r) + "\n")
        self.f = open(self.path, "a", encoding="utf-8", newline="\n")
        return self

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(dumps(r) + "\n" for r in rows)
        if text:
            self.f.write(text)
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()

    def rows(self) -> Iterator[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as f:
            next(f)  # header
            for line in f:
                yield json.loads(line)
