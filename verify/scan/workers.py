"""Scan workers: decode files (and on the CPU also detect, align and embed them) in other processes.

On the CPU (detector and embedder both there) each worker decodes, detects, aligns and embeds
chunks of FACE_CHUNK files with one torch thread (several single-threaded processes use small
convolutions better than one process with several threads); face workers are forked from a fork
server that has imported torch once (never a fork of the scan process itself). With a GPU the
workers only decode, and the main process analyses in batches. Images whose longer side exceeds the
detector's `max_side` are shrunk in the worker (antialiased, as the detector would shrink them; a
JPEG at least twice that size is decoded at 1/2-1/8 scale by libjpeg), so at most a ~1600 px image
crosses the process boundary; faces are mapped back to the original image's pixels.

A worker that dies (a decoder crash, the OOM killer) costs only the file it was working on: the
in-flight files are retried one at a time in a fresh pool (`WorkerPool._retry`) and the culprit gets
an error row. Workers exit when the scan process dies; if they cannot start at all (e.g. a script
without an `if __name__ == "__main__":` guard), the main process does everything, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, MutableMapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from verify.faces import DetectorConfig, Face, FacePipeline, ImageLoadError, align, error_summary, load_for_detection

from verify.scan.html import face_thumbnail

if TYPE_CHECKING:  # torch stays out of the decode workers: they import this module
    from index.quality import FaceSignals
    from verify.faces import FaceDetector
    from verify.model.file import Embedder

log = logging.getLogger(__name__)

FACE_CHUNK = 8  # files per face-worker task: MTCNN batches them (one photo at a time costs ~40% more)
CRASH_ERROR = "its worker process died while reading it (a decoder or detector crash, or out of memory)"
# What the fork server imports once, per runtime, so that each face worker starts warm.
FORKSERVER_PRELOAD = {
    "torch": ["verify.scan.workers", "torch", "facenet_pytorch", "verify.faces", "verify.model.file"],
    "onnx": ["verify.scan.workers", "onnxruntime", "verify.faces", "verify.faces.mtcnn_onnx", "verify.model.onnx_embedder"],
}


@dataclass
class DecodedFile:
    """One file on its way to the report: decoded, then analysed (faces and embeddings), or failed."""

    image: np.ndarray | None  # (h, w, 3) uint8, shrunk to max_side; dropped once the faces are analysed
    scale: tuple[float, float] = (1.0, 1.0)  # original pixels per shrunk pixel (x, y)
    status: str | None = None  # None: fine so far; "error" / "skipped" otherwise
    error: str | None = None
    seconds: float = 0.0  # decode time
    decoded: bool = False  # the file was decoded as an image (an analysis error may follow)
    faces: list[Face] | None = None  # set once detected (largest first), in original pixels
    embeddings: np.ndarray | None = None  # (F, D), one per face, set once embedded
    thumbs: list[np.ndarray] | None = None  # per face, for the HTML page: cut while the pixels are here
    stage_seconds: dict[str, float] = field(default_factory=dict)  # analysis time spent on this file (share)
    sha256: str | None = None  # content hash, when asked for (the library index recognises moved files by it)
    signals: list["FaceSignals"] | None = None  # per face: index.quality signals, measured while the pixels are here
    quality: list[float] | None = None  # per face: index.quality score (from `signals`, or as stored)

    def fail(self, error: str) -> None:
        self.status, self.error, self.faces, self.embeddings, self.image = "error", error, None, None, None


def sha256_of(fs_path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with open(fs_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None  # decoding reports what is wrong with the file
    return h.hexdigest()


def decode_file(fs_path: str, max_pixels: int, max_side: int, hash_content: bool = False) -> DecodedFile:
    d = _decode_file(fs_path, max_pixels, max_side)
    if hash_content:
        d.sha256 = sha256_of(fs_path)
    return d


def _decode_file(fs_path: str, max_pixels: int, max_side: int) -> DecodedFile:
    t0 = time.perf_counter()
    try:
        # Shrunk to the detector's size exactly as the detector would (so it does not resize again);
        # big JPEGs are decoded at a reduced scale directly.
        image, scale = load_for_detection(fs_path, max_side, max_pixels=max_pixels)  # (h, w, 3)
    except ImageLoadError as exc:
        status = "skipped" if isinstance(exc.__cause__, UnidentifiedImageError) else "error"
        return DecodedFile(None, status=status, error=exc.problem, seconds=time.perf_counter() - t0)
    except MemoryError:
        return DecodedFile(None, status="error", error="out of memory while decoding", seconds=time.perf_counter() - t0)
    except Exception as exc:  # a decoder bug must cost one file, not the scan
        return DecodedFile(None, status="error", error=f"cannot decode image ({error_summary(exc)})",
                           seconds=time.perf_counter() - t0)
    return DecodedFile(image, scale, seconds=time.perf_counter() - t0, decoded=True)


def decode_files(fs_paths: list[str], max_pixels: int, max_side: int, hash_content: bool = False) -> list[DecodedFile]:
    """The task of a decode-only worker: decode a chunk of files."""
    return [decode_file(p, max_pixels, max_side, hash_content) for p in fs_paths]


def analyse_decoded(pipeline: FacePipeline, items: list[DecodedFile], timers: MutableMapping[str, float],
                    thumbnails: bool = False) -> None:
    """Detect, align and embed the decoded images not analysed yet, in place: each gets `faces` and
    `embeddings` (and with `thumbnails` a small picture of each face; then its image is dropped), or
    status "error"; a failure costs only its file."""
    todo = [d for d in items if d.status is None and d.faces is None and d.image is not None]
    if not todo:
        return
    # here, not at the top: the package `index` loads FAISS, which the decode workers never need
    from index.quality import face_signals, quality_scores

    for d, got in zip(todo, pipeline.analyse([d.image for d in todo], [d.scale for d in todo], timers)):
        if isinstance(got, str):
            d.fail(got)
            continue
        d.faces, d.embeddings = [f.face for f in got[0]], got[1]
        # the photo's size in original pixels (the image may be shrunk for detection)
        size = (round(d.image.shape[1] * d.scale[0]), round(d.image.shape[0] * d.scale[1]))
        try:
            d.signals = [face_signals(f.face.box, f.face.landmarks, f.face.prob, size, f.crop) for f in got[0]]
            d.quality = quality_scores(d.signals).tolist()
        except Exception as exc:  # a signal is a nicety: the face is stored and scored from what is kept
            log.warning("face quality signals failed (%s); scored from box and landmarks only", error_summary(exc))
        if thumbnails:
            t0 = time.perf_counter()
            d.thumbs = [face_thumbnail(d.image, f.box, d.scale) for f in d.faces]
            timers["thumbs"] = timers.get("thumbs", 0.0) + time.perf_counter() - t0
        d.image = None


@dataclass
class FaceWork:
    """What a face worker needs to detect, align and embed on its own (sent once, at start-up)."""

    detector_config: DetectorConfig
    embedder: "Embedder"  # on the CPU
    threads: int = 1
    thumbnails: bool = False  # also cut each face's thumbnail (scan --html)


def plan_face_work(detector: "FaceDetector | DetectorConfig", embedder: "Embedder", workers: int,
                   face_workers: bool | None, thumbnails: bool = False) -> FaceWork | None:
    """What the workers need to analyse faces themselves, or None when the main process does it."""
    if workers <= 0 or face_workers is False:
        return None
    from verify.faces import FaceDetector
    from verify.model.runtimes import choose_runtime

    # A GPU stays with the main process (one CUDA context, big batches); a detector object of
    # another type (a test double, a subclass) cannot be rebuilt in a worker from its config.
    why_not = None
    if isinstance(detector, DetectorConfig):
        config, runtime = detector, choose_runtime(detector.runtime, detector.device)
        if runtime == "torch":
            from verify.model.device import resolve_device

            device_type = resolve_device(detector.device).type
        else:
            device_type = "cpu"
    elif type(detector) is FaceDetector:
        config, runtime, device_type = detector.config, detector.runtime, detector.device.type
    else:
        config, runtime, device_type = None, None, None
        why_not = f"the detector is a {type(detector).__name__}, not a FaceDetector"
    if why_not is None and (device_type != "cpu" or embedder.device.type != "cpu"):
        why_not = "the detector or the embedder runs on a GPU"
    if why_not is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
        return FaceWork(dataclasses.replace(config, device="cpu", runtime=runtime, threads=threads), embedder, threads,
                        thumbnails)
    if face_workers:
        raise ValueError(f"face_workers=True but {why_not}")
    return None


_WORKER: dict[str, Any] = {}  # per worker process: the face pipeline of a face worker


def _worker_init(work: FaceWork | None = None) -> None:
    # If the scan is killed (SIGKILL), its workers would wait on their task queue forever: exit
    # as soon as the parent process is gone.
    parent = mp.parent_process()
    if parent is not None:
        def watch() -> None:
            mp.connection.wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    if work is not None:
        from verify.faces import FaceDetector

        # One thread per worker: several single-threaded processes get more out of the cores than
        # one process whose small convolutions are split over threads.
        if work.detector_config.runtime == "torch":
            import torch

            torch.set_num_threads(work.threads)
        elif hasattr(work.embedder, "set_threads"):  # an OnnxEmbedder
            work.embedder.set_threads(work.threads)
        _WORKER["pipeline"] = FacePipeline(FaceDetector(work.detector_config), embedder=work.embedder)
        _WORKER["thumbnails"] = work.thumbnails


def analyse_files(fs_paths: list[str], max_pixels: int, max_side: int, hash_content: bool = False) -> list[DecodedFile]:
    """The task of a face worker: decode, detect, align and embed a chunk of files (matching stays
    in the main process, which holds the gallery)."""
    items = decode_files(fs_paths, max_pixels, max_side, hash_content)
    timers = dict.fromkeys(("detect", "align", "embed"), 0.0)
    analyse_decoded(_WORKER["pipeline"], items, timers, thumbnails=_WORKER.get("thumbnails", False))
    share = {k: v / len(items) for k, v in timers.items()}
    for d in items:
        d.stage_seconds = dict(share)
    return items


StoredFaces = tuple[str, list[np.ndarray]]  # (fs path, (5, 2) landmarks per face in original pixels)


def embed_stored_faces(pipeline: FacePipeline, item: StoredFaces, max_pixels: int, max_side: int,
                       timers: MutableMapping[str, float] | None = None) -> DecodedFile:
    """Another model's embeddings of faces found before: decode the photo as the scan does, align each
    face from its stored landmarks and embed it; no detection. `embeddings` (F, D) or status "error"."""
    fs_path, landmarks = item
    d = decode_file(fs_path, max_pixels, max_side)
    if d.status is not None or d.image is None:
        return d
    try:
        t0 = time.perf_counter()
        pil = Image.fromarray(d.image)
        sx, sy = d.scale
        # Stored landmarks are in original pixels; the scan aligned on the image shrunk for detection.
        crops = [align(pil, (np.asarray(lm, np.float64) + 0.5) / (sx, sy) - 0.5, pipeline.geometry)
                 for lm in landmarks]  # (S, S, 3) each
        t1 = time.perf_counter()
        d.embeddings = pipeline.embedder.embed(np.stack(crops))  # (F, D)
        if timers is not None:
            timers["align"] = timers.get("align", 0.0) + t1 - t0
            timers["embed"] = timers.get("embed", 0.0) + time.perf_counter() - t1
    except Exception as exc:
        d.fail(f"re-embedding failed ({error_summary(exc)})")
    d.image = None
    return d


def reembed_files(items: list[StoredFaces], max_pixels: int, max_side: int) -> list[DecodedFile]:
    """The task of a face worker re-embedding faces found before (another model)."""
    timers: dict[str, float] = {}
    out = [embed_stored_faces(_WORKER["pipeline"], it, max_pixels, max_side, timers) for it in items]
    share = {k: v / len(out) for k, v in timers.items()}
    for d in out:
        d.stage_seconds = dict(share)
    return out


def _face_worker_context(runtime: str = "torch") -> mp.context.BaseContext:
    if "forkserver" not in mp.get_all_start_methods():  # e.g. Windows: spawn (each worker imports its runtime)
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD[runtime])  # only takes effect before the server starts
    return ctx


def prestart_face_workers(runtime: str = "torch") -> None:
    """Start the face workers' fork server now (it imports `runtime` in the background), so that its
    start-up overlaps with the caller loading the model. Optional: run_scan starts it when needed."""
    try:
        _face_worker_context(runtime)
        from multiprocessing import forkserver

        forkserver.ensure_running()
    except Exception as exc:  # e.g. a platform without fork: run_scan falls back by itself
        log.debug("fork server not started early (%s)", error_summary(exc))


def _chunks(paths: Iterable[str], n: int, workers: int = 1) -> Iterator[list[str]]:
    """Consecutive chunks of at most `n` paths. Of a list, the chunks shrink towards its end (guided
    scheduling: at most 1/(2 x workers) of what remains), so that the workers finish together: with
    fixed chunks, 40 phone photos in chunks of 8 gave one worker 24 photos and the other 16."""
    if isinstance(paths, Sequence):
        start, total = 0, len(paths)
        while start < total:
            size = max(1, min(n, math.ceil((total - start) / (2 * max(1, workers)))))
            yield list(paths[start : start + size])
            start += size
        return
    chunk: list[str] = []
    for p in paths:
        chunk.append(p)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class WorkerPool:
    """Runs `task(paths, *args)` on chunks of `chunk` files in `workers` processes (`work` sets each
    worker up) and yields (path, DecodedFile) in input order, with about `window` files in flight.

    With no workers, or workers that cannot start, `local(item, *args)` runs in this process instead
    (by default decoding only: the caller analyses what comes back without faces). `timers` gains
    "start", "decode", "decode_wait" and the workers' analysis stages.
    """

    def __init__(self, workers: int, window: int, args: tuple, timers: MutableMapping[str, float],
                 task: Callable[..., list[DecodedFile]] = decode_files, chunk: int = 1,
                 work: FaceWork | None = None, local: Callable[..., DecodedFile] = decode_file) -> None:
        self.workers, self.window, self.args, self.timers = workers, window, args, timers
        self.task, self.chunk, self.work, self.local = task, chunk, work, local
        # Never a plain fork of this process (it may hold torch threads or CUDA). Face workers come from
        # a fork server that has imported torch once: each worker then starts in ~0.5 s, not ~3 s.
        self._ctx = _face_worker_context(work.detector_config.runtime) if work is not None else mp.get_context("spawn")
        self._pool: ProcessPoolExecutor | None = None

    def _account(self, d: DecodedFile) -> None:
        self.timers["decode"] = self.timers.get("decode", 0.0) + d.seconds
        for k, v in d.stage_seconds.items():
            self.timers[k] = self.timers.get(k, 0.0) + v

    def _wait(self, t0: float) -> None:
        self.timers["decode_wait"] = self.timers.get("decode_wait", 0.0) + time.perf_counter() - t0

    def _start(self) -> ProcessPoolExecutor | None:
        """A fresh pool, or None (with a warning) when worker processes cannot start here."""
        t0 = time.perf_counter()
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=self._ctx, initializer=_worker_init,
                                   initargs=(self.work,))
        try:
            pool.submit(os.getpid).result()  # a pool that cannot even start must not cost every file
            self.timers["start"] = self.timers.get("start", 0.0) + time.perf_counter() - t0
            return pool
        except Exception as exc:
            pool.shutdown(wait=False, cancel_futures=True)
            log.warning("worker processes do not start (%s); the main process does all the work instead "
                        "(a script that starts a scan needs an `if __name__ == \"__main__\":` guard)",
                        error_summary(exc))
            return None

    def _in_process(self, paths: Iterable[str]) -> Iterator[tuple[str, DecodedFile]]:
        for p in paths:
            d = self.local(p, *self.args)
            self._account(d)
            self.timers["decode_wait"] = self.timers.get("decode_wait", 0.0) + d.seconds
            yield p, d

    def _retry(self, files: list[str]) -> Iterator[tuple[str, DecodedFile]]:
        """After a worker died: each in-flight file alone in a fresh pool; the culprit gets CRASH_ERROR."""
        for q in files:
            self._pool = self._pool or self._start()
            t0 = time.perf_counter()
            if self._pool is None:
                d = self.local(q, *self.args)
            else:
                try:
                    d = self._pool.submit(self.task, [q], *self.args).result()[0]
                except BrokenProcessPool:
                    d = DecodedFile(None, status="error", error=CRASH_ERROR)
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None
            self._wait(t0)
            self._account(d)
            yield q, d

    def stream(self, paths: Iterable[str]) -> Iterator[tuple[str, DecodedFile]]:
        """(path, decoded) in input order. Closing the generator shuts the pool down. A list of paths
        is cut into chunks that shrink towards its end (`_chunks`): pass one where it is at hand."""
        if self.workers <= 0 or (pool := self._start()) is None:
            yield from self._in_process(paths)
            return
        self._pool = pool
        pending: deque = deque()  # (paths of a chunk, future)
        source = _chunks(paths, self.chunk, self.workers)
        in_flight = 0
        try:
            while True:
                while in_flight < self.window and (c := next(source, None)) is not None:
                    try:
                        fut = self._pool.submit(self.task, c, *self.args)
                    except BrokenProcessPool as exc:  # a worker died since the last submit: an earlier
                        fut = Future()  # chunk's future fails too, and the retry covers this one
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
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None
                    log.warning("a worker process died; retrying %d in-flight files one at a time", len(retry))
                    yield from self._retry(retry)
                    self._pool = self._pool or self._start()
                    if self._pool is None:
                        yield from self._in_process(p for cc in source for p in cc)
                        return
                    continue
                except Exception as exc:  # e.g. a result that failed to pickle: decode those files here
                    log.warning("a worker task failed (%s); decoding its %d files in the main process",
                                error_summary(exc), len(c))
                    got = [self.local(p, *self.args) for p in c]
                self._wait(t0)
                for p, d in zip(c, got):
                    self._account(d)
                    yield p, d
        finally:
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
