"""The scan's Ray engine: files are analysed by a pool of Ray Data actors, on one machine or a cluster.

`faceverify scan --engine ray` runs the same indexed scan as the local engine (verify.scan.indexed):
the driver (the scan process) walks the folders, plans from the library index, writes each batch of
results in one SQLite transaction and makes the report. Only the analysis of the files to analyse
(decode, detect, align, embed) moves to Ray:

    ray.data.from_items(paths)                  # blocks of `files_per_task` paths
      .map_batches(FaceActor, concurrency=N)    # one face pipeline per actor: CPU, or GPU with --gpus-per-worker
      .iter_batches()                           # results stream back to the driver as they finish

Ray owns the failures of its workers: an actor process that dies is restarted and its task retried
(Ray Data's defaults for actor pools: max_restarts=-1, max_task_retries=-1). A task's output reaches
the driver whole or not at all, and the driver records a path once per run (a retried task that
somehow returns a path again is dropped), so the index ends with every file once. A driver killed
mid-scan leaves the index as the local engine does: every batch written is kept, and the next scan
analyses the rest.

Photos and the model's runtime graph are read by the actors at the driver's paths: on a cluster
they must be reachable at the same path on every node (a shared or replicated file system).
The actors load the model from its file (the driver's path; the shipped default model is inside the
installed package) and check its fingerprint against the driver's. Re-embedding stored faces with
another model stays on the local engine.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator
from urllib.parse import urlsplit

import numpy as np

from verify.scan.workers import DecodedFile

if TYPE_CHECKING:
    from verify.faces import DetectorConfig

log = logging.getLogger(__name__)

RAY_EXTRA_HINT = 'pip install "faceverify[ray]"'
CONNECT_TIMEOUT_S = 5.0  # a wrong --address fails in seconds, not after Ray's own minute of retries
DEFAULT_OBJECT_STORE_BYTES = 512 << 20  # a local instance: results are small (faces, not pixels)
ACTOR_START_TIMEOUT_S = 120
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
# Measured on 300 LFW photos, 2 actors (bench/README.md): 16 files a task, 2 in flight per actor (one
# running, one queued) 4.7 s; 8 a task 4.9 s; 32 5.0 s; 1 in flight (8 a task) 7.4 s: the actor idles
# while its next task is dispatched. The whole pool is up before the first task (wait_for_min_actors_s),
# so the first tasks go one to each actor.
FILES_PER_TASK = 16
MAX_TASKS_PER_ACTOR = 2
MIN_TASKS_PER_ACTOR = 4


class RayEngineError(RuntimeError):
    """The Ray engine cannot run: Ray missing, the cluster unreachable, a bad option (one line)."""


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray instance; "auto", "HOST:PORT" or "ray://HOST:PORT": join
    workers: int = 2  # actors, each with its own face pipeline
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0: GPU actors (PyTorch runtime on CUDA)
    files_per_task: int = FILES_PER_TASK  # files per map_batches call (the actor's MTCNN batches them)
    trace_dir: str | None = None  # each actor appends "pid node" lines here per task (tests, ops)

    def check(self) -> None:
        if self.workers < 1:
            raise RayEngineError(f"--workers must be >= 1 with the Ray engine, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise RayEngineError(f"cpus per worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise RayEngineError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.files_per_task < 1:
            raise RayEngineError(f"files per task must be >= 1, got {self.files_per_task}")


@dataclass
class EngineStats:
    """What the Ray engine reports in the scan summary."""

    name: str = "ray"
    address: str | None = None
    startup_s: float = 0.0  # connecting or starting the local instance
    nodes: dict[str, int] = field(default_factory=dict)  # node id -> files analysed there
    actor_pids: int = 0  # distinct actor processes that returned results (restarts count)
    duplicates: int = 0  # paths returned twice (a retried task), dropped


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayEngineError(f"the Ray engine needs Ray Data ({RAY_EXTRA_HINT})") from None
    return ray


def _reachable(address: str) -> None:
    """A TCP connect to HOST:PORT (or ray://HOST:PORT) within CONNECT_TIMEOUT_S, or RayEngineError."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise RayEngineError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise RayEngineError(f"--address {address}: no Ray cluster answers there ({e.strerror or e})") from None


class FaceActor:
    """A Ray Data actor: one face pipeline, built once from the model file; each call analyses a batch
    of paths. The model is loaded here, not shipped: its runtime graph is read at the driver's path."""

    def __init__(self, config: "DetectorConfig", model: str | None, fingerprint: str, max_pixels: int,
                 trace_dir: str | None) -> None:
        from verify.model.runtimes import load_embedder

        from verify.scan import workers

        embedder = load_embedder(model, config.device, config.runtime, threads=config.threads)
        if embedder.fingerprint != fingerprint:
            raise RuntimeError(f"model {model or '(default)'} on this node is {embedder.fingerprint}, "
                               f"the driver's is {fingerprint}")
        workers._worker_init(workers.FaceWork(config, embedder, config.threads))  # the local engine's set-up
        self._args = (max_pixels, config.max_side, True)  # True: hash the content, as the local engine does
        self._trace = os.path.join(trace_dir, f"{os.getpid()}.trace") if trace_dir else None
        import ray

        self._node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from verify.scan.workers import analyse_files

        paths = [str(p) for p in batch["path"]]
        if self._trace:
            with open(self._trace, "a") as f:  # one line per task, before the work (a kill lands mid-task)
                f.write(f"{os.getpid()} {self._node} {len(paths)}\n")
        done = analyse_files(paths, *self._args)
        payload = np.empty(len(done), dtype=object)
        payload[:] = [pickle.dumps(d, protocol=pickle.HIGHEST_PROTOCOL) for d in done]
        return {"path": np.asarray(paths, dtype=object), "result": payload,
                "node": np.asarray([self._node] * len(paths), dtype=object),
                "pid": np.full(len(paths), os.getpid(), dtype=np.int64)}


class RayEngine:
    """Joins the cluster at `options.address` on creation (or starts a local instance on first use);
    `analyse` streams (fs path, DecodedFile) results."""

    def __init__(self, options: RayOptions) -> None:
        options.check()
        self.options = options
        self.stats = EngineStats(address=options.address)
        self._started = False
        _ray()  # Ray Data installed, or one line now
        if options.address is not None:  # join now: a wrong address fails before anything is written
            self._connect()

    def _connect(self) -> None:
        """Join the cluster at the address, or start a local instance (lazily: a scan with nothing to
        analyse never starts one)."""
        ray, options = _ray(), self.options
        t0 = time.perf_counter()
        if ray.is_initialized():  # a notebook or a test that holds its own connection
            pass
        elif options.address is None:
            # address="local": a new instance even where RAY_ADDRESS or a running cluster is around
            # Ray nices its workers (15) by default; here they do the scan's work, at the scan's own
            # priority like the local engine's workers. (Turning off Ray's prestarted workers was
            # measured: the actors then start ~1 s later.)
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     logging_level=logging.WARNING, object_store_memory=DEFAULT_OBJECT_STORE_BYTES,
                     log_to_driver=True, _system_config=LOCAL_SYSTEM_CONFIG)
            self._started = True
        else:
            if options.address != "auto":
                _reachable(options.address)
            try:
                ray.init(address=options.address, logging_level=logging.WARNING, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise RayEngineError(f"--address {options.address}: cannot join the Ray cluster "
                                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            self._started = True
        self.stats.startup_s = time.perf_counter() - t0
        resources = ray.cluster_resources()
        if options.gpus_per_worker > 0 and resources.get("GPU", 0) < options.gpus_per_worker:
            self.close()
            raise RayEngineError(f"--gpus-per-worker {options.gpus_per_worker:g}: the cluster has "
                                 f"{resources.get('GPU', 0):g} GPUs")
        log.info("ray engine: %s in %.1f s (%g CPUs, %g GPUs, %d nodes)", options.address or "local instance",
                 self.stats.startup_s, resources.get("CPU", 0), resources.get("GPU", 0),
                 sum(1 for n in ray.nodes() if n.get("Alive")))

    def close(self) -> None:
        if self._started:
            _ray().shutdown()
            self._started = False

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def analyse(self, fs_paths: Iterable[str], detector_config: "DetectorConfig", embedder: Any, max_pixels: int,
                model: str | None = None) -> Iterator[tuple[str, DecodedFile]]:
        """Decode, detect, align and embed `fs_paths` on the actors; yields (fs path, DecodedFile)
        in completion order, each path once."""
        import dataclasses

        ray = _ray()
        from ray.data import DataContext

        from verify.model.runtimes import choose_runtime

        paths = list(fs_paths)
        if not paths:
            return
        if not ray.is_initialized():
            self._connect()
        o = self.options
        gpu = o.gpus_per_worker > 0
        runtime = "torch" if gpu else choose_runtime(detector_config.runtime, "cpu")
        config = dataclasses.replace(detector_config, device="cuda" if gpu else "cpu",
                                     threads=max(1, int(o.cpus_per_worker)), runtime=runtime)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # the scan shows its own
        ctx.verbose_stats_logs = False
        # Start the whole pool before the first task: otherwise the first actor up takes the work of a
        # small scan, and a cluster that cannot place the pool fails here in one line, not silently slow.
        ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        # A block holds paths, not pixels: there is nothing to gain from running it where it was made.
        ctx.execution_options.actor_locality_enabled = False
        # A block is a task. A small scan is cut finer so that every actor gets work: at least
        # MIN_TASKS_PER_ACTOR tasks per actor.
        per_task = max(1, min(o.files_per_task, math.ceil(len(paths) / (o.workers * MIN_TASKS_PER_ACTOR))))
        blocks = math.ceil(len(paths) / per_task)
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
        ds = ds.map_batches(
            FaceActor,
            fn_constructor_kwargs=dict(config=config, model=model, fingerprint=embedder.fingerprint,
                                       max_pixels=max_pixels, trace_dir=o.trace_dir),
            batch_size=None, batch_format="numpy",  # a task = a block of files_per_task paths
            compute=ray.data.ActorPoolStrategy(size=o.workers, max_tasks_in_flight_per_actor=MAX_TASKS_PER_ACTOR),
            num_cpus=o.cpus_per_worker, num_gpus=o.gpus_per_worker or None,
        )
        seen: set[str] = set()
        pids: set[int] = set()
        try:
            yield from self._stream(ds, seen, pids)
        except ray.exceptions.GetTimeoutError:
            raise RayEngineError(f"the Ray cluster did not start {o.workers} workers of {o.cpus_per_worker:g} CPUs"
                                 f"{f' and {o.gpus_per_worker:g} GPUs' if gpu else ''} each within "
                                 f"{ACTOR_START_TIMEOUT_S} s: ask for fewer --workers") from None
        self.stats.actor_pids = len(pids)
        missing = len(paths) - len(seen)
        if missing:  # Ray Data gave up on a block (its retries exhausted): the next scan analyses them
            raise RayEngineError(f"the Ray engine returned {len(seen)} of {len(paths)} files; scan again to "
                                 "finish the rest")

    def _stream(self, ds: Any, seen: set[str], pids: set[int]) -> Iterator[tuple[str, DecodedFile]]:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            for path, blob, node, pid in zip(batch["path"], batch["result"], batch["node"], batch["pid"]):
                path = str(path)
                if path in seen:
                    self.stats.duplicates += 1
                    continue
                seen.add(path)
                pids.add(int(pid))
                self.stats.nodes[str(node)] = self.stats.nodes.get(str(node), 0) + 1
                yield path, pickle.loads(blob)


__all__ = ["EngineStats", "FaceActor", "RayEngine", "RayEngineError", "RayOptions"]
