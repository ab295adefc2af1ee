"""`run_indexed_scan`: the scan that keeps what it found, in the library index (index.library).

Per walked file, against what the index holds for its path:
  unchanged (same size, mtime, ctime, inode; same detector settings)  -> reused: no decode
  stat changed but the same content (sha256)                           -> reused, signature updated
  a new path with the content of a stored file (a moved or renamed
  folder, a copy)                                                      -> faces copied, no decode
  faces stored but not embedded by this model                          -> re-embedded from the stored
                                                                          landmarks: decode, align,
                                                                          embed; no detection
  anything else (new, replaced, other detector settings)               -> decoded, detected, aligned,
                                                                          embedded, stored
Files under the scanned folders that the walk no longer finds are marked gone. Each batch of files is
one SQLite transaction, so the index is the scan's journal: a scan killed at any moment and run again
finishes with the same index as an uninterrupted one. The report is then made from the index for
every walked file (`library_rows`), exactly as `faceverify find` makes it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from index.library import FaceRecord, FileRecord, Library, StoredFile, score_record, walk_order_key
from verify.faces import DEFAULT_MAX_PIXELS, DetectorConfig, Face, FacePipeline

from verify.scan.html import PageOptions, files_dir
from verify.scan.report import ScanSummary, report_format
from verify.scan.rows import Matcher, RowBuilder
from verify.scan.run import STAGES, _batches, _check_sizes, _detector, _finish, _walk, _write_outputs
from verify.scan.walk import WalkEntry, report_text
from verify.scan.workers import (
    FACE_CHUNK, DecodedFile, WorkerPool, sha256_of, analyse_decoded, analyse_files, embed_stored_faces, plan_face_work, reembed_files,
)

if TYPE_CHECKING:
    from verify.faces import FaceDetector
    from verify.identity.decisions import Verdicts
    from verify.scan.ray_engine import RayEngine
    from verify.model.file import Embedder

log = logging.getLogger(__name__)


def detector_key(config: DetectorConfig, max_pixels: int) -> str:
    """The detector settings that decide which faces a file has (not the device or batch size)."""
    return json.dumps({"min_face": config.min_face_size, "min_prob": config.min_prob,
                       "thresholds": list(config.thresholds), "factor": config.factor, "max_side": config.max_side,
                       "max_pixels": max_pixels}, sort_keys=True)


@dataclass
class IndexCounts:
    walked: int = 0
    analysed: int = 0  # decoded, detected, embedded
    reused: int = 0  # unchanged (or the same content), nothing decoded
    moved: int = 0  # a new path with stored content: copied
    reembedded: int = 0  # stored faces embedded with this model
    gone: int = 0


def _record(entry: WalkEntry, d: DecodedFile, detector: str) -> FileRecord:
    size, mtime_ns, ctime_ns, inode = entry.stat or (None, None, None, None)
    rec = FileRecord(entry.path, entry.fs_path, size, mtime_ns, ctime_ns, inode, status="error", sha256=d.sha256,
                     detector=detector)
    if d.status is not None or d.faces is None or d.embeddings is None:
        rec.status, rec.error = d.status or "error", d.error or "internal error: not analysed"
    else:
        rec.status = "face" if d.faces else "no-face"
        signals = d.signals if d.signals is not None and len(d.signals) == len(d.faces) else [None] * len(d.faces)
        rec.faces = [FaceRecord(tuple(float(v) for v in f.box), None if f.prob is None else float(f.prob),
                                np.asarray(f.landmarks, np.float32), quality=None if d.quality is None else d.quality[k],
                                blur=None if s is None else s.blur,
                                outside=None if s is None else s.outside) for k, (f, s) in enumerate(zip(d.faces, signals))]
        rec.embeddings = d.embeddings if d.faces else None
    return rec


def _plan(entries: list[WalkEntry], library: Library, detector: str, model: str, run_id: int,
          counts: IndexCounts) -> tuple[list[WalkEntry], list[StoredFile]]:
    """Decide each entry from the index; return (entries to analyse, stored files to re-embed).
    Walk-decided rows, reused and moved files are written to the index here."""
    stored = library.files(e.path for e in entries)
    known_sizes: set[int] | None = None
    analyse: list[WalkEntry] = []
    decided: list[FileRecord] = []
    keep: list[StoredFile] = []  # files whose stored analysis stands
    for e in entries:
        s = stored.get(e.path)
        if e.status is not None:  # skipped / error decided by the walk: nothing to decode
            if s is None or (s.status, s.error, s.present) != (e.status, e.error, True):
                size, mtime_ns, ctime_ns, inode = e.stat or (None, None, None, None)
                decided.append(FileRecord(e.path, e.fs_path, size, mtime_ns, ctime_ns, inode, e.status, e.error))
            continue
        size = e.stat[0]
        if s is not None and (s.detector == detector or s.status not in ("face", "no-face")):
            if s.same_stat(*e.stat):
                if not s.present:
                    library.touch(s.id, e.stat, run_id)
                keep.append(s)
                counts.reused += 1
                continue
            if s.size == size and s.sha256 is not None and sha256_of(e.fs_path) == s.sha256:
                library.touch(s.id, e.stat, run_id)  # touched, copied back, or its folder renamed and back
                keep.append(s)
                counts.reused += 1
                continue
        if s is None or s.size != size:
            if known_sizes is None:
                known_sizes = library.sizes()
            if size in known_sizes and (sha := sha256_of(e.fs_path)) is not None:
                src = library.same_content(size, sha)
                if src is not None and (src.detector == detector or src.status not in ("face", "no-face")):
                    new_id = library.copy_file(src.id, FileRecord(e.path, e.fs_path, *e.stat, "error"), run_id)
                    keep.append(StoredFile(new_id, e.path, e.fs_path, *e.stat, sha, src.status, src.error, src.faces,
                                           src.detector, True))
                    counts.moved += 1
                    continue
        analyse.append(e)
    if decided:
        library.record(decided, model, run_id)
    with_faces = [s for s in keep if s.status == "face"]
    missing = set(library.missing_embeddings(model, [s.id for s in with_faces]))
    return analyse, [s for s in with_faces if s.id in missing]


def _plan_logged(entries: list[WalkEntry], n_folders: int, library: Library, detector: str, model: str, run_id: int,
                 counts: IndexCounts, timers: dict[str, float]) -> tuple[list[WalkEntry], list[StoredFile]]:
    """`_plan`, timed (timers["plan"]) and told in one log line."""
    t0 = time.perf_counter()
    todo, reembed = _plan(entries, library, detector, model, run_id, counts)
    timers["plan"] = time.perf_counter() - t0
    log.info("scan: %d files under %d folder(s): %d to analyse, %d to re-embed with this model, %d unchanged, "
             "%d moved or copied", len(entries), n_folders, len(todo), len(reembed), counts.reused, counts.moved)
    return todo, reembed


def library_rows(library: Library, files: Sequence[tuple[str, StoredFile | None, WalkEntry | None]],
                 model: str, builder: RowBuilder, batch_size: int = 256,
                 failed: dict[str, str] | None = None) -> Iterator[dict]:
    """Report rows of `files` (report path, stored file or None, walk entry) from the index, matched
    by `builder`'s matcher, in the given order. `failed`: report path -> error for this run only."""
    if builder.verdicts is None:  # the decisions about faces: applied by the builder, last
        from verify.identity.decisions import Verdicts

        builder.verdicts = Verdicts.load(library, model)
    for batch in _batches(iter(files), batch_size):
        ids = [s.id for _, s, _ in batch if s is not None and s.status == "face"]
        faces = library.faces(ids, model) if ids else {}
        items: list[tuple[WalkEntry, DecodedFile]] = []
        for path, s, e in batch:
            entry = e or WalkEntry(path, s.fs_path if s else path)
            if failed and path in failed:
                d = DecodedFile(None, status="error", error=failed[path])
            elif s is None:
                d = DecodedFile(None, status="error", error="internal error: not in the library index")
            elif s.status == "face":
                _, recs, emb = faces.get(s.id, ([], [], None))
                if emb is None or not recs:
                    d = DecodedFile(None, status="error",
                                    error=f"faces not embedded by model {model} (scan this folder with it)")
                else:
                    d = DecodedFile(None, faces=[Face(r.box, r.prob, r.landmarks) for r in recs], embeddings=emb,
                                    sha256=s.sha256,
                                    quality=[r.quality if r.quality is not None else score_record(r) for r in recs])
            elif s.status == "no-face":
                d = DecodedFile(None, faces=[], embeddings=np.zeros((0, 0), np.float32))
            else:
                d = DecodedFile(None, status=s.status, error=s.error)
            items.append((entry, d))
        for rows in builder(items):
            yield from rows


