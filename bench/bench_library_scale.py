"""The library index at 1e6 faces (issue 16): building it, what its embeddings cost on disk and on
reads against a columnar sidecar, and `faceverify find` over it (flat vs IVF).

    .venv/bin/python bench/bench_library_scale.py [--faces 1e6] [--work DIR] [--full-report] [--no-ivf]
        [--faces-per-file 2] [--batch-files 5000] [--enroll 20] [--threshold 0.5] [--write-reps 20] [--seed 0]

Data: `--faces` 128-d unit vectors from bench/bench_facesearch.py's `synthetic_faces` (identities = a
centre + noise, `--per-identity` 20 faces each on average; same-identity cosine 0.6-0.8, different
people ~0 +- 0.18), `--faces-per-file` 2 faces per file, so 5e5 files named
/photos/yyyy/mm/file_000123.jpg with a size, mtime/ctime/inode, a sha256, status 'face', the detector
key a scan stores, and per face a box, a probability and 5 landmarks. "alice" is identity 0: her
library faces are those with label 0; `--enroll` fresh draws of her identity are her gallery.
Nothing is written into the repository: everything goes to a temp folder under /tmp (removed at the
end), or to `--work DIR`, kept, where a later run reuses the index built with the same arguments
(the build figures are then those stored when it was built, flagged "(stored)").

Tables (a one-line note under each says what was measured):

1a. Building: generating the vectors (numpy), making the FileRecords, and `Library.record(records,
    model)` in transactions of `--batch-files` files through the public API (`Library.open`,
    `ensure_model`, `record`): the write path a scan uses. Seconds, faces/s, files/s.
1b. Size on disk after the writer closed (its close checkpoints the WAL into the database and
    removes it: db + wal): per part, from SQLite's dbstat (pages of each table and index), in MB and
    bytes per face, against the 512 B (128 x float32) a raw vector takes.
2a. Reading all N vectors + ids back: `Library.embeddings(model)` (the call `find` makes), the
    `count(*)` of the faces it makes first (against counting the embeddings) and a join-free SELECT of the BLOBs (raw sqlite3, to split the
    cost), vs a sidecar: `np.load` of vectors.npy + ids.npy, `np.load(mmap_mode="r")` + one full pass
    (a sum over every row), and a Parquet file (ids int64 + fixed_size_list<float32>[128],
    uncompressed) read with pyarrow into numpy. "cold": the files were first evicted from this VM's
    page cache (fsync, posix_fadvise DONTNEED; the host may still cache them); "warm": read again at
    once. MB/s counts the payload (N x (512 + 8) B), not the file. Peak RSS added: the sampled
    resident memory of this process above what it held before the read.
2b. Writing one scan batch (32 files, 64 faces) at N: `Library.record` (one transaction with the
    files, faces and embeddings, the product's layout), `Library.record` of 32 face-less files (the
    catalogue transaction alone, which a sidecar design still commits), and what a sidecar adds on
    top: an append log of ids + vectors without / with fsync, and an atomic rewrite of the .npy or
    Parquet file with N+64 rows (temp file, fsync, rename, fsync of the folder). Median and mean ms
    over `--write-reps` (rewrites: 3 and 2), bytes handed to write() (/proc/self/io wchar).
    These rows go under /photos/zz-bench-writes/ and are marked gone afterwards (Library.mark_gone),
    so the later tables see N present faces.
3a. `faceverify find alice --gallery G --index DB --out OUT.csv` in a subprocess
    (`common.run_measured`, called from a small launcher process: a child's wait4 ru_maxrss starts
    from the RSS of the process that spawned it, here GBs): wall seconds, peak RSS of the largest process (wait4) and of the tree
    (sampled), report rows, alice recall (her library faces found in the report / all of them), other
    faces matched. Run twice: first with no search index kept (what the first find after a scan
    pays), then again (an IVF index is then loaded from beside the database; a flat one is rebuilt).
    The gallery: `Gallery.create(G, dim=128, fingerprint=<synthetic>, threshold=--threshold)` + one
    `add` of alice's vectors with sources and sha256s. With `--full-report`: `faceverify find
    --gallery G --index DB --out ALL.csv` (every file, everyone), killed after 600 s.
3b. The body of `verify.queries.find.candidate_faces` per kind, each row in a fresh Python process:
    `library_search(lib, model, kind=...)` (read the embeddings from SQLite + build the FAISS index;
    IVF also saves it beside the database) then one `range_search` of alice's pooled vectors at her
    threshold: seconds, file size, candidates, alice recall, recall vs the flat (exact) candidates,
    the process's peak RSS (VmHWM) and its RSS before the call. "ivf, kept" is a later call: the
    saved index is loaded (no SQLite read), cold (evicted from the page cache) and warm.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_facesearch import face_stats, synthetic_faces  # noqa: E402
from common import FACEVERIFY, Measured, REPO, TreeMemorySampler, _tree_rss_kb, print_table, ratio  # noqa: E402

sys.path.insert(0, str(REPO))
from index.library import FaceRecord, FileRecord, Library  # noqa: E402

FINGERPRINT = "5e7a1c0000000128"  # the synthetic model (16 hex digits, like a real fingerprint)
ALICE = 0  # identity index of alice
WRITE_FILES = 32  # one scan batch
WRITES_ROOT = "/photos/zz-bench-writes"
MB = 1e6
LANDMARKS = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], np.float32)  # (5, 2) in box units


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def wchar() -> int:
    """Bytes this process has handed to write() so far (Linux /proc/self/io)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(fn):
    """(result, seconds, MB of resident memory added at the sampled peak)."""
    pid = os.getpid()
    base = _tree_rss_kb(pid)
    sampler = TreeMemorySampler(pid, interval=0.05).start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    sampler.stop()
    peak = max(sampler.peak_kb, _tree_rss_kb(pid))
    return out, seconds, max(0, peak - base) / 1024


