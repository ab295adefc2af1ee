"""Scan whole folder trees for enrolled people: one report row per face, and a row for every other file.

Pipeline: walk -> decode -> detect (MTCNN, batched) -> align -> embed (batched) -> match (the
caller's matcher; verify/ never imports index/) -> append rows to a journal -> report.

Where the work runs. On the CPU (detector and embedder both there, the default without a GPU) each
of the `workers` processes decodes, detects, aligns and embeds chunks of FACE_CHUNK files with one
torch thread (several single-threaded processes use small convolutions better than one process
with several threads), and the main process only matches, writes and reports. Face workers are
forked from a fork server that has imported torch once (never a fork of the scan process itself).
With a GPU, the workers only decode and the main process detects and embeds in batches of
`batch_size` images. Both paths give the same rows (tested).

Walking. Each folder is walked recursively in sorted order (names sorted per directory, files of a
directory before its subdirectories), so two scans of the same tree list the same files in the same
order. Symbolic links to folders are NOT followed (that rules out symlink loops and double counting);
each gets a "skipped" row saying so. Symbolic links to files are read like files. A folder argument
that is a file is scanned as that one file; files reached twice (overlapping folders) are reported once.
The report and its journal are never scanned themselves.

Accounting. Every directory entry that is not a directory gets at least one row:
  status "face"     one row per detected face (face = 0, 1, ... largest first; faces = how many);
  status "no-face"  an image with no face (face = -1, faces = 0);
  status "error"    a file that could not be read, decoded, detected, aligned, embedded or matched
                    (face = -1; `error` says what went wrong, e.g. "corrupt or truncated image data");
  status "skipped"  not a photo: content not recognised as an image (a text file, even if named .jpg),
                    a fifo/socket/device, a symbolic link to a folder (`error` says which).
An empty or truncated image file is an "error", not "skipped": it looks like a photo that is broken.
At most one face per photo is matched to a given identity: the closest one. Other faces of that photo
that also passed that identity's threshold get match=False, identity empty, and a `note`.

With `workers=0` everything runs in the main process. Images whose longer side exceeds the
detector's `max_side` are shrunk in the worker (antialiased, exactly as the detector would shrink
them; a JPEG at least twice that size is first decoded at 1/2-1/8 scale by libjpeg, several times
faster), so at most a ~1600 px image crosses the process boundary; boxes are mapped back to the
original image's pixel coordinates. Faces are aligned from the shrunk image: for the usual phone
photo (~4000 px) a face must be ~100 px wide for its crop not to be upsampled. A worker that dies
(a decoder crash, the OOM killer) costs only the file it was working on: the in-flight files are
retried one at a time in a fresh pool and the culprit gets an error row. Workers are never forked
from the scan process, and exit when it dies; if they cannot start at all (e.g. a script without an
`if __name__ == "__main__":` guard), the main process does everything, with a warning.

Kill safety and --resume. Rows go first to a journal, `<out>.partial.jsonl` (JSON lines: a header,
then rows), appended one batch at a time with flush + fsync; a file's rows are always written
together and carry `faces`, so a file is complete when face 0..faces-1 (or its one face=-1 row) are
present. When the scan finishes, the report is written from the journal atomically (temp file +
os.replace) and the journal is deleted. A kill at any moment therefore leaves either the finished
report, or a journal of JSON lines whose last line may be torn. `resume=True` reads the journal,
drops a torn tail and any file whose rows are incomplete, and scans only the files not yet reported:
no row is lost or duplicated. Without `resume`, an existing report or journal is an error (ScanError),
never silently overwritten.

Report formats by the extension of `out`: .csv (also the default for no extension), .json (one JSON
array of row objects), .jsonl / .ndjson (JSON lines), .parquet. Columns: see COLUMNS.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import stat
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from verify.faces import DEFAULT_MAX_PIXELS, DetectorConfig, Face, ImageLoadError, align, load_for_detection

if TYPE_CHECKING:  # torch stays out of the decode workers: they import this module
    from verify.faces import FaceDetector
    from verify.model_file import Embedder
    from verify.scoring import Match

log = logging.getLogger(__name__)

COLUMNS = (
    "path",  # absolute path as walked (symlinks not resolved)
    "face",  # face index in the photo, largest first; -1 for rows that are not a face
    "faces",  # faces found in the photo (0 for no-face; empty for error/skipped)
    "status",  # face | no-face | error | skipped
    "x1", "y1", "x2", "y2",  # face box in original image pixels (may extend past the edge)
    "prob",  # detector probability
    "identity",  # matched identity, empty when no match
    "nearest",  # best-scoring identity, even when not a match
    "distance",  # cosine distance to `nearest` (1 - identity score)
    "threshold",  # distance threshold of `nearest`
    "match",  # True / False for faces; empty otherwise
    "far",  # estimated false-accept rate at this score (when calibrated)
    "error",  # why a file is an error or skipped
    "note",  # e.g. why a passing face was not counted as a match
)
STATUSES = ("face", "no-face", "error", "skipped")
JOURNAL_KIND = "faceverify-scan-journal"
JOURNAL_VERSION = 1
FORMATS = {"": "csv", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
STAGES = ("walk", "start", "decode", "decode_wait", "detect", "align", "embed", "match", "write", "report")


class ScanError(RuntimeError):
    """A scan that cannot start or resume; the message is one line meant for the user."""


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["report"] = str(self.report)
        return d


# --------------------------------------------------------------------------------------------
# Paths, formats
# --------------------------------------------------------------------------------------------


def journal_path(out: str | os.PathLike) -> Path:
    """Where a scan writing `out` keeps its journal while it runs."""
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


def report_format(out: str | os.PathLike) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise ScanError(f"{out}: unsupported report format {suffix!r} (use .csv, .json, .jsonl or .parquet)")
    return FORMATS[suffix]


def _text(s: str) -> str:
    """File names need not be valid UTF-8 (they arrive as surrogate escapes); reports must be:
    an undecodable byte is shown as a backslash escape of that byte (b"\xe9" -> "\\xe9")."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(s).decode("utf-8", "backslashreplace")
    except UnicodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Walking
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    path: str  # the report's path string (absolute, UTF-8 safe)
    fs_path: str  # what to open
    status: str | None = None  # set when the walk already decides the row (skipped / error)
    error: str | None = None


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _classify(fs_path: str) -> tuple[str | None, str | None]:
    """(status, error) decided without opening the file, or (None, None) for a file to decode."""
    try:
        st = os.stat(fs_path)  # follows symlinks
    except OSError as exc:
        if os.path.islink(fs_path):
            return "error", "broken symbolic link"
        return "error", f"cannot read file ({exc.strerror or _one_line(exc)})"
    if stat.S_ISDIR(st.st_mode):
        return "skipped", "symbolic link to a folder (not followed)"
    if not stat.S_ISREG(st.st_mode):
        return "skipped", f"not a regular file ({_kind_of(st.st_mode)})"  # a fifo would block a reader
    return None, None