def run_indexed_scan(
    folders: Sequence[str | os.PathLike],
    *,
    library: Library,
    embedder: "Embedder",
    matcher: Matcher,
    out: str | os.PathLike,
    detector_config: DetectorConfig | None = None,
    workers: int = 2,
    batch_size: int = 32,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    detector: "FaceDetector | None" = None,
    face_workers: bool | None = None,
    html: str | os.PathLike | None = None,
    page: PageOptions | None = None,
    wait: float = 0.0,
    engine: "RayEngine | None" = None,
    model_path: str | None = None,
) -> ScanSummary:
    """Bring `library` up to date with `folders` (see the module doc), then write the report `out`
    (and the page `html`) from it. Raises LibraryBusy when another scan writes the index (after
    `wait` seconds), LibraryError when it cannot be written, ScanError for a missing folder.

    `engine`: a connected RayEngine analyses the files to analyse on its actors (`model_path`: the
    model GPU actors load); everything else (walk, plan, index writes, re-embedding, report) stays here."""
    _check_sizes(batch_size, workers)
    t_start = time.perf_counter()
    out = Path(out).absolute()
    report_format(out)
    html = Path(html).absolute() if html is not None else None
    thumbs_dir = files_dir(html) if html is not None else None
    timers = dict.fromkeys((*STAGES, "plan", "reembed"), 0.0)
    summary = ScanSummary(report=out)
    config = detector.config if detector is not None else (detector_config or DetectorConfig())
    det_key = detector_key(config, max_pixels)
    model = embedder.fingerprint
    counts = IndexCounts()

    if engine is not None:
        summary.face_workers = engine.options.workers
    library.acquire(wait)
    try:
        library.ensure_model(model, embedder.dim)
        folder_list = [os.path.abspath(os.fspath(f)) for f in folders]
        db_files = [library.path.with_name(library.path.name + s) for s in ("", "-wal", "-shm", "-journal", ".lock")]
        entries = _walk(folder_list, out, html, thumbs_dir, timers, after=db_files)
        counts.walked = len(entries)
        run_id = library.begin_run([report_text(f) for f in folder_list], model, det_key)

        todo, reembed = _plan_logged(entries, len(folder_list), library, det_key, model, run_id, counts, timers)
        failed: dict[str, str] = {}  # this run's re-embedding failures: reported, the index keeps the faces
        if todo or reembed:
            failed = _analyse_and_reembed(
                todo, reembed, library=library, embedder=embedder, detector=detector, config=config,
                workers=workers, face_workers=face_workers, engine=engine, model_path=model_path,
                batch_size=batch_size, max_pixels=max_pixels, det_key=det_key, model=model, run_id=run_id,
                timers=timers, summary=summary, counts=counts, progress=progress)
        counts.gone = library.mark_gone(folder_list, {e.path for e in entries}, run_id)
        n_rows = _report_from_index(entries, library, model, matcher, failed, summary, out, html, thumbs_dir, page,
                                    timers)
        library.end_run(run_id, vars(counts))
    finally:
        library.release()
    summary.index = vars(counts)
    if engine is not None:
        summary.engine = vars(engine.stats)
    return _finish(summary, timers, t_start, n_rows)