def evict(*paths: Path) -> None:
    """Drop the files' pages from this machine's page cache (clean pages only: fsync first)."""
    for p in paths:
        if not p.exists():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


# --------------------------------------------------------------------------------------------
# The synthetic library
# --------------------------------------------------------------------------------------------


class Layout:
    """Where face i of the synthetic library lives: file i // fpf, face number i % fpf."""

    def __init__(self, n_faces: int, fpf: int) -> None:
        self.n_faces, self.fpf = n_faces, fpf
        self.n_files = -(-n_faces // fpf)
        self.width = max(6, len(str(self.n_files - 1)))

    def path(self, j: int) -> str:
        year = 2005 + j * 20 // self.n_files
        month = 1 + (j * 240 // self.n_files) % 12
        return f"/photos/{year}/{month:02d}/file_{j:0{self.width}d}.jpg"


def make_records(paths: list[str], vectors: np.ndarray, fpf: int, rng: np.random.Generator, detector: str,
                 inode0: int) -> list[FileRecord]:
    """FileRecords of len(paths) files, `fpf` faces each (the last may have fewer), faces = rows of
    `vectors` (F, D) in order; stat fields, boxes, landmarks and hashes drawn at random."""
    n_files, n_faces = len(paths), len(vectors)
    x1 = rng.uniform(0, 3400, n_faces).astype(np.float32)  # (F,)
    y1 = rng.uniform(0, 2400, n_faces).astype(np.float32)
    w = rng.uniform(40, 600, n_faces).astype(np.float32)
    prob = rng.uniform(0.9, 1.0, n_faces)
    lm = (LANDMARKS[None] * np.stack([w, w * 1.2], 1)[:, None] + np.stack([x1, y1], 1)[:, None]
          + rng.normal(0, 2, (n_faces, 5, 2))).astype(np.float32)  # (F, 5, 2)
    sizes = rng.integers(500_000, 8_000_000, n_files)
    mtimes = rng.integers(1_104_537_600, 1_735_689_600, n_files) * 1_000_000_000 + rng.integers(0, 10**9, n_files)
    shas = rng.integers(0, 256, (n_files, 32), dtype=np.uint8)
    recs = []
    for j, path in enumerate(paths):
        lo, hi = j * fpf, min((j + 1) * fpf, n_faces)
        faces = [FaceRecord((float(x1[i]), float(y1[i]), float(x1[i] + w[i]), float(y1[i] + 1.2 * w[i])),
                            float(prob[i]), lm[i]) for i in range(lo, hi)]
        recs.append(FileRecord(path=path, fs_path=path, size=int(sizes[j]), mtime_ns=int(mtimes[j]),
                               ctime_ns=int(mtimes[j]) + 1_000_000, inode=inode0 + j,
                               status="face" if faces else "no-face", sha256=shas[j].tobytes().hex(),
                               detector=detector, faces=faces,
                               embeddings=vectors[lo:hi] if faces else None))
    return recs


def detector_string() -> str:
    from verify.faces import DEFAULT_MAX_PIXELS, DetectorConfig
    from verify.scan.indexed import detector_key

    return detector_key(DetectorConfig(), DEFAULT_MAX_PIXELS)


def build_index(db: Path, x: np.ndarray, layout: Layout, batch_files: int, seed: int) -> dict:
    """Fill a new index at `db` with the faces `x`; returns the timings."""
    rng = np.random.default_rng(seed + 7)
    detector = detector_string()
    t_make = t_record = 0.0
    batches = 0
    with Library.open(db) as lib:
        lib.ensure_model(FINGERPRINT, x.shape[1])
        for j0 in range(0, layout.n_files, batch_files):
            j1 = min(layout.n_files, j0 + batch_files)
            t0 = time.perf_counter()
            recs = make_records([layout.path(j) for j in range(j0, j1)], x[j0 * layout.fpf: j1 * layout.fpf],
                                layout.fpf, rng, detector, 1_000_000 + j0)
            t1 = time.perf_counter()
            lib.record(recs, FINGERPRINT)
            t2 = time.perf_counter()
            t_make += t1 - t0
            t_record += t2 - t1
            batches += 1
            if batches % 20 == 0:
                log(f"  {j1:,} / {layout.n_files:,} files ({t_record:.0f} s in record)")
        wal = db.with_name(db.name + "-wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        t0 = time.perf_counter()
    t_close = time.perf_counter() - t0  # close = checkpoint of the WAL into the database
    return {"make_s": t_make, "record_s": t_record, "close_s": t_close, "transactions": batches,
            "wal_bytes_before_close": wal_bytes}


def ro_connect(db: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        return sqlite3.connect(f"{db.as_uri()}?immutable=1", uri=True)


def size_parts(db: Path) -> tuple[list[tuple[str, int]], int, int]:
    """([(part, bytes)], db bytes, wal bytes) from dbstat."""
    conn = ro_connect(db)
    try:
        per = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
    finally:
        conn.close()
    groups = [
        ("embeddings table (model, face_id, vector BLOB)", ["embeddings"]),
        ("embeddings_face index", ["embeddings_face"]),
        ("faces table + (file_id, face) index", ["faces", "sqlite_autoindex_faces_1"]),
        ("files table + path, (size, sha256) indexes", ["files", "sqlite_autoindex_files_1", "files_size"]),
    ]
    out, used = [], 0
    for label, names in groups:
        b = sum(int(per.get(n, 0)) for n in names)
        out.append((label, b))
        used += b
    wal = db.with_name(db.name + "-wal")
    db_bytes = db.stat().st_size
    out.append(("other tables, free pages", db_bytes - used))
    return out, db_bytes, wal.stat().st_size if wal.exists() else 0


# --------------------------------------------------------------------------------------------
# Reads (table 2a)
# --------------------------------------------------------------------------------------------


def read_library(db: Path):
    with Library.open(db, readonly=True) as lib:
        return lib.embeddings(FINGERPRINT)


def read_count(db: Path, query: str, *args) -> int:
    conn = ro_connect(db)
    try:
        return int(conn.execute(query, args).fetchone()[0])
    finally:
        conn.close()


def read_blobs(db: Path, n: int, dim: int):
    conn = ro_connect(db)
    try:
        ids, vecs, k = np.empty(n, np.int64), np.empty((n, dim), np.float32), 0
        for face_id, blob in conn.execute("SELECT face_id, vector FROM embeddings WHERE model = ?", (FINGERPRINT,)):
            if k == n:
                break
            ids[k] = face_id
            vecs[k] = np.frombuffer(blob, np.float32)
            k += 1
        return ids[:k], vecs[:k]
    finally:
        conn.close()


def read_npy(vec_path: Path, id_path: Path):
    return np.load(id_path), np.load(vec_path)


def pass_mmap(vec_path: Path, id_path: Path) -> float:
    vm, im = np.load(vec_path, mmap_mode="r"), np.load(id_path, mmap_mode="r")
    total = float(im.sum())
    for s in range(0, len(vm), 65_536):
        total += float(vm[s:s + 65_536].sum())
    return total


def read_parquet(path: Path):
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    ids = t.column("id").to_numpy()
    col = t.column("vector").combine_chunks()
    dim = col.type.list_size
    return ids, col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def write_parquet(path: Path, ids: np.ndarray, vecs: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(ids, pa.int64()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()),
                                                                  vecs.shape[1])})
    pq.write_table(table, path, compression="none")


def write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# Writes (table 2b)
# --------------------------------------------------------------------------------------------


def rewrite_npy(path: Path, new: np.ndarray) -> None:
    """Atomic sidecar update: a temp file with the old rows (streamed) + the new ones, fsync, rename."""
    old = np.load(path, mmap_mode="r")  # (N, D)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(old.dtype),
                                                     "fortran_order": False,
                                                     "shape": (len(old) + len(new), old.shape[1])})
            for s in range(0, len(old), 65_536):
                f.write(np.ascontiguousarray(old[s:s + 65_536]).tobytes())
            f.write(np.ascontiguousarray(new, old.dtype).tobytes())
            f.flush()
            os.fsync(f.fileno())
        del old
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def rewrite_parquet(path: Path, new_ids: np.ndarray, new: np.ndarray) -> None:
    ids, vecs = read_parquet(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write_parquet(tmp, np.concatenate([ids, new_ids]), np.concatenate([vecs, new]))
    evict(tmp)  # fsync
    os.replace(tmp, path)
    fsync_dir(path.parent)


def time_reps(fn, reps: int) -> tuple[list[float], list[int]]:
    secs, wrote = [], []
    for r in range(reps):
        w0 = wchar()
        t0 = time.perf_counter()
        fn(r)
        secs.append(time.perf_counter() - t0)
        wrote.append(wchar() - w0)
    return secs, wrote


# --------------------------------------------------------------------------------------------
# find (tables 3a, 3b)
# --------------------------------------------------------------------------------------------


# A small launcher process runs the command: on Linux a child's ru_maxrss (wait4) starts from the RSS of
# the process it was forked/exec'd from, so measured straight from this process (GBs of vectors) every
# command would report at least this process's size.
_LAUNCHER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from common import run_measured
m = run_measured(json.loads(sys.argv[2]), env=json.loads(sys.argv[3]))
print(json.dumps({k: getattr(m, k) for k in ("argv", "seconds", "returncode", "stdout", "stderr", "max_rss_mb",
                                              "tree_peak_mb")}))
"""


def run_measured_small(argv: list[str], env: dict) -> Measured:
    """common.run_measured of `argv`, called from a fresh small process (see _LAUNCHER)."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, str(Path(__file__).resolve().parent), json.dumps(argv),
                          json.dumps(env)], capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    return Measured(d["argv"], d["seconds"], d["returncode"], d["stdout"], d["stderr"], d["max_rss_mb"],
                    d["tree_peak_mb"])