def walk_files(folders: Sequence[str | os.PathLike], exclude: Iterable[str | os.PathLike] = ()) -> list[_Entry]:
    """Every entry to report under `folders`, in deterministic (sorted, top-down) order."""
    excluded = {os.path.abspath(p) for p in exclude}
    seen: set[str] = set()
    entries: list[_Entry] = []

    def add(fs_path: str, status: str | None = None, error: str | None = None) -> None:
        if fs_path in seen or fs_path in excluded:
            return
        seen.add(fs_path)
        if status is None:
            status, error = _classify(fs_path)
        entries.append(_Entry(_text(fs_path), fs_path, status, error))

    for folder in folders:
        top = os.path.abspath(os.fspath(folder))
        if not os.path.isdir(top):
            if os.path.lexists(top):
                add(top)  # a file given directly
                continue
            raise ScanError(f"{folder}: no such folder")

        def unreadable(exc: OSError) -> None:
            name = exc.filename if isinstance(exc.filename, str) else top
            add(os.path.abspath(name), "error", f"cannot list folder ({exc.strerror or _one_line(exc)})")

        for root, dirs, names in os.walk(top, followlinks=False, onerror=unreadable):
            linked = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            dirs[:] = sorted(d for d in dirs if d not in linked)  # walk real subfolders, sorted
            for name in sorted(names + linked):
                add(os.path.join(root, name))
    return entries


# --------------------------------------------------------------------------------------------
# Decoding and face analysis (in worker processes)
# --------------------------------------------------------------------------------------------