def _analyse_and_reembed(todo: list[WalkEntry], reembed: list[StoredFile], *, library: Library, embedder: "Embedder",
                         detector: "FaceDetector | None", config: DetectorConfig, workers: int,
                         face_workers: bool | None, engine: "RayEngine | None", model_path: str | None,
                         batch_size: int, max_pixels: int, det_key: str, model: str, run_id: int,
                         timers: dict[str, float], summary: ScanSummary, counts: IndexCounts,
                         progress: bool) -> dict[str, str]:
    """Analyse `todo` (on the engine's actors when there is one, else here and in the worker processes)
    and embed the stored faces of `reembed` with this model, each batch one transaction; returns the
    re-embedding failures (report path -> error)."""
    failed: dict[str, str] = {}
    detector_or_config = detector if detector is not None else config
    work = plan_face_work(detector_or_config, embedder, workers if engine is None or reembed else 0,
                          face_workers if engine is None else None)
    summary.face_workers = workers if work is not None else 0
    main_detector = detector if detector is not None else (lambda: _detector(config))
    pipeline = FacePipeline(main_detector, embedder=embedder)
    from tqdm import tqdm

    bar = tqdm(total=len(todo) + len(reembed), unit="file", desc="index", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        if todo and engine is not None:
            stream = engine.analyse([e.fs_path for e in todo], config, embedder, max_pixels, model_path)
            _record_stream(todo, stream, library, pipeline, batch_size, det_key, model, run_id, timers,
                           summary, bar)
            counts.analysed = len(todo)
        elif todo:
            _analyse(todo, library, pipeline, work, workers, batch_size, max_pixels, config, det_key, model,
                     run_id, timers, summary, bar)
            counts.analysed = len(todo)
        if reembed:
            t0 = time.perf_counter()
            failed = _reembed(reembed, library, pipeline, work, workers, batch_size, max_pixels, config,
                              model, timers, bar)
            counts.reembedded = len(reembed) - len(failed)
            timers["reembed"] = time.perf_counter() - t0
    finally:
        bar.close()
    return failed


def _report_from_index(entries: list[WalkEntry], library: Library, model: str, matcher: Matcher,
                       failed: dict[str, str], summary: ScanSummary, out: Path, html: Path | None,
                       thumbs_dir: Path | None, page: PageOptions | None, timers: dict[str, float]) -> int:
    """The report `out` (and the page `html`) of every walked file, made from the index; returns its row count."""
    stored = library.files(e.path for e in entries)
    builder = RowBuilder(None, matcher, timers, thumbs_dir, page)
    rows = list(library_rows(library, [(e.path, stored.get(e.path), e) for e in entries], model, builder,
                             failed=failed))
    t0 = time.perf_counter()  # the rows' own stages (match, thumbs) are timed by the builder
    n_rows = _write_outputs(lambda: rows, summary, out, html, page, timers)
    timers["report"] = time.perf_counter() - t0
    return n_rows


def _analyse(todo: list[WalkEntry], library: Library, pipeline: FacePipeline, work, workers: int, batch_size: int,
             max_pixels: int, config: DetectorConfig, det_key: str, model: str, run_id: int, timers: dict,
             summary: ScanSummary, bar) -> None:
    """Decode, detect, align and embed `todo`; store each batch in one transaction."""
    args = (max_pixels, config.max_side, True)  # True: hash the content (moved files are recognised by it)
    if work is not None:
        pool = WorkerPool(workers, batch_size + 2 * workers * FACE_CHUNK, args, timers, task=analyse_files,
                          chunk=FACE_CHUNK, work=work)
    else:
        pool = WorkerPool(workers, batch_size + 2 * workers, args, timers)
    stream = pool.stream([e.fs_path for e in todo])
    try:
        for batch in _batches(zip(todo, stream), batch_size):
            pairs = []
            for entry, (path, d) in batch:
                if path != entry.fs_path:  # cannot happen: the stream keeps input order
                    raise RuntimeError(f"decode stream out of order: {path} for {entry.fs_path}")
                pairs.append((entry, d))
            _store(pairs, library, pipeline, det_key, model, run_id, timers, summary, bar)
    finally:
        stream.close()
        pool.close()


def _store(pairs: list[tuple[WalkEntry, DecodedFile]], library: Library, pipeline: FacePipeline, det_key: str,
           model: str, run_id: int, timers: dict, summary: ScanSummary, bar) -> None:
    """Analyse what was only decoded, then write the batch in one transaction."""
    analyse_decoded(pipeline, [d for _, d in pairs], timers)
    t = time.perf_counter()
    library.record([_record(e, d, det_key) for e, d in pairs], model, run_id)
    timers["write"] += time.perf_counter() - t
    summary.processed += len(pairs)
    summary.images_processed += sum(d.decoded for _, d in pairs)
    bar.update(len(pairs))


def _record_stream(todo: list[WalkEntry], stream: Iterator[tuple[str, DecodedFile]], library: Library,
                   pipeline: FacePipeline, batch_size: int, det_key: str, model: str, run_id: int, timers: dict,
                   summary: ScanSummary, bar) -> None:
    """Store results that arrive in any order (the Ray engine): `batch_size` files per transaction."""
    by_path = {e.fs_path: e for e in todo}
    try:
        for batch in _batches(stream, batch_size):
            pairs = [(by_path[path], d) for path, d in batch]
            for _, d in pairs:
                timers["decode"] = timers.get("decode", 0.0) + d.seconds
                for stage, seconds in d.stage_seconds.items():
                    timers[stage] = timers.get(stage, 0.0) + seconds
            _store(pairs, library, pipeline, det_key, model, run_id, timers, summary, bar)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _reembed(files: list[StoredFile], library: Library, pipeline: FacePipeline, work, workers: int, batch_size: int,
             max_pixels: int, config: DetectorConfig, model: str, timers: dict, bar) -> dict[str, str]:
    """Embed stored faces with this model (no detection); returns report path -> error for failures."""
    stored = library.faces([s.id for s in files])  # file id -> (face ids, faces, None)
    items = [(s.fs_path, [r.landmarks for r in stored[s.id][1]]) for s in files]
    args = (max_pixels, config.max_side)
    local = functools.partial(embed_stored_faces, pipeline)
    if work is not None:
        pool = WorkerPool(workers, batch_size + 2 * workers * FACE_CHUNK, args, timers, task=reembed_files,
                          chunk=FACE_CHUNK, work=work, local=local)
        stream = pool.stream(items)
    else:
        pool = None
        stream = ((it, local(it, *args)) for it in items)
    failed: dict[str, str] = {}
    try:
        for batch in _batches(zip(files, stream), batch_size):
            face_ids: list[int] = []
            vectors: list[np.ndarray] = []
            for s, (_, d) in batch:
                ids = stored[s.id][0]
                if d.status is not None or d.embeddings is None or len(d.embeddings) != len(ids):
                    failed[s.path] = d.error or "re-embedding failed"
                    continue
                face_ids += ids
                vectors.append(d.embeddings)
            if vectors:
                t = time.perf_counter()
                library.add_embeddings(model, face_ids, np.concatenate(vectors))
                timers["write"] += time.perf_counter() - t
            bar.update(len(batch))
    finally:
        if pool is not None:
            pool.close()
    return failed


def find_rows(library: Library, model: str, matcher: Matcher, under: Sequence[str] | None = None,
              thumbs_dir: Path | None = None, page: PageOptions | None = None,
              timers: dict | None = None, only_faces: Sequence[int] | None = None,
              verdicts: "Verdicts | None" = None) -> list[dict]:
    """The report of every file present in the index (or under `under` folders; or only the files
    holding one of `only_faces`), in walk order, from the stored faces and `model`'s embeddings; no
    photo is read. `verdicts`: the index's decisions, when the caller has loaded them already."""
    if only_faces is not None:
        paths = {where[0] for where in library.face_locations(only_faces).values()}
        files = library.files(paths, present_only=True) if paths else {}
    else:
        files = library.files(present_only=True)
    if under:
        prefixes = [os.path.abspath(u).rstrip(os.sep) for u in under]
        files = {p: s for p, s in files.items() if any(p == u or p.startswith(u + os.sep) for u in prefixes)}
    order = sorted(files, key=lambda p: walk_order_key(p))
    builder = RowBuilder(None, matcher, timers if timers is not None else dict.fromkeys(STAGES, 0.0), thumbs_dir, page)
    builder.verdicts = verdicts
    return list(library_rows(library, [(p, files[p], None) for p in order], model, builder))


def unindexed(rows: list[dict]) -> int:
    """Rows whose faces this model has not embedded yet."""
    return sum(1 for r in rows if r["status"] == "error" and (r["error"] or "").startswith("faces not embedded"))


__all__ = ["IndexCounts", "detector_key", "find_rows", "library_rows", "run_indexed_scan", "unindexed"]
