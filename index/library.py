"""The library index: every file a scan walked and every face it found, in one SQLite database.

Torch-free (numpy in, numpy out). One database file (default `library.db` beside the gallery) in WAL
mode, so readers (`find`, `people`, the HTML page) work while a scan writes:

    files       one row per path ever walked: size, mtime_ns, ctime_ns, inode (the change signature),
                sha256 of the content, status (face | no-face | error | skipped), error, number of
                faces, the detector settings it was analysed with, present (0 once the file vanished)
    faces       per face of a file: box, detector probability, 5 landmarks (original pixels), quality
                (index.quality: the score, and the two signals only a scan can measure, blur and outside)
    embeddings  per (model fingerprint, face): the unit vector, float32 BLOB; each model keeps its own
    runs        one row per scan: folders, model, detector, counts, finished or not
    groups      the last grouping of unknown faces per model (`faceverify people`), for `enroll --group`
    decisions   (schema 2) what a person decided about a face: confirm / reject NAME, ignore (not a
                face), undo of an earlier decision; keyed by the photo's content hash and face number,
                never by an embedding, so a decision outlives a re-scan, a model change and a move
    meta        created, schema notes

Embeddings are BLOBs in the database rather than a columnar sidecar: a file's faces and vectors are
then committed in the same transaction as its row, which is what makes a scan killed at any moment
resumable with nothing lost or counted twice, and reading 1e6 vectors back costs 1.6 s warm, 3.6 s cold
(bench/bench_library_scale.py measures both layouts).

Versioning: `PRAGMA application_id` marks the file as ours and `PRAGMA user_version` is the schema
version. A database of another application, or of a newer schema, is refused with one line
(LibraryError) and never written to.

Writers: one scan at a time, enforced by a lock file beside the database (`<db>.lock`, filelock);
a second scan gets LibraryBusy (one line) instead of interleaving its writes. Every batch of files is
one transaction: a kill -9 leaves the batches before it committed and nothing of the one in flight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import filelock
import numpy as np

log = logging.getLogger(__name__)

APPLICATION_ID = 0x46564C49  # "FVLI": faceverify library index
SCHEMA_VERSION = 3
STATUSES = ("face", "no-face", "error", "skipped")

_SCHEMA = """
CREATE TABLE files (
    id        INTEGER PRIMARY KEY,
    path      TEXT NOT NULL UNIQUE,     -- the report's path text (absolute, UTF-8 safe)
    fs_path   BLOB NOT NULL,            -- os.fsencode of the path to open
    size      INTEGER,
    mtime_ns  INTEGER,
    ctime_ns  INTEGER,
    inode     INTEGER,
    sha256    TEXT,                     -- content hash of files that were read
    status    TEXT NOT NULL CHECK (status IN ('face', 'no-face', 'error', 'skipped')),
    error     TEXT,
    faces     INTEGER,                  -- faces found (0: no-face; NULL: error / skipped)
    detector  TEXT,                     -- the detector settings the faces were found with
    present   INTEGER NOT NULL DEFAULT 1,
    run_id    INTEGER                   -- the run that last analysed or checked it
);
CREATE INDEX files_size ON files (size, sha256);
CREATE TABLE faces (
    id        INTEGER PRIMARY KEY,
    file_id   INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    face      INTEGER NOT NULL,         -- 0, 1, ... largest first
    x1 REAL, y1 REAL, x2 REAL, y2 REAL, -- box in original image pixels
    prob      REAL,
    landmarks BLOB NOT NULL,            -- (5, 2) float32, original image pixels
    UNIQUE (file_id, face)              -- schema 3 adds quality, blur, outside (_MIGRATIONS)
);
CREATE TABLE models (
    fingerprint TEXT PRIMARY KEY,
    dim         INTEGER NOT NULL,
    added       TEXT NOT NULL
);
CREATE TABLE embeddings (
    model     TEXT NOT NULL REFERENCES models (fingerprint),
    face_id   INTEGER NOT NULL REFERENCES faces (id) ON DELETE CASCADE,
    vector    BLOB NOT NULL,            -- (D,) float32, unit norm
    PRIMARY KEY (model, face_id)
) WITHOUT ROWID;
CREATE INDEX embeddings_face ON embeddings (face_id);
CREATE TABLE runs (
    id        INTEGER PRIMARY KEY,
    started   TEXT NOT NULL,
    finished  TEXT,
    status    TEXT NOT NULL,            -- running | done (a kill leaves 'running')
    folders   TEXT NOT NULL,            -- JSON list
    model     TEXT,
    detector  TEXT,
    counts    TEXT                      -- JSON: walked, analysed, reused, reembedded, moved, gone
);
CREATE TABLE groups (
    model     TEXT NOT NULL,
    group_id  INTEGER NOT NULL,
    face_id   INTEGER NOT NULL REFERENCES faces (id) ON DELETE CASCADE,
    PRIMARY KEY (model, face_id)
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
"""


# Schema changes after version 1, keyed by the version they lead to: each runs in one transaction when a
# writer opens an older index (readers of an older index see it as it is). A version with no entry here
# changes nothing.
_MIGRATIONS: dict[int, str] = {
    # A decision names a face by its photo's content (sha256) and face number, as the index follows a
    # moved file; `path` only records where the photo was when decided. Rows are never changed or
    # deleted: an undo is a row of its own (kind 'undo', undoes = the decision it cancels).
    2: """
CREATE TABLE decisions (
    id        INTEGER PRIMARY KEY,
    made      TEXT NOT NULL,            -- UTC time, ISO 8601
    origin    TEXT NOT NULL,            -- who decided: cli, review, ...
    kind      TEXT NOT NULL CHECK (kind IN ('confirm', 'reject', 'ignore', 'undo')),
    sha256    TEXT,                     -- the photo's content hash (NULL for an undo)
    face      INTEGER,                  -- face number in that photo (0 = largest)
    name      TEXT,                     -- confirm / reject: the identity
    path      TEXT,                     -- the photo's path when decided (for people to read)
    x1 REAL, y1 REAL, x2 REAL, y2 REAL, -- the face's box when decided: a re-detection that numbers
                                        -- the photo's faces differently still finds it
    undoes    INTEGER REFERENCES decisions (id),
    CHECK ((kind = 'undo') = (undoes IS NOT NULL)),
    CHECK (kind = 'undo' OR (sha256 IS NOT NULL AND face IS NOT NULL)),
    CHECK ((kind IN ('confirm', 'reject')) = (name IS NOT NULL))
);
CREATE INDEX decisions_face ON decisions (sha256, face);
CREATE UNIQUE INDEX decisions_undone ON decisions (undoes);
CREATE INDEX files_sha256 ON files (sha256);
""",
    # 3: face quality (index.quality). blur and outside need the pixels / the photo's size, which only
    # the scan has, so they are kept; quality is recomputable from the stored columns (Library.fill_quality
    # scores faces indexed before, with blur and outside unknown).
    3: "ALTER TABLE faces ADD COLUMN quality REAL;"
       "ALTER TABLE faces ADD COLUMN blur REAL;"      # variance of the Laplacian of the aligned crop
       "ALTER TABLE faces ADD COLUMN outside REAL;",  # share of the box outside the photo
}
DECISION_KINDS = ("confirm", "reject", "ignore")


class LibraryError(RuntimeError):
    """The index cannot be opened or written; the message is one line naming the file."""


class LibraryBusy(LibraryError):
    """Another scan is writing this index."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def walk_order_key(path: str) -> tuple:
    """Sort key that orders absolute paths as a scan walks them: per folder, its files (sorted by
    name) before its subfolders (sorted, each walked in turn)."""
    parts = path.split(os.sep)
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


@dataclass
class FaceRecord:
    """One face as stored: box and landmarks in the original image's pixels."""

    box: tuple[float, float, float, float]
    prob: float | None
    landmarks: np.ndarray  # (5, 2) float32
    quality: float | None = None  # index.quality score in (0, 1); None: not scored yet
    blur: float | None = None  # Laplacian variance of the aligned crop (None: pixels were not at hand)
    outside: float | None = None  # share of the box outside the photo (None: photo size not at hand)


@dataclass
class FileRecord:
    """A file's analysis to store: its stat signature, content hash, status and faces (largest first)
    with one embedding per face for `model` (None when the file has no faces)."""

    path: str
    fs_path: str
    size: int | None
    mtime_ns: int | None
    ctime_ns: int | None
    inode: int | None
    status: str
    error: str | None = None
    sha256: str | None = None
    detector: str | None = None
    faces: list[FaceRecord] = field(default_factory=list)
    embeddings: np.ndarray | None = None  # (F, D) float32


@dataclass
class Decision:
    """A `decisions` row; `undone_by`: the id of the undo that cancelled it (None: it stands)."""

    id: int
    made: str
    origin: str
    kind: str  # confirm | reject | ignore | undo
    sha256: str | None
    face: int | None
    name: str | None
    path: str | None
    undoes: int | None
    undone_by: int | None = None


@dataclass
class DecidedFace:
    """A present face of the index that a standing decision is about."""

    face_id: int
    file_id: int
    path: str
    sha256: str
    face: int
    box: tuple[float, float, float, float]


@dataclass
class StoredFile:
    """A `files` row."""

    id: int
    path: str
    fs_path: str
    size: int | None
    mtime_ns: int | None
    ctime_ns: int | None
    inode: int | None
    sha256: str | None
    status: str
    error: str | None
    faces: int | None
    detector: str | None
    present: bool

    def same_stat(self, size: int | None, mtime_ns: int | None, ctime_ns: int | None, inode: int | None) -> bool:
        return (self.size, self.mtime_ns, self.ctime_ns, self.inode) == (size, mtime_ns, ctime_ns, inode)


_FILE_COLUMNS = "id, path, fs_path, size, mtime_ns, ctime_ns, inode, sha256, status, error, faces, detector, present"


def _stored(row: tuple) -> StoredFile:
    return StoredFile(row[0], row[1], os.fsdecode(row[2]), *row[3:12], bool(row[12]))


def _chunks(seq: Sequence, n: int = 900) -> Iterator[Sequence]:
    # SQLite limits bound parameters per statement (32766 in current builds, 999 in old ones).
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


_FACE_VALUES = "x1, y1, x2, y2, prob, landmarks, quality, blur, outside"  # a faces row after (file_id, face)


def _face_values(alias: str) -> str:
    return ", ".join(alias + c.strip() for c in _FACE_VALUES.split(","))


def _face_record(values: Sequence) -> FaceRecord:
    x1, y1, x2, y2, prob, lm, quality, blur, outside = values
    return FaceRecord((x1, y1, x2, y2), prob, np.frombuffer(lm, np.float32).reshape(5, 2).copy(), quality, blur, outside)


def _opt(v: float | None) -> float | None:
    return None if v is None else float(v)


def score_record(face: FaceRecord) -> float:
    """index.quality's score of a stored face from what is stored: box, landmarks, probability, and
    blur and outside where the scan measured them (unknown ones count as typical)."""
    from index.quality import FaceSignals, pose_from_landmarks, quality_score

    x1, y1, x2, y2 = (float(v) for v in face.box)
    yaw, roll, pitch = pose_from_landmarks(face.landmarks)
    return quality_score(FaceSignals(prob=face.prob, size_px=max(min(x2 - x1, y2 - y1), 0.0), outside=face.outside,
                                     yaw=yaw, roll_deg=roll, pitch=pitch, blur=face.blur))


class Library:
    """An open library index. Use `Library.open`; close it (or use it as a context manager)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, readonly: bool) -> None:
        self.path = path
        self._conn = conn
        self.readonly = readonly
        self._lock: filelock.FileLock | None = None

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = True, readonly: bool = False) -> "Library":
        """Open (or with `create`, make) the index at `path`. Raises LibraryError, one line, for a file
        that is not a faceverify index, a newer schema, or a database that cannot be written."""
        path = Path(path).absolute()
        exists = path.exists()
        if not exists and (readonly or not create):
            raise LibraryError(f"{path}: no library index here yet; run faceverify scan first")
        if exists and path.is_dir():
            raise LibraryError(f"{path}: is a folder, not a library index file")
        if not exists:
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as e:
                raise LibraryError(f"{path}: cannot create the index ({e.strerror or e})") from None
        if exists and not readonly and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
            # WAL needs to write the -wal and -shm files beside the database, not only the file itself
            raise LibraryError(f"{path}: the library index cannot be written here (read-only file, folder or "
                               "disk); readers (find, people) still work")
        conn = cls._connect(path, readonly)
        lib = cls(path, conn, readonly)
        try:
            lib._check_or_init(exists)
        except BaseException:
            conn.close()
            raise
        return lib

    @staticmethod
    def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
        try:
            if readonly:
                try:
                    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None,
                                           check_same_thread=False)
                    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError:
                    # On a read-only disk a WAL database cannot make its -shm file: read it as immutable.
                    conn = sqlite3.connect(f"{path.as_uri()}?immutable=1", uri=True, isolation_level=None,
                                           check_same_thread=False)
            else:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA busy_timeout = 30000")
            return conn
        except sqlite3.DatabaseError as e:
            raise LibraryError(f"{path}: cannot open the library index ({e})") from None

    def _check_or_init(self, existed: bool) -> None:
        try:
            app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            tables = self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "readonly" in str(e) or "unable to open" in str(e):
                raise LibraryError(f"{self.path}: the library index cannot be written here ({e})") from None
            raise LibraryError(f"{self.path}: not an SQLite database ({e}); not touching it") from None
        except sqlite3.DatabaseError as e:
            raise LibraryError(f"{self.path}: not an SQLite database ({e}); not touching it") from None
        if app_id == 0 and tables == 0:
            if self.readonly:
                raise LibraryError(f"{self.path}: an empty database, not a library index yet; run faceverify scan")
            self._init_schema()
            return
        if app_id != APPLICATION_ID:
            raise LibraryError(f"{self.path}: an SQLite database of another application (application_id "
                               f"{app_id:#x}), not a faceverify library index; not touching it")
        if version > SCHEMA_VERSION:
            raise LibraryError(f"{self.path}: library index schema version {version} is newer than this faceverify "
                               f"reads ({SCHEMA_VERSION}); upgrade faceverify or use another --index")
        if version < 1:
            raise LibraryError(f"{self.path}: library index without a schema version; not touching it")
        if not self.readonly:
            self._set_wal()
            if version < SCHEMA_VERSION:
                self._migrate(version)

    def _migrate(self, version: int) -> None:
        """Bring an index of an older schema up to SCHEMA_VERSION in one transaction: all or nothing."""
        steps = "".join(_MIGRATIONS.get(v, "") for v in range(version + 1, SCHEMA_VERSION + 1))
        try:
            self._conn.executescript(f"BEGIN IMMEDIATE;{steps}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;")
        except sqlite3.OperationalError as e:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise self._write_error(e) from None
        log.info("%s: library index schema %d -> %d", self.path, version, SCHEMA_VERSION)

    def _set_wal(self) -> None:
        try:
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            # NORMAL in WAL mode: a killed process loses nothing committed; only a power cut may drop
            # the last transactions, never corrupt the file.
            self._conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.OperationalError as e:
            raise self._write_error(e) from None
        if mode.lower() != "wal":
            log.warning("%s: journal mode %s (WAL not available here): readers wait for writers", self.path, mode)

    def _write_error(self, e: Exception) -> LibraryError:
        msg = str(e)
        if "readonly" in msg or "read-only" in msg or "unable to open" in msg:
            return LibraryError(f"{self.path}: the library index cannot be written (read-only disk or file: {msg}); "
                                "use --index elsewhere, or --no-index")
        return LibraryError(f"{self.path}: library index write failed ({msg})")

    def _init_schema(self) -> None:
        try:
            self._set_wal()
            # One script, one transaction: the schema and the marks that make it ours appear together.
            created = _now().replace("'", "")
            steps = "".join(_MIGRATIONS.get(v, "") for v in range(2, SCHEMA_VERSION + 1))
            self._conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}{steps}PRAGMA application_id = {APPLICATION_ID};"
                                     f"PRAGMA user_version = {SCHEMA_VERSION};"
                                     f"INSERT INTO meta VALUES ('created', '{created}');COMMIT;")
        except sqlite3.OperationalError as e:
            raise self._write_error(e) from None
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)  # biometric data
        log.info("%s: new library index", self.path)

    def close(self) -> None:
        self.release()
        self._conn.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- writing

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def acquire(self, timeout: float = 0.0) -> None:
        """Become the one writer (a scan) of this index; LibraryBusy after `timeout` seconds."""
        if self.readonly:
            raise LibraryError(f"{self.path}: opened read-only")
        if self._lock is None:
            self._lock = filelock.FileLock(self.lock_path, timeout=timeout, mode=0o600, thread_local=False)
        try:
            self._lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise LibraryBusy(f"{self.path}: another scan is writing this index; wait for it to finish "
                              "(or use another --index)") from None
        except OSError as e:
            raise self._write_error(e) from None

    def release(self) -> None:
        if self._lock is not None and self._lock.is_locked:
            self._lock.release(force=True)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._write_error(e) from None
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        try:
            self._conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            self._conn.execute("ROLLBACK")
            raise self._write_error(e) from None

    @staticmethod
    def _bump(c: sqlite3.Connection) -> None:
        # Every change to which faces are present or embedded bumps the generation: a search index built
        # over the library's faces (verify.queries.find.library_search) is stale when it differs.
        c.execute("INSERT INTO meta VALUES ('generation', '1') ON CONFLICT (key) DO UPDATE "
                  "SET value = CAST(value AS INTEGER) + 1")

    def generation(self) -> int:
        """A counter that changes whenever the present faces or their embeddings change."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def begin_run(self, folders: Sequence[str], model: str | None, detector: str | None) -> int:
        with self.transaction() as c:
            cur = c.execute("INSERT INTO runs (started, status, folders, model, detector) VALUES (?, 'running', ?, ?, ?)",
                            (_now(), json.dumps(list(folders), ensure_ascii=False), model, detector))
            return int(cur.lastrowid)

    def end_run(self, run_id: int, counts: dict[str, int]) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET finished = ?, status = 'done', counts = ? WHERE id = ?",
                      (_now(), json.dumps(counts), run_id))

    def ensure_model(self, fingerprint: str, dim: int) -> None:
        row = self._conn.execute("SELECT dim FROM models WHERE fingerprint = ?", (fingerprint,)).fetchone()
        if row is None:
            with self.transaction() as c:
                c.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?)", (fingerprint, int(dim), _now()))
        elif row[0] != dim:
            raise LibraryError(f"{self.path}: model {fingerprint} is stored with dimension {row[0]}, not {dim}")

    def _upsert_file(self, c: sqlite3.Connection, r: FileRecord, run_id: int | None) -> int:
        faces = len(r.faces) if r.status == "face" else (0 if r.status == "no-face" else None)
        values = (os.fsencode(r.fs_path), r.size, r.mtime_ns, r.ctime_ns, r.inode, r.sha256, r.status, r.error,
                  faces, r.detector, run_id)
        row = c.execute("SELECT id FROM files WHERE path = ?", (r.path,)).fetchone()
        if row is None:
            cur = c.execute("INSERT INTO files (fs_path, size, mtime_ns, ctime_ns, inode, sha256, status, error, faces, "
                            "detector, run_id, present, path) VALUES (?,?,?,?,?,?,?,?,?,?,?,1,?)", (*values, r.path))
            return int(cur.lastrowid)
        file_id = int(row[0])
        c.execute("DELETE FROM faces WHERE file_id = ?", (file_id,))  # cascades to embeddings and groups
        c.execute("UPDATE files SET fs_path=?, size=?, mtime_ns=?, ctime_ns=?, inode=?, sha256=?, status=?, error=?, "
                  "faces=?, detector=?, run_id=?, present=1 WHERE id=?", (*values, file_id))
        return file_id

    def record(self, records: Sequence[FileRecord], model: str | None, run_id: int | None = None) -> None:
        """Store the analyses of `records` (replacing whatever those paths held) in one transaction."""
        with self.transaction() as c:
            self._bump(c)
            for r in records:
                if r.status not in STATUSES:
                    raise ValueError(f"{r.path}: unknown status {r.status!r}")
                file_id = self._upsert_file(c, r, run_id)
                if not r.faces:
                    continue
                if r.embeddings is None or len(r.embeddings) != len(r.faces) or model is None:
                    raise ValueError(f"{r.path}: {len(r.faces)} faces need as many embeddings and a model")
                vecs = np.ascontiguousarray(r.embeddings, dtype=np.float32)  # (F, D)
                for k, (f, v) in enumerate(zip(r.faces, vecs)):
                    quality = f.quality if f.quality is not None else score_record(f)
                    cur = c.execute("INSERT INTO faces (file_id, face, x1, y1, x2, y2, prob, landmarks, quality, blur, "
                                    "outside) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                                    (file_id, k, *(float(b) for b in f.box), None if f.prob is None else float(f.prob),
                                     np.ascontiguousarray(f.landmarks, dtype=np.float32).reshape(5, 2).tobytes(),
                                     _opt(quality), _opt(f.blur), _opt(f.outside)))
                    c.execute("INSERT INTO embeddings VALUES (?, ?, ?)", (model, cur.lastrowid, v.tobytes()))

    def touch(self, file_id: int, stat: tuple[int | None, int | None, int | None, int | None],
              run_id: int | None = None) -> None:
        """Same content under a new stat signature (e.g. `touch`, a copy back): keep its faces."""
        with self.transaction() as c:
            self._bump(c)  # a gone file may come back
            c.execute("UPDATE files SET size=?, mtime_ns=?, ctime_ns=?, inode=?, present=1, run_id=? WHERE id=?",
                      (*stat, run_id, file_id))

    def copy_file(self, source_id: int, r: FileRecord, run_id: int | None = None) -> int:
        """`r.path` holds the same content as stored file `source_id` (a moved or copied photo): store it
        with the source's status, faces and every model's embeddings, without decoding it."""
        with self.transaction() as c:
            self._bump(c)
            src = c.execute("SELECT status, error, faces, detector, sha256 FROM files WHERE id = ?",
                            (source_id,)).fetchone()
            if src is None:
                raise ValueError(f"no stored file with id {source_id}")
            rec = FileRecord(r.path, r.fs_path, r.size, r.mtime_ns, r.ctime_ns, r.inode, src[0], src[1], src[4], src[3])
            file_id = self._upsert_file(c, rec, run_id)
            c.execute("UPDATE files SET faces = ? WHERE id = ?", (src[2], file_id))
            for face_id, face, *rest in c.execute(f"SELECT id, face, {_FACE_VALUES} FROM faces "
                                                  "WHERE file_id = ? ORDER BY face", (source_id,)).fetchall():
                cur = c.execute(f"INSERT INTO faces (file_id, face, {_FACE_VALUES}) "
                                "VALUES (?,?,?,?,?,?,?,?,?,?,?)", (file_id, face, *rest))
                c.execute("INSERT INTO embeddings (model, face_id, vector) SELECT model, ?, vector FROM embeddings "
                          "WHERE face_id = ?", (cur.lastrowid, face_id))
            return file_id

    def add_embeddings(self, model: str, face_ids: Sequence[int], vectors: np.ndarray) -> None:
        """Store `model`'s (N, D) vectors for existing faces (re-embedding with another model)."""
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vecs) != len(face_ids):
            raise ValueError(f"{len(face_ids)} face ids for {len(vecs)} vectors")
        with self.transaction() as c:
            self._bump(c)
            c.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)",
                          [(model, int(i), v.tobytes()) for i, v in zip(face_ids, vecs)])

    def mark_gone(self, folders: Sequence[str], seen: set[str], run_id: int | None = None) -> int:
        """Files stored under `folders` (or equal to one) that this walk did not see are gone."""
        gone: list[int] = []
        for folder in folders:
            prefix = folder.rstrip(os.sep) + os.sep
            rows = self._conn.execute(
                "SELECT id, path FROM files WHERE present = 1 AND (path = ? OR substr(path, 1, ?) = ?)",
                (folder, len(prefix), prefix)).fetchall()
            gone += [i for i, p in rows if p not in seen]
        if gone:
            with self.transaction() as c:
                self._bump(c)
                for part in _chunks(gone):
                    c.execute(f"UPDATE files SET present = 0, run_id = ? WHERE id IN ({','.join('?' * len(part))})",
                              (run_id, *part))
        return len(gone)

    def save_groups(self, model: str, face_ids: Sequence[int], group_ids: Sequence[int]) -> None:
        """Replace `model`'s grouping of unknown faces (face -> group; -1 = in no group, not stored)."""
        with self.transaction() as c:
            c.execute("DELETE FROM groups WHERE model = ?", (model,))
            c.executemany("INSERT INTO groups VALUES (?, ?, ?)",
                          [(model, int(g), int(f)) for f, g in zip(face_ids, group_ids) if g >= 0])

    # ---------------------------------------------------------------- decisions

    def add_decisions(self, decisions: Sequence[tuple], origin: str) -> list[int]:
        """Store decisions (kind, photo sha256, face number, name, path when decided[, box]) in one
        transaction (all or none); returns their ids. With the face's box (x1, y1, x2, y2), the
        decision follows that face if a later detection numbers the photo's faces otherwise."""
        rows = []
        for kind, sha, face, name, path, *rest in decisions:
            box = tuple(float(v) for v in rest[0]) if rest and rest[0] is not None else (None,) * 4
            rows.append((kind, sha, face, name, path, box))
        for kind, sha, face, name, _, _ in rows:
            if kind not in DECISION_KINDS:
                raise ValueError(f"unknown decision {kind!r} (one of {', '.join(DECISION_KINDS)})")
            if (kind in ("confirm", "reject")) != bool(name and name.strip()):
                raise ValueError(f"a {kind} decision {'needs' if kind != 'ignore' else 'takes no'} a name")
            if not sha or int(face) < 0:
                raise ValueError("a decision needs the photo's content hash and a face number >= 0")
        made = _now()
        with self.transaction() as c:
            return [int(c.execute("INSERT INTO decisions (made, origin, kind, sha256, face, name, path, x1, y1, x2, y2) "
                                  "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                                  (made, origin, kind, sha, int(face), name, path, *box)).lastrowid)
                    for kind, sha, face, name, path, box in rows]

    def undo_decision(self, decision_id: int, origin: str) -> int:
        """Cancel decision `decision_id` (one transaction); returns the undo's own id. LibraryError (one
        line) for an unknown id, an undo, or a decision undone already."""
        with self.transaction() as c:
            row = c.execute("SELECT kind FROM decisions WHERE id = ?", (int(decision_id),)).fetchone()
            if row is None:
                raise LibraryError(f"{self.path}: no decision {decision_id}")
            if row[0] == "undo":
                raise LibraryError(f"{self.path}: decision {decision_id} is an undo; make the decision again instead")
            done = c.execute("SELECT id FROM decisions WHERE undoes = ?", (int(decision_id),)).fetchone()
            if done is not None:
                raise LibraryError(f"{self.path}: decision {decision_id} was undone already (by {done[0]})")
            return int(c.execute("INSERT INTO decisions (made, origin, kind, undoes) VALUES (?, ?, 'undo', ?)",
                                 (_now(), origin, int(decision_id))).lastrowid)

    def _has_decisions(self) -> bool:
        # An index of schema 1 opened read-only has no decisions table (a writer adds it).
        return self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'decisions'"
                                  ).fetchone() is not None

    def decisions(self, standing_only: bool = False) -> list[Decision]:
        """Every decision in the order made (with `standing_only`: confirm / reject / ignore not undone)."""
        if not self._has_decisions():
            return []
        q = ("SELECT d.id, d.made, d.origin, d.kind, d.sha256, d.face, d.name, d.path, d.undoes, u.id "
             "FROM decisions d LEFT JOIN decisions u ON u.undoes = d.id"
             + (" WHERE d.kind != 'undo' AND u.id IS NULL" if standing_only else "") + " ORDER BY d.id")
        return [Decision(*row) for row in self._conn.execute(q)]

    def decided_faces(self) -> dict[int, list[DecidedFace]]:
        """Standing decision id -> the present faces of the index it is about (one per copy of the
        photo): the photo's face whose box overlaps the decided box most (IoU >= 0.5), or for a
        decision without a box the face of its number. A decision whose face is gone has no entry."""
        if not self._has_decisions():
            return {}
        q = ("SELECT d.id, d.face, d.x1, d.y1, d.x2, d.y2, f.id, fi.id, fi.path, fi.sha256, f.face, "
             "f.x1, f.y1, f.x2, f.y2 FROM decisions d "
             "JOIN files fi ON fi.sha256 = d.sha256 AND fi.present = 1 JOIN faces f ON f.file_id = fi.id "
             "WHERE d.kind != 'undo' AND NOT EXISTS (SELECT 1 FROM decisions u WHERE u.undoes = d.id) "
             "ORDER BY d.id, fi.id, f.face")
        best: dict[tuple[int, int], tuple[float, DecidedFace]] = {}  # (decision, file) -> (overlap, face)
        for d_id, d_face, dx1, dy1, dx2, dy2, face_id, file_id, path, sha, k, x1, y1, x2, y2 in self._conn.execute(q):
            box = (x1, y1, x2, y2)
            if dx1 is None:
                overlap = 1.0 if int(k) == int(d_face) else 0.0
            else:
                overlap = box_iou((dx1, dy1, dx2, dy2), box)
            key = (int(d_id), int(file_id))
            if overlap >= 0.5 and (key not in best or overlap > best[key][0]):
                best[key] = (overlap, DecidedFace(int(face_id), int(file_id), path, sha, int(k), box))
        out: dict[int, list[DecidedFace]] = {}
        for (d_id, _), (_, face) in sorted(best.items()):
            out.setdefault(d_id, []).append(face)
        return out

    def face_ids(self, file_ids: Sequence[int] | None = None) -> dict[tuple[str, int], int]:
        """(report path, face number) -> face id of the present files (or of `file_ids`)."""
        q = "SELECT fi.path, f.face, f.id FROM faces f JOIN files fi ON fi.id = f.file_id WHERE fi.present = 1"
        if file_ids is None:
            return {(p, int(k)): int(i) for p, k, i in self._conn.execute(q)}
        out: dict[tuple[str, int], int] = {}
        for part in _chunks([int(i) for i in file_ids]):
            out.update({(p, int(k)): int(i) for p, k, i in self._conn.execute(
                q + f" AND fi.id IN ({','.join('?' * len(part))})", tuple(part))})
        return out

    def face_count(self) -> int:
        """Faces stored (present or gone): a bound that costs milliseconds."""
        return int(self._conn.execute("SELECT count(*) FROM faces").fetchone()[0])

    def file_by_id(self, file_id: int) -> StoredFile | None:
        row = self._conn.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ?", (int(file_id),)).fetchone()
        return _stored(row) if row else None

    # ---------------------------------------------------------------- reading

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Several reads that see one state of the index (a deferred read transaction)."""
        if self._conn.in_transaction:
            yield
            return
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    def files(self, paths: Iterable[str] | None = None, present_only: bool = False) -> dict[str, StoredFile]:
        """Stored files by path (all of them, or those of `paths` that are stored)."""
        where = " WHERE present = 1" if present_only else ""
        if paths is None:
            rows = self._conn.execute(f"SELECT {_FILE_COLUMNS} FROM files{where}").fetchall()
        else:
            rows = []
            for part in _chunks(list(paths)):
                rows += self._conn.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE path IN "
                                           f"({','.join('?' * len(part))})"
                                           + (" AND present = 1" if present_only else ""), tuple(part)).fetchall()
        return {r[1]: _stored(r) for r in rows}

    def same_content(self, size: int, sha256: str) -> StoredFile | None:
        """A stored file of this size and content hash (present or gone), preferring analysed ones."""
        row = self._conn.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE size = ? AND sha256 = ? "
                                 "ORDER BY status = 'face' DESC, present ASC, id LIMIT 1", (size, sha256)).fetchone()
        return _stored(row) if row else None

    def sizes(self) -> set[int]:
        """Sizes of stored files with a content hash (a new file of another size cannot be a moved one)."""
        return {r[0] for r in self._conn.execute("SELECT DISTINCT size FROM files WHERE sha256 IS NOT NULL")}

    def faces(self, file_ids: Sequence[int], model: str | None = None
              ) -> dict[int, tuple[list[int], list[FaceRecord], np.ndarray | None]]:
        """Per file id: (face ids, faces largest first, (F, D) embeddings of `model` or None when any
        face lacks one)."""
        out: dict[int, tuple[list[int], list[FaceRecord], list]] = {}
        for part in _chunks([int(i) for i in file_ids]):
            q = (f"SELECT f.file_id, f.id, {_face_values('f.')}, e.vector FROM faces f "
                 "LEFT JOIN embeddings e ON e.face_id = f.id AND e.model = ? "
                 f"WHERE f.file_id IN ({','.join('?' * len(part))}) ORDER BY f.file_id, f.face")
            for file_id, face_id, *values, vec in self._conn.execute(q, (model, *part)):
                ids, recs, vecs = out.setdefault(file_id, ([], [], []))
                ids.append(face_id)
                recs.append(_face_record(values))
                vecs.append(vec)
        result = {}
        for file_id, (ids, recs, vecs) in out.items():
            emb = None if model is None or any(v is None for v in vecs) else \
                np.frombuffer(b"".join(vecs), np.float32).reshape(len(vecs), -1).copy()
            result[file_id] = (ids, recs, emb)
        return result

    def missing_embeddings(self, model: str, file_ids: Sequence[int]) -> list[int]:
        """Of these files, those with a face that `model` has not embedded."""
        out: list[int] = []
        for part in _chunks([int(i) for i in file_ids]):
            out += [r[0] for r in self._conn.execute(
                "SELECT DISTINCT f.file_id FROM faces f LEFT JOIN embeddings e ON e.face_id = f.id AND e.model = ? "
                f"WHERE e.face_id IS NULL AND f.file_id IN ({','.join('?' * len(part))})", (model, *part))]
        return out

    def embeddings(self, model: str, present_only: bool = True, every: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(face ids (N,), vectors (N, D) float32) of every stored face `model` has embedded; with
        `every` k > 1 only the faces whose id is a multiple of k (a fixed sample of ~1/k of them)."""
        q = ("SELECT e.face_id, e.vector FROM embeddings e JOIN faces f ON f.id = e.face_id "
             "JOIN files fi ON fi.id = f.file_id WHERE e.model = ?" + (" AND fi.present = 1" if present_only else "")
             + (f" AND e.face_id % {int(every)} = 0" if every > 1 else "") + " ORDER BY e.face_id")
        dim = self.model_dim(model) or 0
        # Filled in place block by block, not joined from a list of blobs: one copy of N x D floats at
        # 1e6 faces, not two. The faces count bounds the model's embeddings (one per face and model) and
        # costs milliseconds where counting the embeddings scans them (bench_library_scale.py).
        with self._snapshot():  # the count and the rows from one snapshot, while a scan may write
            n = self._conn.execute("SELECT count(*) FROM faces").fetchone()[0]
            ids = np.empty(n, np.int64)  # (N,) an upper bound: gone files' faces drop out below
            vectors = np.empty((n, dim), np.float32)  # (N, D)
            k = 0
            cur = self._conn.execute(q, (model,))
            while rows := cur.fetchmany(16384):
                m = len(rows)
                ids[k:k + m] = [r[0] for r in rows]
                vectors[k:k + m] = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(m, dim)
                k += m
        return ids[:k], vectors[:k]

    def model_dim(self, model: str) -> int | None:
        row = self._conn.execute("SELECT dim FROM models WHERE fingerprint = ?", (model,)).fetchone()
        return None if row is None else int(row[0])

    def models(self) -> dict[str, int]:
        """Model fingerprint -> number of stored embeddings."""
        return dict(self._conn.execute("SELECT m.fingerprint, count(e.face_id) FROM models m "
                                       "LEFT JOIN embeddings e ON e.model = m.fingerprint GROUP BY m.fingerprint"))

    def face_locations(self, face_ids: Sequence[int]) -> dict[int, tuple[str, str, int, FaceRecord, str | None]]:
        """face id -> (report path, fs path, face number, face, file sha256)."""
        out = {}
        for part in _chunks([int(i) for i in face_ids]):  # numpy ints would bind as blobs
            q = (f"SELECT f.id, fi.path, fi.fs_path, f.face, {_face_values('f.')}, fi.sha256 "
                 f"FROM faces f JOIN files fi ON fi.id = f.file_id WHERE f.id IN ({','.join('?' * len(part))})")
            for fid, path, fs, k, *values, sha in self._conn.execute(q, tuple(part)):
                out[fid] = (path, os.fsdecode(fs), k, _face_record(values), sha)
        return out

    def face_quality(self, face_ids: Sequence[int]) -> np.ndarray:
        """(N,) float64 quality of each face (index.quality), NaN for an id not stored. Faces indexed
        before the score existed are scored from what is stored (score_record), not written back here
        (fill_quality does that)."""
        got: dict[int, float] = {}
        for part in _chunks([int(i) for i in face_ids]):
            q = (f"SELECT id, {_FACE_VALUES} FROM faces WHERE id IN ({','.join('?' * len(part))})")
            for fid, *values in self._conn.execute(q, tuple(part)):
                rec = _face_record(values)
                got[fid] = rec.quality if rec.quality is not None else score_record(rec)
        return np.array([got.get(int(i), np.nan) for i in face_ids], np.float64)

    def fill_quality(self) -> int:
        """Score and store every face without a quality (indexed before schema 3); returns how many."""
        rows = self._conn.execute(f"SELECT id, {_FACE_VALUES} FROM faces WHERE quality IS NULL").fetchall()
        if rows:
            with self.transaction() as c:
                c.executemany("UPDATE faces SET quality = ? WHERE id = ?",
                              [(score_record(_face_record(values)), fid) for fid, *values in rows])
            log.info("%s: scored the quality of %d faces indexed before", self.path, len(rows))
        return len(rows)

    def groups(self, model: str) -> dict[int, list[int]]:
        """The last saved grouping for `model`: group id -> face ids."""
        out: dict[int, list[int]] = {}
        for g, f in self._conn.execute("SELECT group_id, face_id FROM groups WHERE model = ? ORDER BY group_id, face_id",
                                       (model,)):
            out.setdefault(int(g), []).append(int(f))
        return out

    def runs(self) -> list[dict]:
        cols = ("id", "started", "finished", "status", "folders", "model", "detector", "counts")
        rows = self._conn.execute(f"SELECT {', '.join(cols)} FROM runs ORDER BY id").fetchall()
        out = []
        for r in rows:
            d = dict(zip(cols, r))
            d["folders"] = json.loads(d["folders"])
            d["counts"] = json.loads(d["counts"]) if d["counts"] else None
            out.append(d)
        return out

    def stats(self) -> dict[str, int]:
        q = lambda s: int(self._conn.execute(s).fetchone()[0])  # noqa: E731
        return {"files": q("SELECT count(*) FROM files WHERE present = 1"),
                "gone": q("SELECT count(*) FROM files WHERE present = 0"),
                "faces": q("SELECT count(*) FROM faces f JOIN files fi ON fi.id = f.file_id WHERE fi.present = 1"),
                "embeddings": q("SELECT count(*) FROM embeddings"),
                "bytes": self.path.stat().st_size + sum(p.stat().st_size for p in
                                                        (self.path.with_name(self.path.name + s) for s in ("-wal",))
                                                        if p.exists())}