@dataclass
class _Decoded:
    image: np.ndarray | None  # (h, w, 3) uint8, shrunk to max_side; dropped once the faces are analysed
    scale: tuple[float, float] = (1.0, 1.0)  # original pixels per shrunk pixel (x, y)
    status: str | None = None  # None: fine so far; "error" / "skipped" otherwise
    error: str | None = None
    seconds: float = 0.0  # decode time
    decoded: bool = False  # the file was decoded as an image (an analysis error may follow)
    faces: list[Face] | None = None  # set once detected (largest first)
    embeddings: np.ndarray | None = None  # (F, D), one per face, set once embedded
    stage_seconds: dict[str, float] = field(default_factory=dict)  # analysis time spent on this file (share)


def _decode(fs_path: str, max_pixels: int, max_side: int) -> _Decoded:
    t0 = time.perf_counter()
    try:
        # Shrunk to the detector's size exactly as FaceDetector._prepare would (so it does not resize
        # again); big JPEGs are decoded at a reduced scale directly.
        image, scale = load_for_detection(fs_path, max_side, max_pixels=max_pixels)  # (h, w, 3)
    except ImageLoadError as exc:
        status = "skipped" if isinstance(exc.__cause__, UnidentifiedImageError) else "error"
        return _Decoded(None, status=status, error=exc.problem, seconds=time.perf_counter() - t0)
    except MemoryError:
        return _Decoded(None, status="error", error="out of memory while decoding", seconds=time.perf_counter() - t0)
    except Exception as exc:  # a decoder bug must cost one file, not the scan
        return _Decoded(None, status="error", error=f"cannot decode image ({_one_line(exc)})",
                        seconds=time.perf_counter() - t0)
    return _Decoded(image, scale, seconds=time.perf_counter() - t0, decoded=True)


def _decode_files(fs_paths: list[str], max_pixels: int, max_side: int) -> list[_Decoded]:
    """The task of a decode-only worker: decode a chunk of files."""
    return [_decode(p, max_pixels, max_side) for p in fs_paths]


@dataclass
class _FaceWork:
    """What a face worker needs to detect, align and embed on its own (sent once, at start-up)."""

    detector_config: DetectorConfig
    embedder: "Embedder"  # on the CPU
    threads: int = 1


_WORKER: dict[str, Any] = {}  # per worker process: the detector and embedder of a face worker


def _worker_init(work: _FaceWork | None = None) -> None:
    # If the scan is killed (SIGKILL), its workers would wait on their task queue forever: exit
    # as soon as the parent process is gone.
    parent = mp.parent_process()
    if parent is not None:
        def watch() -> None:
            mp.connection.wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    if work is not None:
        import torch

        from verify.faces import FaceDetector

        # One thread per worker: several single-threaded processes get more out of the cores than
        # one process whose small convolutions are split over threads.
        torch.set_num_threads(work.threads)
        _WORKER.update(detector=FaceDetector(work.detector_config), embedder=work.embedder)


def _analyse_files(fs_paths: list[str], max_pixels: int, max_side: int) -> list[_Decoded]:
    """The task of a face worker: decode, detect, align and embed a chunk of files (matching stays
    in the main process, which holds the gallery)."""
    items = _decode_files(fs_paths, max_pixels, max_side)
    timers = dict.fromkeys(("detect", "align", "embed"), 0.0)
    _analyse(lambda: _WORKER["detector"], _WORKER["embedder"], items, timers)
    share = {k: v / len(items) for k, v in timers.items()}
    for d in items:
        d.stage_seconds = dict(share)
    return items


CRASH_ERROR = "its worker process died while reading it (a decoder or detector crash, or out of memory)"
FORKSERVER_PRELOAD = ["verify.scan", "torch", "facenet_pytorch", "verify.faces", "verify.model_file"]


def _face_worker_context() -> mp.context.BaseContext:
    if "forkserver" not in mp.get_all_start_methods():  # e.g. Windows: spawn (each worker imports torch)
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # only takes effect before the server starts
    return ctx


def prestart_face_workers() -> None:
    """Start the face workers' fork server now (it imports torch in the background), so that its
    start-up overlaps with the caller loading the model. Optional: run_scan starts it when needed."""
    try:
        _face_worker_context()
        from multiprocessing import forkserver

        forkserver.ensure_running()
    except Exception as exc:  # e.g. a platform without fork: run_scan falls back by itself
        log.debug("fork server not started early (%s)", _one_line(exc))