# One row of table 3b in a fresh process: its VmHWM is then the peak of this step alone.
_SEARCH_CHILD = """
import json, sys, time
job = json.loads(sys.argv[1])
sys.path.insert(0, job["repo"])
import numpy as np
import index.facesearch  # imported before the clock, as `find` has by then
from index.library import Library
from verify.queries.find import library_search

def mb(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024

pooled = np.load(job["pooled"])
with Library.open(job["db"], readonly=True) as lib:
    lib.generation()
    rss0 = mb("VmRSS")
    t0 = time.perf_counter()
    s = library_search(lib, job["model"], job["kind"])
    t1 = time.perf_counter()
    lims, found, sims = s.range_search(pooled, job["threshold"])
    t2 = time.perf_counter()
    hwm = mb("VmHWM")
print(json.dumps({"kind": s.kind, "nlist": s.nlist, "nprobe": s.nprobe, "build_s": t1 - t0, "search_s": t2 - t1,
                  "rss0_mb": rss0, "hwm_mb": hwm, "found": found.tolist(),
                  "seconds": s.header.calibration.get("seconds")}))
"""


def make_gallery(path: Path, alice: np.ndarray, threshold: float) -> None:
    from index.gallery import Gallery

    if path.exists():
        shutil.rmtree(path)
    sources = [f"/enroll/alice/alice_{i:02d}.jpg" for i in range(len(alice))]
    shas = [hashlib.sha256(s.encode()).hexdigest() for s in sources]
    g = Gallery.create(path, dim=alice.shape[1], fingerprint=FINGERPRINT, threshold=threshold)
    try:
        g.add(alice, "alice", sources=sources, sha256s=shas)
        g.save()
    finally:
        g.close()


