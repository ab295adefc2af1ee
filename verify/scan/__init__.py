"""Scan whole folder trees for enrolled people: one report row per face, and a row for every other file.

    walk.py     walk_files: every entry under the folders, sorted, symlinked folders not followed
    workers.py  WorkerPool: decode (on the CPU also detect, align, embed) in other processes; crash retry
    rows.py     RowBuilder: faces of a batch of files -> matches -> report rows
    journal.py  the resumable journal (<out>.partial.jsonl): open / resume checks, appends
    report.py   COLUMNS, formats, atomic write_report, ScanSummary
    html.py     the HTML page: thumbnails per identity, near-misses, counts, errors (write_html)
    run.py      run_scan, which strings them together

Accounting. Every directory entry that is not a directory gets at least one row:
  status "face"     one row per detected face (face = 0, 1, ... largest first; faces = how many);
  status "no-face"  an image with no face (face = -1, faces = 0);
  status "error"    a file that could not be read, decoded, detected, aligned, embedded or matched
                    (face = -1; `error` says what went wrong, e.g. "corrupt or truncated image data");
  status "skipped"  not a photo: content not recognised as an image (a text file, even if named .jpg),
                    a fifo/socket/device, a symbolic link to a folder (`error` says which).
An empty or truncated image file is an "error", not "skipped": it looks like a photo that is broken.
The report and its journal are never scanned themselves. With `workers=0` everything runs in the
main process; both paths give the same rows (tested). Faces are aligned from the image as shrunk for
detection: for the usual phone photo (~4000 px) a face must be ~100 px wide for its crop not to be
upsampled.
"""

from verify.scan.journal import JOURNAL_KIND, JOURNAL_VERSION, journal_path, read_journal
from verify.scan.report import COLUMNS, FORMATS, STATUSES, ScanSummary, read_report, report_format, write_report
from verify.scan.rows import Matcher, RowBuilder
from verify.scan.run import run_scan
from verify.scan.walk import ScanError, WalkEntry, walk_files
from verify.scan.workers import (
    CRASH_ERROR, FACE_CHUNK, DecodedFile, WorkerPool, decode_file, decode_files, prestart_face_workers,
)

__all__ = [
    "COLUMNS", "CRASH_ERROR", "FACE_CHUNK", "FORMATS", "JOURNAL_KIND", "JOURNAL_VERSION", "STATUSES", "DecodedFile",
    "Matcher", "RowBuilder", "ScanError", "ScanSummary", "WalkEntry", "WorkerPool", "decode_file", "decode_files",
    "journal_path", "prestart_face_workers", "read_journal", "read_report", "report_format", "run_scan", "walk_files",
    "write_report",
]