def _chunks(paths: Iterable[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for p in paths:
        chunk.append(p)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decode_stream(
    paths: Iterable[str],
    workers: int,
    window: int,
    args: tuple,
    timers: dict[str, float],
    task: Callable[..., list[_Decoded]] = _decode_files,
    chunk: int = 1,
    work: _FaceWork | None = None,
) -> Iterator[tuple[str, _Decoded]]:
    """(path, decoded) in input order; at most about `window` files in flight ahead of the consumer.

    `task(paths, *args)` runs in the workers on chunks of `chunk` files (`work` sets the workers
    up); with no workers, or workers that cannot start, files are decoded in this process instead
    (decoding only: the caller analyses what comes back without faces).
    """
    def account(d: _Decoded) -> None:
        timers["decode"] += d.seconds
        for k, v in d.stage_seconds.items():
            timers[k] += v

    if workers <= 0:
        for p in paths:
            d = _decode(p, *args)
            account(d)
            timers["decode_wait"] += d.seconds
            yield p, d
        return

    # Never a plain fork of this process (it may hold torch threads or CUDA). Face workers come from
    # a fork server that has imported torch once: each worker then starts in ~0.5 s, not ~3 s.
    ctx = _face_worker_context() if work is not None else mp.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor | None:
        t0 = time.perf_counter()
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(work,))
        try:
            pool.submit(os.getpid).result()  # a pool that cannot even start must not cost every file
            timers["start"] = timers.get("start", 0.0) + time.perf_counter() - t0
            return pool
        except Exception as exc:
            pool.shutdown(wait=False, cancel_futures=True)
            log.warning("worker processes do not start (%s); the main process does all the work instead "
                        "(a script that starts a scan needs an `if __name__ == \"__main__\":` guard)",
                        _one_line(exc))
            return None

    pool = new_pool()
    if pool is None:
        yield from _decode_stream(paths, 0, window, args, timers)
        return
    pending: deque = deque()  # (paths of a chunk, future)
    source = _chunks(paths, chunk)
    in_flight = 0
    try:
        while True:
            while in_flight < window:
                c = next(source, None)
                if c is None:
                    break
                try:
                    fut = pool.submit(task, c, *args)
                except BrokenProcessPool as exc:  # a worker died since the last submit: an earlier
                    fut = Future()  # chunk's future fails too, and the retry below covers this one
                    fut.set_exception(exc)
                pending.append((c, fut))
                in_flight += len(c)
            if not pending:
                return
            c, fut = pending.popleft()
            in_flight -= len(c)
            t0 = time.perf_counter()
            try:
                got = fut.result()
                if len(got) != len(c):
                    raise RuntimeError(f"worker returned {len(got)} results for {len(c)} files")
            except BrokenProcessPool:
                # Some in-flight file killed a worker; which one is unknown: retry them one by one.
                retry = c + [q for cc, _ in pending for q in cc]
                pending.clear()
                in_flight = 0
                pool.shutdown(wait=False, cancel_futures=True)
                log.warning("a worker process died; retrying %d in-flight files one at a time", len(retry))
                for q in retry:
                    pool = pool or new_pool()
                    t0 = time.perf_counter()
                    if pool is None:
                        d = _decode(q, *args)
                    else:
                        try:
                            d = pool.submit(task, [q], *args).result()[0]
                        except BrokenProcessPool:
                            d = _Decoded(None, status="error", error=CRASH_ERROR)
                            pool.shutdown(wait=False, cancel_futures=True)
                            pool = None
                    timers["decode_wait"] += time.perf_counter() - t0
                    account(d)
                    yield q, d
                pool = pool or new_pool()
                if pool is None:
                    yield from _decode_stream((p for cc in source for p in cc), 0, window, args, timers)
                    return
                continue
            except Exception as exc:  # e.g. a result that failed to pickle: decode those files here
                log.warning("a worker task failed (%s); decoding its %d files in the main process", _one_line(exc),
                            len(c))
                got = [_decode(p, *args) for p in c]
            timers["decode_wait"] += time.perf_counter() - t0
            for p, d in zip(c, got):
                account(d)
                yield p, d
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Detection, alignment, embedding (worker or main process), matching and rows (main process)
# --------------------------------------------------------------------------------------------


def _empty_row(path: str, status: str, error: str | None = None, faces: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(path=path, face=-1, faces=faces, status=status, error=_text(error) if error else None)
    return row


def _finite(v: float | None, digits: int) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return round(float(v), digits)


def _to_original(face: Face, scale: tuple[float, float]) -> tuple[float, ...]:
    sx, sy = scale
    x1, y1, x2, y2 = face.box
    if (sx, sy) != (1.0, 1.0):  # pixel-centre convention, as FaceDetector._faces
        x1, x2 = (x1 + 0.5) * sx - 0.5, (x2 + 0.5) * sx - 0.5
        y1, y2 = (y1 + 0.5) * sy - 0.5, (y2 + 0.5) * sy - 0.5
    return tuple(round(v, 2) for v in (x1, y1, x2, y2))


def _one_match_per_identity(rows: list[dict[str, Any]]) -> None:
    """Within one photo keep only the closest face matched to each identity."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["match"]:
            cur = best.get(row["identity"])
            if cur is None or row["distance"] < cur["distance"]:
                best[row["identity"]] = row
    for row in rows:
        if row["match"] and best[row["identity"]] is not row:
            winner = best[row["identity"]]
            row["note"] = f"also passed for {row['identity']}, but face {winner['face']} of this photo is closer"
            row["match"] = False
            row["identity"] = None


def _fail(d: _Decoded, error: str) -> None:
    d.status, d.error, d.faces, d.embeddings, d.image = "error", error, None, None, None


def _detect(detector: "FaceDetector", images: list[np.ndarray]) -> list[list[Face] | str]:
    """Faces per image, or an error message for an image whose detection failed."""
    try:
        found = list(detector.detect(images))
        if len(found) != len(images):
            raise RuntimeError(f"detector returned {len(found)} results for {len(images)} images")
        return found
    except Exception as exc:
        if len(images) > 1:
            log.warning("detection failed for a batch of %d images (%s); retrying one by one",
                        len(images), _one_line(exc))
    out: list[list[Face] | str] = []
    for img in images:
        try:
            out.append(detector.detect([img])[0])
        except Exception as exc:
            out.append(f"face detection failed ({_one_line(exc)})")
    return out


def _analyse(get_detector: Callable[[], "FaceDetector"], embedder: "Embedder", items: list[_Decoded],
             timers: dict[str, float]) -> None:
    """Detect, align and embed the faces of decoded images not analysed yet, in place: each gets
    `faces` and `embeddings` (its image is dropped), or status "error"; a failure costs only its file.
    The detector is asked for only when there is something to detect."""
    todo = [d for d in items if d.status is None and d.faces is None and d.image is not None]
    if not todo:
        return
    detector = get_detector()
    t0 = time.perf_counter()
    detections = _detect(detector, [d.image for d in todo])
    timers["detect"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    crops: list[np.ndarray] = []
    spans: list[tuple[_Decoded, int, int]] = []  # (file, first crop, end) per file with faces
    for d, faces in zip(todo, detections):
        if isinstance(faces, str):
            _fail(d, faces)
            continue
        try:
            pil = Image.fromarray(d.image) if faces else None  # one copy per image, shared by its faces
            file_crops = [align(pil, f.landmarks, embedder.geometry) for f in faces]  # (S, S, 3) each
        except Exception as exc:
            _fail(d, f"face alignment failed ({_one_line(exc)})")
            continue
        d.faces, d.image = faces, None
        d.embeddings = np.zeros((0, embedder.dim), np.float32)
        if file_crops:
            spans.append((d, len(crops), len(crops) + len(file_crops)))
            crops.extend(file_crops)
    timers["align"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    if crops:
        try:
            emb = embedder.embed(np.stack(crops))  # (F, D)
            if emb.shape != (len(crops), embedder.dim):
                raise RuntimeError(f"embedder returned {emb.shape} for {len(crops)} faces")
            for d, a, b in spans:
                d.embeddings = emb[a:b]
        except Exception as exc:
            log.warning("embedding failed for a batch (%s); retrying file by file", _one_line(exc))
            for d, a, b in spans:
                try:
                    d.embeddings = embedder.embed(np.stack(crops[a:b]))
                except Exception as exc2:
                    _fail(d, f"embedding failed ({_one_line(exc2)})")
    timers["embed"] += time.perf_counter() - t0


class _Batcher:
    """Rows for one batch of files: analyses what the workers did not, then matches every face of
    the batch in one call; a failure costs only its file."""

    def __init__(self, detector: "FaceDetector | DetectorConfig", embedder: "Embedder", matcher: Callable,
                 timers: dict[str, float]):
        self._detector = detector  # a config: the detector is built on first use (face workers need none here)
        self.embedder = embedder
        self.matcher = matcher
        self.timers = timers

    def detector(self) -> "FaceDetector":
        if isinstance(self._detector, DetectorConfig):
            from verify.faces import FaceDetector

            self._detector = FaceDetector(self._detector)
        return self._detector

    def _match(self, vectors: np.ndarray) -> list["Match"]:
        t0 = time.perf_counter()
        matches = list(self.matcher(vectors))
        self.timers["match"] += time.perf_counter() - t0
        if len(matches) != len(vectors):
            raise RuntimeError(f"matcher returned {len(matches)} results for {len(vectors)} faces")
        return matches

    def __call__(self, batch: list[tuple[_Entry, _Decoded]]) -> list[list[dict[str, Any]]]:
        """One list of rows per file, in batch order."""
        _analyse(self.detector, self.embedder, [d for _, d in batch], self.timers)
        rows: list[list[dict[str, Any]]] = [[] for _ in batch]
        vectors: list[np.ndarray] = []
        owner: list[int] = []  # batch index per face
        for i, (entry, d) in enumerate(batch):
            if d.status is not None or d.faces is None or d.embeddings is None:
                rows[i] = [_empty_row(entry.path, d.status or "error", d.error or "internal error: not analysed")]
            elif not d.faces:
                rows[i] = [_empty_row(entry.path, "no-face", faces=0)]
            else:
                vectors.append(d.embeddings)
                owner.extend([i] * len(d.faces))
        if not vectors:
            return rows
        try:
            matches: list[Match | None] = list(self._match(np.concatenate(vectors)))
        except Exception as exc:
            log.warning("matching failed for a batch (%s); retrying file by file", _one_line(exc))
            matches = []
            for i in dict.fromkeys(owner):
                d = batch[i][1]
                try:
                    matches.extend(self._match(d.embeddings))
                except Exception as exc2:
                    rows[i] = [_empty_row(batch[i][0].path, "error", f"matching failed ({_one_line(exc2)})")]
                    matches.extend([None] * len(d.faces))
        face_of = {}  # batch index -> next face number
        for i, m in zip(owner, matches):
            k = face_of.get(i, 0)
            face_of[i] = k + 1
            if m is None:  # its file failed
                continue
            entry, d = batch[i]
            face = d.faces[k]
            row = _empty_row(entry.path, "face")
            row["face"] = k
            row["x1"], row["y1"], row["x2"], row["y2"] = _to_original(face, d.scale)
            row["prob"] = _finite(face.prob, 6)
            md = m.to_dict()
            row.update(identity=md["identity"], nearest=md["nearest"], match=bool(md["match"]),
                       distance=_finite(md["distance"], 6), threshold=_finite(md["threshold"], 6),
                       far=_finite(md["far"], 8) if md["far"] is not None else None)
            for key in ("identity", "nearest"):
                if row[key] is not None:
                    row[key] = _text(str(row[key]))
            rows[i].append(row)
        for i in dict.fromkeys(owner):
            if not rows[i]:  # never expected; a file must not vanish from the report
                rows[i] = [_empty_row(batch[i][0].path, "error", "internal error: no result for this file")]
            face_rows = [r for r in rows[i] if r["status"] == "face"]
            for r in face_rows:
                r["faces"] = len(face_rows)
            _one_match_per_identity(face_rows)
        return rows


# --------------------------------------------------------------------------------------------
# Journal
# --------------------------------------------------------------------------------------------


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _file_complete(rows: list[dict[str, Any]]) -> bool:
    if any(r.get("face") == -1 for r in rows):
        return len(rows) == 1
    n = rows[0].get("faces")
    return isinstance(n, int) and sorted(r.get("face") for r in rows) == list(range(n))


def _read_journal(path: Path) -> tuple[dict | None, OrderedDict[str, list[dict[str, Any]]], int]:
    """(header, rows per completed file, number of lines dropped as torn or incomplete)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
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
    groups: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    order: list[str] = []
    for row in body:
        p = row.get("path")
        if not isinstance(p, str):
            raise ScanError(f"{path}: a row without a path: cannot resume safely")
        if p not in groups:
            groups[p] = []
            order.append(p)
        groups[p].append(row)
    complete: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for p in order:
        if _file_complete(groups[p]):
            complete[p] = groups[p]
        else:
            log.warning("%s: rows of %s are incomplete (interrupted write); it will be scanned again", path, p)
            dropped += len(groups[p])
    return header, complete, dropped


class _Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "a", encoding="utf-8", newline="\n")

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(_dumps(r) + "\n" for r in rows)
        if text:
            self.f.write(text)
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _start_journal(path: Path, header: dict, rows: Iterable[dict[str, Any]] = ()) -> None:
    """Write (or rewrite, dropping a torn tail) the journal atomically."""
    from verify.runtime import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(_dumps(header) + "\n")
            for r in rows:
                f.write(_dumps(r) + "\n")


def _iter_journal_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            yield json.loads(line)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _csv_value(v: Any) -> Any:
    return "" if v is None else v


def _parquet_schema():
    import pyarrow as pa

    types = {"path": pa.string(), "face": pa.int32(), "faces": pa.int32(), "status": pa.string(),
             "identity": pa.string(), "nearest": pa.string(), "match": pa.bool_(), "error": pa.string(),
             "note": pa.string()}
    return pa.schema([(c, types.get(c, pa.float64())) for c in COLUMNS])


def write_report(rows: Iterable[dict[str, Any]], out: str | os.PathLike, chunk: int = 10_000) -> int:
    """Write rows (dicts with COLUMNS) to `out` in the format its extension names, atomically."""
    from verify.runtime import atomic_path

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
                    line = _dumps({c: r.get(c) for c in COLUMNS})
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


def _count(summary: ScanSummary, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
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


# --------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------

FACE_CHUNK = 8  # files per face-worker task: MTCNN batches them (one photo at a time costs ~40% more)


def _face_work(detector: "FaceDetector | DetectorConfig", embedder: "Embedder", workers: int,
               face_workers: bool | None) -> _FaceWork | None:
    """What the workers need to analyse faces themselves, or None when the main process does it."""
    if workers <= 0 or face_workers is False:
        return None
    from verify.faces import FaceDetector
    from verify.runtime import resolve_device

    # A GPU stays with the main process (one CUDA context, big batches); a detector object of
    # another type (a test double, a subclass) cannot be rebuilt in a worker from its config.
    why_not = None
    if isinstance(detector, DetectorConfig):
        config, device = detector, resolve_device(detector.device)
    elif type(detector) is FaceDetector:
        config, device = detector.config, detector.device
    else:
        config, device = None, None
        why_not = f"the detector is a {type(detector).__name__}, not a FaceDetector"
    if why_not is None and (device.type != "cpu" or embedder.device.type != "cpu"):
        why_not = "the detector or the embedder runs on a GPU"
    if why_not is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
        return _FaceWork(dataclasses.replace(config, device="cpu"), embedder, threads)
    if face_workers:
        raise ValueError(f"face_workers=True but {why_not}")
    return None


def run_scan(
    folders: Sequence[str | os.PathLike],
    *,
    embedder: "Embedder",
    matcher: Callable[[np.ndarray], list["Match"]],
    detector_config: DetectorConfig | None = None,
    out: str | os.PathLike,
    workers: int = 2,
    batch_size: int = 32,
    resume: bool = False,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    detector: "FaceDetector | None" = None,
    face_workers: bool | None = None,
) -> ScanSummary:
    """Scan `folders` for faces, match each against the gallery via `matcher`, write the report `out`.

    `matcher((F, D) unit embeddings) -> F Match objects`. `detector` overrides `detector_config`
    (pass one to reuse a loaded MTCNN). `face_workers`: detect, align and embed in the worker
    processes (True), in the main process (False), or None: in the workers when both the detector
    and the embedder run on the CPU. See the module docstring for rows, formats and --resume.
    Raises ScanError when the report or journal exists (without resume), a folder is missing, or
    the journal belongs to another scan.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    t_start = time.perf_counter()
    out = Path(out).absolute()
    report_format(out)  # fail on an unknown extension before any work
    journal = journal_path(out)
    timers = dict.fromkeys(STAGES, 0.0)
    summary = ScanSummary(report=out)

    folder_list = [os.path.abspath(os.fspath(f)) for f in folders]
    header = {"journal": JOURNAL_KIND, "version": JOURNAL_VERSION, "folders": [_text(f) for f in folder_list],
              "model": embedder.meta.get("fingerprint"), "columns": list(COLUMNS)}

    done: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    if not resume:
        for p, what in ((out, "report"), (journal, "journal of an interrupted scan")):
            if p.exists():
                raise ScanError(f"{p}: a scan {what} already exists; resume it (--resume) or choose another --out")
    elif journal.exists():
        old_header, done, dropped = _read_journal(journal)
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

    t0 = time.perf_counter()
    # Temp files of atomic writes to the report or journal (left by a kill) are not photos.
    stale_tmp = [out.parent / n for n in os.listdir(out.parent)
                 if n.startswith(f".{out.name}.") and n.endswith(".tmp")] if out.parent.is_dir() else []
    entries = walk_files(folder_list, exclude=[out, journal, *stale_tmp])
    timers["walk"] = time.perf_counter() - t0
    summary.resumed = sum(1 for e in entries if e.path in done)
    todo = [e for e in entries if e.path not in done]
    log.info("scan: %d files under %d folder(s), %d to do", len(entries), len(folder_list), len(todo))

    detector_or_config = detector if detector is not None else (detector_config or DetectorConfig())
    max_side = detector.config.max_side if detector is not None else detector_or_config.max_side
    images_to_do = any(e.status is None for e in todo)
    work = _face_work(detector_or_config, embedder, workers, face_workers) if images_to_do else None
    summary.face_workers = workers if work is not None else 0

    # Rewrite the journal with only the complete files: appends then continue after a clean line.
    _start_journal(journal, header, (r for rows in done.values() for r in rows))
    done.clear()

    from tqdm import tqdm

    bar = tqdm(total=len(entries), initial=len(entries) - len(todo), unit="file", desc="scan",
               disable=not progress, dynamic_ncols=True, smoothing=0.1)
    writer = _Journal(journal)
    stream = None
    try:
        batcher = _Batcher(detector_or_config, embedder, matcher, timers) if images_to_do else None
        decode_paths = (e.fs_path for e in todo if e.status is None)
        if work is not None:
            stream = _decode_stream(decode_paths, workers, batch_size + 2 * workers * FACE_CHUNK,
                                    (max_pixels, max_side), timers, task=_analyse_files, chunk=FACE_CHUNK, work=work)
        else:
            stream = _decode_stream(decode_paths, workers, batch_size + 2 * workers, (max_pixels, max_side), timers)
        batch: list[tuple[_Entry, _Decoded]] = []

        def flush() -> None:
            file_rows = batcher(batch) if batcher is not None else [
                [_empty_row(e.path, d.status or "error", d.error)] for e, d in batch]
            t = time.perf_counter()
            writer.append(r for rows in file_rows for r in rows)  # one write + fsync per batch
            timers["write"] += time.perf_counter() - t
            summary.processed += len(batch)
            summary.images_processed += sum(d.decoded for _, d in batch)
            bar.update(len(batch))
            batch.clear()

        for entry in todo:
            if entry.status is not None:  # decided by the walk (skipped / error): no decoding
                decoded = _Decoded(None, status=entry.status, error=entry.error)
            else:
                path, decoded = next(stream)
                if path != entry.fs_path:  # cannot happen: the stream keeps input order
                    raise RuntimeError(f"decode stream out of order: {path} for {entry.fs_path}")
            batch.append((entry, decoded))
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    except KeyboardInterrupt:
        log.warning("scan interrupted: rows so far are in %s; run again with resume to continue", journal)
        raise
    finally:
        if stream is not None:
            stream.close()  # shuts the worker pool down
        writer.close()
        bar.close()

    t0 = time.perf_counter()
    n_rows = write_report(_count(summary, _iter_journal_rows(journal)), out)
    journal.unlink()
    timers["report"] = time.perf_counter() - t0

    summary.seconds = time.perf_counter() - t_start
    summary.images_per_s = summary.images_processed / summary.seconds if summary.seconds > 0 else 0.0
    summary.stage_seconds = {k: round(v, 4) for k, v in timers.items()}
    log.info("scan done: %d files, %d images, %d faces, %d matches, %d without a face, %d errors, %d skipped "
             "(%d rows) -> %s in %.1f s", summary.files, summary.images, summary.faces, summary.matches,
             summary.no_face, summary.errors, summary.skipped, n_rows, out, summary.seconds)
    return summary