def report_counts(path: Path, alice_keys: set[tuple[str, int]]) -> tuple[int, int, int]:
    """(rows, alice library faces among the matched rows, other matched faces) of a CSV report."""
    rows = found = other = 0
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows += 1
            if r["match"] == "True" and r["identity"] == "alice":
                if (r["path"], int(r["face"])) in alice_keys:
                    found += 1
                else:
                    other += 1
    return rows, found, other


# --------------------------------------------------------------------------------------------
# The run: what every table shares, and the tables in order
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the tables share: the arguments, the synthetic library and where it is kept."""

    args: argparse.Namespace
    layout: Layout
    work: Path
    keep: bool  # --work given: the folder (and a built index) stays for a later run
    env: dict
    x: np.ndarray | None = None  # (N, D) the library's faces, freed once the index is built
    labels: np.ndarray | None = None  # (N,) identity of each face
    gen: Any = None  # the synthetic_faces generator (fresh draws of any identity)
    t_gen: float = 0.0
    stats_line: str = ""
    alice_keys: set = field(default_factory=set)  # (path, face number) of alice's library faces
    alice_gallery: np.ndarray | None = None  # (E, D) her enrolled draws
    gallery: Path | None = None  # made by table 3a, used by 3b
    cache: Path | None = None  # the search index kept beside the database
    alice_ids: np.ndarray | None = None  # catalogue face ids of alice's library faces

    @property
    def n(self) -> int:
        return self.layout.n_faces

    @property
    def dim(self) -> int:
        return self.args.dim

    @property
    def fpf(self) -> int:
        return self.layout.fpf

    @property
    def db(self) -> Path:
        return self.work / "library.db"

    @property
    def side(self) -> Path:
        return self.work / "sidecar"

    def sidecar_files(self) -> tuple[Path, Path, Path]:
        """(vectors.npy, ids.npy, vectors.parquet): written by table 2a, rewritten by 2b, then removed."""
        return self.side / "vectors.npy", self.side / "ids.npy", self.side / "vectors.parquet"


def make_data(run: Run) -> None:
    """The synthetic faces, alice's library faces and gallery draws; the run's header lines."""
    import faiss

    from index import facesearch

    args, layout, work = run.args, run.layout, run.work
    n, dim, fpf = run.n, run.dim, run.fpf
    log(f"generating {n:,} synthetic faces ...")
    rng = np.random.default_rng(args.seed)
    (x, labels, gen), t_gen = measure(lambda: synthetic_faces(n, dim, rng, per_identity=args.per_identity))[:2]
    stats_line = face_stats(x, labels, np.random.default_rng(args.seed + 1))
    alice_rows = np.flatnonzero(labels == ALICE)
    alice_keys = {(layout.path(int(i) // fpf), int(i) % fpf) for i in alice_rows}
    gen.rng = np.random.default_rng(args.seed + 2)  # fresh draws below do not depend on N
    alice_gallery = gen.faces(np.full(args.enroll, ALICE))  # (E, D)

    print(f"# Library index at scale: {n:,} faces, {layout.n_files:,} files, {dim}-d, "
          f"{args.per_identity} faces per identity, {fpf} faces per file")
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at start; sqlite {sqlite3.sqlite_version}, "
          f"faiss {faiss.__version__}, numpy {np.__version__}; work folder {work}")
    print(f"data: {stats_line}; alice = identity {ALICE}: {len(alice_rows)} library faces, "
          f"{args.enroll} fresh draws enrolled, threshold {args.threshold}")
    print(f"index.facesearch: IVF_MIN_FACES = {facesearch.IVF_MIN_FACES:,}, so kind='auto' picks "
          f"{facesearch.choose_kind(n)!r} at N = {n:,}")
    print()
    run.x, run.labels, run.gen, run.t_gen, run.stats_line = x, labels, gen, t_gen, stats_line
    run.alice_keys, run.alice_gallery = alice_keys, alice_gallery


def table_build(run: Run) -> None:
    """1a. Building the index through Library.record (or reusing a kept one); 1b. its size on disk."""
    args, layout, work, keep, db = run.args, run.layout, run.work, run.keep, run.db
    n, dim, fpf, x, t_gen = run.n, run.dim, run.fpf, run.x, run.t_gen
    params = {"faces": n, "dim": dim, "per_identity": args.per_identity, "fpf": fpf, "seed": args.seed,
              "batch_files": args.batch_files}
    meta_path = work / "build.json"
    stored = json.loads(meta_path.read_text()) if keep and meta_path.exists() and db.exists() else None
    if stored is not None and stored.get("params") == params:
        with Library.open(db, readonly=True) as lib:
            present = lib.stats()["faces"]
        if present != n:
            stored = None
    else:
        stored = None
    if stored is None:
        for p in work.glob("library.db*"):
            p.unlink()
        log("building the index ...")
        build = build_index(db, x, layout, args.batch_files, args.seed)
        build["gen_s"] = t_gen
        meta_path.write_text(json.dumps({"params": params, "build": build}, indent=1))
        tag = ""
    else:
        build = stored["build"]
        tag = " (stored)"
        log("reusing the index in the work folder")
    run.x = x = None  # the index holds them now

    print("## 1a. Building the index through index.library.Library")
    rows = [
        ["generate the vectors (synthetic_faces)" + tag, fmt_s(build["gen_s"]), f"{n / build['gen_s']:,.0f}", "-"],
        ["make the FileRecords" + tag, fmt_s(build["make_s"]), f"{n / build['make_s']:,.0f}",
         f"{layout.n_files / build['make_s']:,.0f}"],
        [f"Library.record, {build['transactions']} transactions of {args.batch_files:,} files" + tag,
         fmt_s(build["record_s"]), f"{n / build['record_s']:,.0f}", f"{layout.n_files / build['record_s']:,.0f}"],
        ["close (checkpoint the WAL)" + tag, fmt_s(build["close_s"]), "-", "-"],
    ]
    print_table(["step", "seconds", "faces/s", "files/s"], rows)
    print(f"\nmeasured: wall time of each step in this process; record = the calls to Library.record only (one "
          f"transaction each, WAL, synchronous=NORMAL); WAL before the close: "
          f"{build['wal_bytes_before_close'] / MB:,.0f} MB.\n")

    parts, db_bytes, wal_bytes = size_parts(db)
    print("## 1b. Size on disk (after the writer closed: WAL checkpointed into the database)")
    rows = [[label, f"{b / MB:,.1f}", f"{b / n:,.0f}", ratio(b / n, dim * 4)] for label, b in parts]
    rows.append(["total: database + WAL", f"{(db_bytes + wal_bytes) / MB:,.1f}", f"{(db_bytes + wal_bytes) / n:,.0f}",
                 ratio((db_bytes + wal_bytes) / n, dim * 4)])
    rows.append([f"raw vectors alone ({dim} x float32)", f"{n * dim * 4 / MB:,.1f}", f"{dim * 4}", "1.00x"])
    print_table(["part", "MB", "bytes/face", "vs raw vector"], rows)
    emb = parts[0][1] + parts[1][1]
    print(f"\nmeasured: SQLite dbstat pages per table/index (4 KiB pages); the embeddings take {emb / n:,.0f} B/face "
          f"({emb / n - dim * 4:,.0f} B over the raw {dim * 4} B: the model fingerprint and face id per row, twice "
          f"with the index, and page fill), the catalogue {(db_bytes - emb) / n:,.0f} B/face; WAL after close: "
          f"{wal_bytes:,} B.\n")


def table_reads(run: Run) -> None:
    """2a. Reading all N vectors + ids back: SQLite against .npy and Parquet sidecars, cold and warm."""
    n, dim, db = run.n, run.dim, run.db
    log("reads ...")
    payload = n * (dim * 4 + 8)
    wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
    vec_npy, id_npy, parq = run.sidecar_files()

    read_rows = []

    def read_row(label: str, files: list[Path], fn, note: str = "", rate: bool = True) -> object:
        evict(*files)
        out, t_cold, mem_cold = measure(fn)
        del out
        out, t_warm, mem_warm = measure(fn)
        read_rows.append([label, fmt_s(t_cold), f"{payload / t_cold / MB:,.0f}" if rate else "-", fmt_s(t_warm),
                          f"{payload / t_warm / MB:,.0f}" if rate else "-", f"{max(mem_cold, mem_warm):,.0f}", note])
        return out

    ids, vecs = read_row("SQLite: Library.embeddings(model) (what find reads)", [db, wal],
                         lambda: read_library(db), "count(faces) + join files/faces, ORDER BY face_id, fetchmany blocks")
    assert len(ids) == n, (len(ids), n)
    read_row("  of which: SELECT count(*) FROM faces", [db, wal], lambda: read_count(db, "SELECT count(*) FROM faces"),
             "the upper bound it preallocates for", rate=False)
    read_row("  not: SELECT count(*) FROM embeddings WHERE model = ?", [db, wal],
             lambda: read_count(db, "SELECT count(*) FROM embeddings WHERE model = ?", FINGERPRINT),
             "walks the whole embeddings b-tree", rate=False)
    read_row("  SQLite: SELECT face_id, vector (no join, no count)", [db, wal], lambda: read_blobs(db, n, dim),
             "raw sqlite3, row-by-row fill")
    write_npy(vec_npy, vecs)
    write_npy(id_npy, ids)
    write_parquet(parq, ids, vecs)
    read_row("sidecar .npy: np.load (vectors + ids)", [vec_npy, id_npy], lambda: read_npy(vec_npy, id_npy),
             f"{(vec_npy.stat().st_size + id_npy.stat().st_size) / MB:,.0f} MB of files")
    read_row("sidecar .npy: np.load(mmap_mode='r') + one full pass", [vec_npy, id_npy],
             lambda: pass_mmap(vec_npy, id_npy), "sum over every row; nothing copied")
    read_row("sidecar Parquet: pyarrow read_table -> numpy", [parq], lambda: read_parquet(parq),
             f"{parq.stat().st_size / MB:,.0f} MB, uncompressed")
    print(f"## 2a. Reading all {n:,} vectors + ids back (payload {payload / MB:,.0f} MB)")
    print_table(["read", "cold s", "cold MB/s", "warm s", "warm MB/s", "peak RSS added MB", "note"], read_rows,
                right=[False, True, True, True, True, True, False])
    print("\nmeasured: wall time in this process; cold = after fsync + posix_fadvise(DONTNEED) of the files "
          "(this VM's page cache; the host's may still hold them), warm = the same read again at once; "
          "MB/s = N x (512 + 8) B / s.\n")
    del vecs


def table_writes(run: Run) -> None:
    """2b. Writing one scan batch into the N-face index, and what a sidecar layout would add."""
    args, db, side, gen = run.args, run.db, run.side, run.gen
    n, dim, fpf = run.n, run.dim, run.fpf
    vec_npy, id_npy, parq = run.sidecar_files()
    log("writes ...")
    wrng = np.random.default_rng(args.seed + 3)
    detector = detector_string()
    others = np.arange(1, len(gen.centres))
    batches = [gen.faces(wrng.choice(others, WRITE_FILES * fpf)) for _ in range(args.write_reps)]
    tag_run = f"run-{os.getpid()}-{int(time.time())}"
    write_rows = []

    def write_row(label: str, secs: list[float], wrote: list[int], kill: str, power: str) -> None:
        write_rows.append([label, f"{np.median(secs) * 1e3:,.1f}", f"{np.mean(secs) * 1e3:,.1f}",
                           f"{np.max(secs) * 1e3:,.1f}", f"{np.median(wrote):,.0f}", kill, power])

    with Library.open(db) as lib:
        recs = [make_records([f"{WRITES_ROOT}/{tag_run}/f{r:03d}/file_{j:02d}.jpg" for j in range(WRITE_FILES)],
                             batches[r], fpf, wrng, detector, 50_000_000 + r * 100) for r in range(args.write_reps)]
        secs, wrote = time_reps(lambda r: lib.record(recs[r], FINGERPRINT), args.write_reps)
        write_row(f"SQLite Library.record: {WRITE_FILES} files, {WRITE_FILES * fpf} faces + embeddings (product)",
                  secs, wrote, "yes (one transaction)", "last commits may be lost, no corruption (WAL, NORMAL)")
        recs = [make_records([f"{WRITES_ROOT}/{tag_run}/n{r:03d}/file_{j:02d}.jpg" for j in range(WRITE_FILES)],
                             np.zeros((0, dim), np.float32), fpf, wrng, detector, 60_000_000 + r * 100)
                for r in range(args.write_reps)]
        secs, wrote = time_reps(lambda r: lib.record(recs[r], None), args.write_reps)
        write_row(f"SQLite Library.record: {WRITE_FILES} face-less files (catalogue rows only)", secs, wrote,
                  "yes", "as above")
        gone = lib.mark_gone([WRITES_ROOT], set())
    log(f"  marked {gone} benchmark write files gone")

    log_path = side / "vectors.log"
    log_path.unlink(missing_ok=True)
    new_ids = [np.arange(10**9 + r * 64, 10**9 + r * 64 + len(b), dtype=np.int64) for r, b in enumerate(batches)]

    def append(r: int, sync: bool) -> None:
        with open(log_path, "ab") as f:
            f.write(new_ids[r].tobytes() + batches[r].tobytes())
            if sync:
                f.flush()
                os.fsync(f.fileno())

    secs, wrote = time_reps(lambda r: append(r, False), args.write_reps)
    write_row("+ sidecar append log (ids + vectors), no fsync", secs, wrote,
              "only with its committed length in the SQLite transaction", "no")
    secs, wrote = time_reps(lambda r: append(r, True), args.write_reps)
    write_row("+ sidecar append log + fsync", secs, wrote, "as above", "yes")
    secs, wrote = time_reps(lambda r: rewrite_npy(vec_npy, batches[r]), min(3, args.write_reps))
    write_row(f"+ sidecar .npy rewritten ({n:,}+64 rows): temp, fsync, rename", secs, wrote, "yes", "yes")
    secs, wrote = time_reps(lambda r: rewrite_parquet(parq, new_ids[r], batches[r]), min(2, args.write_reps))
    write_row(f"+ sidecar Parquet rewritten ({n:,}+64 rows): temp, fsync, rename", secs, wrote, "yes", "yes")
    for p in (log_path, vec_npy, id_npy, parq):
        p.unlink(missing_ok=True)
    print(f"## 2b. Writing one scan batch ({WRITE_FILES} files, {WRITE_FILES * fpf} faces) into the {n:,}-face index")
    print_table(["write", "median ms", "mean ms", "max ms", "bytes written", "kill -9 safe", "power-cut safe"],
                write_rows, right=[False, True, True, True, True, False, False])
    print(f"\nmeasured: wall time per batch over {args.write_reps} batches (rewrites: 3 and 2), page cache warm; "
          f"bytes = /proc/self/io wchar (SQLite: WAL frames; the mean includes the WAL checkpoints every 1000 "
          f"pages); '+' rows are what a sidecar layout adds to its own catalogue transaction.\n")


def table_find_cli(run: Run) -> None:
    """3a. `faceverify find` over the index in a subprocess: first (no search index kept) and again."""
    from index import facesearch
    from verify.queries.find import search_cache_path

    args, work, db, env, layout = run.args, run.work, run.db, run.env, run.layout
    n, alice_keys = run.n, run.alice_keys
    gallery = work / "gallery"
    make_gallery(gallery, run.alice_gallery, args.threshold)
    with Library.open(db, readonly=True) as lib:
        cache = search_cache_path(lib, FINGERPRINT)
        alice_files = lib.files(sorted({p for p, _ in alice_keys}))
        per_file = lib.faces([s.id for s in alice_files.values()])
        alice_ids = np.array(sorted(per_file[alice_files[p].id][0][k] for p, k in alice_keys), np.int64)
    cache.unlink(missing_ok=True)
    kind = facesearch.choose_kind(n)
    reports = work / "reports"
    reports.mkdir(exist_ok=True)
    find_rows = []

    def cli_find(label: str, names: list[str], out: Path, timeout: int, kind_note: str) -> None:
        out.unlink(missing_ok=True)
        argv = ["timeout", str(timeout), str(FACEVERIFY), "find", *names, "--gallery", str(gallery),
                "--index", str(db), "--out", str(out)]
        log(f"  {label} ...")
        m = run_measured_small(argv, env)
        if m.returncode == 124:
            find_rows.append([label, kind_note, f"> {timeout}", "-", "-", "-", "-", "-", "killed at the timeout"])
            return
        if m.returncode not in (0, 1) or not out.exists():
            m.check(label)
        rows_, found, other = report_counts(out, alice_keys)
        last = (m.stdout.strip().splitlines() or [""])[-1].split(" -> ")[0]
        find_rows.append([label, kind_note, fmt_s(m.seconds), f"{m.max_rss_mb:,.0f}", f"{m.tree_peak_mb:,.0f}",
                          f"{rows_:,}", f"{found / len(alice_keys):.3f} ({found}/{len(alice_keys)})", f"{other:,}",
                          last[:90]])

    log("find (CLI) ...")
    cli_find("find alice: first (no search index kept)", ["alice"], reports / "alice1.csv", args.find_timeout,
             f"{kind}" + (": built + saved" if kind != "flat" else ": built"))
    kept = cache.exists()
    cli_find("find alice: again", ["alice"], reports / "alice2.csv", args.find_timeout,
             f"{kind}" + (": loaded" if kept else ": built"))
    if args.full_report:
        cli_find("find (everyone, every file): --full-report", [], reports / "all.csv", args.full_report_timeout,
                 "none (matches every face)")
    else:
        find_rows.append(["find (everyone, every file)", "-", "skipped", "-", "-", "-", "-", "-",
                          "not run: pass --full-report"])
    print(f"## 3a. faceverify find over {n:,} faces ({layout.n_files:,} files), subprocess")
    print_table(["command", "search index", "wall s", "max RSS MB", "tree peak MB", "report rows", "alice recall",
                 "other faces matched", "its last line"], find_rows,
                right=[False, False, True, True, True, True, True, True, False])
    print("\nmeasured: common.run_measured (from a small launcher process) of `.venv/bin/faceverify find [alice] "
          "--gallery G --index DB --out R.csv` (interpreter start and imports included); max RSS = the largest "
          "process (wait4), tree = "
          "sampled sum; recall = alice's library faces matched in the report / all of hers.\n")
    run.gallery, run.cache, run.alice_ids = gallery, cache, alice_ids


def table_search(run: Run) -> None:
    """3b. find's search step, flat vs IVF, each row in a fresh process."""
    args, work, db, env = run.args, run.work, run.db, run.env
    gallery, cache, alice_ids = run.gallery, run.cache, run.alice_ids
    log("flat vs IVF, one fresh process per row ...")
    from index.gallery import Gallery
    from verify.identity.galleries import build_matcher

    matcher = build_matcher(Gallery.open(gallery))
    pooled = np.asarray(matcher.pooled["alice"], np.float32)  # (m, D)
    thr = matcher.similarity_threshold_of("alice")
    pooled_path = work / "alice-pooled.npy"
    np.save(pooled_path, pooled)
    search_rows = []
    flat_found = None

    def search_row(label: str, kind: str, file_note: str = "-") -> None:
        nonlocal flat_found
        job = {"repo": str(REPO), "db": str(db), "model": FINGERPRINT, "kind": kind, "pooled": str(pooled_path),
               "threshold": thr}
        proc = subprocess.run([sys.executable, "-c", _SEARCH_CHILD, json.dumps(job)], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        cand = np.unique(np.asarray(r["found"], np.int64))
        if flat_found is None:
            flat_found = cand
        rec = np.isin(alice_ids, cand).mean()
        vs_flat = np.isin(flat_found, cand).mean() if len(flat_found) else 1.0
        extra = f"nlist {r['nlist']}, nprobe {r['nprobe']}" if r["kind"] == "ivf" else ""
        if r["kind"] == "ivf" and "build" in label and r.get("seconds"):
            sec = r["seconds"]
            extra += f"; train {sec['train']} s, add {sec['add']} s, calibrate {sec['calibrate']} s"
        search_rows.append([label, r["kind"], fmt_s(r["build_s"]), file_note() if callable(file_note) else file_note,
                            f"{r['search_s']:.3f}", f"{len(cand):,}", f"{rec:.3f}", f"{vs_flat:.3f}",
                            f"{r['hwm_mb']:,.0f}", f"{r['rss0_mb']:,.0f}", extra])

    size = lambda: f"{cache.stat().st_size / MB:,.0f} MB"  # noqa: E731
    cache.unlink(missing_ok=True)  # else library_search loads a fresh saved index whatever the kind
    search_row("flat: read embeddings + build (every find)", "flat", "not kept")
    if not args.no_ivf:
        cache.unlink(missing_ok=True)
        search_row("ivf: read embeddings + build + save", "ivf", size)
        evict(cache)
        search_row("ivf, kept: load the saved index (cold)", "ivf", size)
        search_row("ivf, kept: load the saved index (warm)", "ivf", size)
    else:
        search_rows.append(["ivf", "-", "skipped (--no-ivf)", "-", "-", "-", "-", "-", "-", "-", ""])
    print(f"## 3b. find's search step: library_search(lib, model, kind) + one range search of alice's "
          f"{len(pooled)} pooled vectors at similarity >= {thr}")
    print_table(["library_search", "kind", "build/load s", "file", "search s", "candidates", "alice recall",
                 "recall vs flat", "peak RSS MB", "RSS before MB", "note"], search_rows,
                right=[False, False, True, True, True, True, True, True, True, True, False])
    print("\nmeasured: each row in a fresh Python process (imports and the opened index before the clock): "
          "the body of verify.queries.find.candidate_faces for one person; candidates = faces with a similarity >= "
          "the bound to one pooled vector (the matcher then decides on those); peak RSS = the process's "
          "VmHWM after the search, RSS before = its VmRSS before library_search.\n")


# In order: each uses what the ones before it left in the Run.
TABLES = (make_data, table_build, table_reads, table_writes, table_find_cli, table_search)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", type=float, default=1e6)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--per-identity", type=int, default=20)
    ap.add_argument("--faces-per-file", type=int, default=2)
    ap.add_argument("--batch-files", type=int, default=5000, help="files per transaction while building")
    ap.add_argument("--enroll", type=int, default=20, help="fresh draws of alice's identity in the gallery")
    ap.add_argument("--threshold", type=float, default=0.5, help="the gallery's similarity threshold")
    ap.add_argument("--write-reps", type=int, default=20)
    ap.add_argument("--full-report", action="store_true", help="also time `find` of everyone (every file)")
    ap.add_argument("--full-report-timeout", type=int, default=600)
    ap.add_argument("--find-timeout", type=int, default=600)
    ap.add_argument("--no-ivf", action="store_true", help="skip the IVF rows of table 3b")
    ap.add_argument("--work", type=Path, default=None, help="keep the index here and reuse it (default: a temp folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    keep = args.work is not None
    work = args.work.absolute() if keep else Path(tempfile.mkdtemp(prefix="faceverify-libscale-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(args, Layout(int(args.faces), args.faces_per_file), work, keep,
              env={**os.environ, "FACEVERIFY_HOME": str(work / "home")})
    run.side.mkdir(exist_ok=True)
    try:
        for table in TABLES:
            table(run)
        print(f"total run time {time.perf_counter() - t_start:,.0f} s")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
