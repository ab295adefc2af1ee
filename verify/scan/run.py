"""`run_scan`: walk -> decode (workers) -> detect, align, embed -> match -> journal -> report."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from verify.faces import DEFAULT_MAX_PIXELS, DetectorConfig, FacePipeline

from verify.scan.html import PageOptions, files_dir, write_html
from verify.scan.journal import JOURNAL_KIND, JOURNAL_VERSION, Journal, journal_path, open_journal
from verify.scan.report import COLUMNS, ScanSummary, count_rows, empty_row, report_format, write_report
from verify.scan.rows import Matcher, RowBuilder
from verify.scan.walk import WalkEntry, report_text, walk_files
from verify.scan.workers import FACE_CHUNK, DecodedFile, WorkerPool, analyse_files, plan_face_work

if TYPE_CHECKING:
    from verify.faces import FaceDetector
    from verify.model.file import Embedder

log = logging.getLogger(__name__)

STAGES = ("walk", "start", "decode", "decode_wait", "detect", "align", "embed", "thumbs", "match", "write", "report",
          "html")


def _entries_with_pixels(todo: list[WalkEntry], pool: WorkerPool) -> Iterator[tuple[WalkEntry, DecodedFile]]:
    """Each entry with its decoded file, in walk order; entries the walk decided are not decoded."""
    stream = pool.stream([e.fs_path for e in todo if e.status is None])
    try:
        for entry in todo:
            if entry.status is not None:  # decided by the walk (skipped / error)
                yield entry, DecodedFile(None, status=entry.status, error=entry.error)
                continue
            path, decoded = next(stream)
            if path != entry.fs_path:  # cannot happen: the stream keeps input order
                raise RuntimeError(f"decode stream out of order: {path} for {entry.fs_path}")
            yield entry, decoded
    finally:
        stream.close()  # shuts the worker pool down


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_scan(
    folders: Sequence[str | os.PathLike],
    *,
    embedder: "Embedder",
    matcher: Matcher,
    detector_config: DetectorConfig | None = None,
    out: str | os.PathLike,
    workers: int = 2,
    batch_size: int = 32,
    resume: bool = False,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    detector: "FaceDetector | None" = None,
    face_workers: bool | None = None,
    html: str | os.PathLike | None = None,
    page: PageOptions | None = None,
) -> ScanSummary:
    """Scan `folders` for faces, match each against the gallery via `matcher`, write the report `out`.

    `matcher((F, D) unit embeddings) -> F Match objects`. `detector` overrides `detector_config`
    (pass one to reuse a loaded MTCNN). `face_workers`: detect, align and embed in the worker
    processes (True), in the main process (False), or None: in the workers when both the detector
    and the embedder run on the CPU. `html`: also write the page (verify.scan.html) there, its
    thumbnails cut during the scan (`page` sets its near-miss band). Rows, formats and resuming:
    see verify.scan.
    Raises ScanError when the report or journal exists (without resume), a folder is missing, or
    the journal belongs to another scan.
    """
    _check_sizes(batch_size, workers)
    t_start = time.perf_counter()
    out = Path(out).absolute()
    report_format(out)  # fail on an unknown extension before any work
    html = Path(html).absolute() if html is not None else None
    thumbs_dir = files_dir(html) if html is not None else None
    journal = journal_path(out)
    timers = dict.fromkeys(STAGES, 0.0)
    summary = ScanSummary(report=out)

    folder_list = [os.path.abspath(os.fspath(f)) for f in folders]
    header = {"journal": JOURNAL_KIND, "version": JOURNAL_VERSION, "folders": [report_text(f) for f in folder_list],
              "model": embedder.meta.get("fingerprint"), "columns": list(COLUMNS)}
    done = open_journal(out, header, resume)

    entries = _walk(folder_list, out, html, thumbs_dir, timers, before=[journal])
    summary.resumed = sum(1 for e in entries if e.path in done)
    todo = [e for e in entries if e.path not in done]
    log.info("scan: %d files under %d folder(s), %d to do", len(entries), len(folder_list), len(todo))

    detector_or_config = detector if detector is not None else (detector_config or DetectorConfig())
    images_to_do = any(e.status is None for e in todo)
    pool, rows_for = _start_work(detector, detector_or_config, embedder, matcher, images_to_do, workers, face_workers,
                                 batch_size, max_pixels, thumbs_dir, page, timers, summary)

    writer = Journal(journal).start(header, (r for rows in done.values() for r in rows))
    done.clear()
    _journal_batches(entries, todo, pool, rows_for if images_to_do else None, writer, batch_size, progress, timers,
                     summary, journal)

    t0 = time.perf_counter()
    # The page is written before the journal goes: a failure there loses no rows.
    n_rows = _write_outputs(writer.rows, summary, out, html, page, timers)
    journal.unlink()
    timers["report"] = time.perf_counter() - t0
    return _finish(summary, timers, t_start, n_rows)


def _check_sizes(batch_size: int, workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")


def _walk(folder_list: list[str], out: Path, html: Path | None, thumbs_dir: Path | None, timers: dict[str, float], *,
          before: Sequence[str | os.PathLike] = (), after: Sequence[str | os.PathLike] = ()) -> list[WalkEntry]:
    """Walk `folder_list`, leaving out what the scan writes itself (and `before`, `after`: the journal or
    the index's files); the walk's seconds go to timers["walk"]."""
    t0 = time.perf_counter()
    # Temp files of atomic writes to the report or journal (left by a kill) are not photos; nor is the page.
    ours = [out] + ([html] if html is not None else [])
    stale_tmp = [p.parent / n for p in ours if p.parent.is_dir() for n in os.listdir(p.parent)
                 if n.startswith(f".{p.name}.") and n.endswith(".tmp")]
    thumbs = [str(thumbs_dir / n) for n in os.listdir(thumbs_dir)] if thumbs_dir and thumbs_dir.is_dir() else []
    entries = walk_files(folder_list, exclude=[*ours, *before, *stale_tmp, *thumbs, *after])
    timers["walk"] = time.perf_counter() - t0
    return entries


def _start_work(detector: "FaceDetector | None", detector_or_config: "FaceDetector | DetectorConfig",
                embedder: "Embedder", matcher: Matcher, images_to_do: bool, workers: int, face_workers: bool | None,
                batch_size: int, max_pixels: int, thumbs_dir: Path | None, page: PageOptions | None,
                timers: dict[str, float], summary: ScanSummary) -> tuple[WorkerPool, RowBuilder]:
    """The worker pool (decoding, and detecting, aligning, embedding where the face work runs in the
    workers) and the row builder of the main process."""
    work = plan_face_work(detector_or_config, embedder, workers, face_workers, thumbnails=thumbs_dir is not None) \
        if images_to_do else None
    summary.face_workers = workers if work is not None else 0
    config = detector.config if detector is not None else detector_or_config
    decode_args = (max_pixels, config.max_side)  # workers shrink to the detector's size
    if work is not None:
        pool = WorkerPool(workers, batch_size + 2 * workers * FACE_CHUNK, decode_args, timers, task=analyse_files,
                          chunk=FACE_CHUNK, work=work)
    else:
        pool = WorkerPool(workers, batch_size + 2 * workers, decode_args, timers)
    # The main process analyses what the workers only decoded; its detector is built on first use.
    main_detector = detector if detector is not None else (lambda: _detector(detector_or_config))
    rows_for = RowBuilder(FacePipeline(main_detector, embedder=embedder) if images_to_do else None, matcher, timers,
                          thumbs_dir, page)
    return pool, rows_for


def _journal_batches(entries: list[WalkEntry], todo: list[WalkEntry], pool: WorkerPool, rows_for: RowBuilder | None,
                     writer: Journal, batch_size: int, progress: bool, timers: dict[str, float],
                     summary: ScanSummary, journal: Path) -> None:
    """The rows of `todo`, batch by batch, appended to the journal (`rows_for` None: no image to analyse,
    only walk-decided rows). Closes the pool, the journal writer and the progress bar."""
    from tqdm import tqdm

    bar = tqdm(total=len(entries), initial=len(entries) - len(todo), unit="file", desc="scan",
               disable=not progress, dynamic_ncols=True, smoothing=0.1)
    items = _entries_with_pixels(todo, pool)
    try:
        for batch in _batches(items, batch_size):
            file_rows = rows_for(batch) if rows_for is not None else [
                [empty_row(e.path, d.status or "error", d.error)] for e, d in batch]
            t = time.perf_counter()
            writer.append(r for rows in file_rows for r in rows)  # one write + fsync per batch
            timers["write"] += time.perf_counter() - t
            summary.processed += len(batch)
            summary.images_processed += sum(d.decoded for _, d in batch)
            bar.update(len(batch))
    except KeyboardInterrupt:
        log.warning("scan interrupted: rows so far are in %s; run again with resume to continue", journal)
        raise
    finally:
        items.close()
        pool.close()
        writer.close()
        bar.close()


def _write_outputs(rows: Callable[[], Iterable[dict]], summary: ScanSummary, out: Path, html: Path | None,
                   page: PageOptions | None, timers: dict[str, float]) -> int:
    """Write the report `out` of `rows()` (counted into `summary`), then the page `html`; returns the
    report's row count."""
    n_rows = write_report(count_rows(summary, rows()), out)
    if html is not None:
        t1 = time.perf_counter()
        write_html(rows(), html, options=page, source=str(out))
        timers["html"] = time.perf_counter() - t1
    return n_rows


def _detector(config: DetectorConfig) -> "FaceDetector":
    from verify.faces import FaceDetector

    return FaceDetector(config)


def _finish(summary: ScanSummary, timers: dict[str, float], t_start: float, n_rows: int) -> ScanSummary:
    summary.seconds = time.perf_counter() - t_start
    summary.images_per_s = summary.images_processed / summary.seconds if summary.seconds > 0 else 0.0
    summary.stage_seconds = {k: round(v, 4) for k, v in timers.items()}
    log.info("scan done: %d files, %d images, %d faces, %d matches, %d without a face, %d errors, %d skipped "
             "(%d rows) -> %s in %.1f s", summary.files, summary.images, summary.faces, summary.matches,
             summary.no_face, summary.errors, summary.skipped, n_rows, summary.report, summary.seconds)
    return summary
