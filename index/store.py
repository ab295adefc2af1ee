"""On-disk layout of a gallery folder: private files, atomic multi-file commits, the folder lock.

A gallery folder holds

    index.faiss       the FAISS index (ids = `vectors.parquet` ids)
    vectors.parquet   one row per vector: id, identity, source, sha256, view, time
    identities.json   {identity: info dict set by the caller}
    manifest.json     format_version, fingerprint, dim, metric, kind, threshold, ... (written last)
    gallery.lock      the inter-process lock (filelock); may be absent while nobody holds it

Biometric data: the folder is 0700 and every file 0600.

A save must replace four files together. Each is first written in full beside its target as
`.<name>.new` (fsynced); then a small `commit.json` journal naming them is renamed into place (the
commit point), the staged files are renamed over their targets, and the journal is removed. Whoever
next takes the lock finishes an interrupted commit (`recover`) or discards staged files that were
never committed, so a crash at any moment leaves either the old gallery or the new one.
All reads and writes happen under the lock, so no reader sees a half-finished commit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import filelock
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.parquet"
IDENTITIES_FILE = "identities.json"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = "gallery.lock"
JOURNAL_FILE = "commit.json"
# Order matters: the manifest goes last so a folder with a new manifest has new data beside it.
DATA_FILES = (INDEX_FILE, VECTORS_FILE, IDENTITIES_FILE, MANIFEST_FILE)

DIR_MODE = 0o700
FILE_MODE = 0o600

# vectors.parquet schema, in column order.
META_COLUMNS = ("id", "identity", "source", "sha256", "view", "time")
META_DTYPES: dict[str, Any] = {
    "id": "int64",
    "identity": str,
    "source": str,
    "sha256": str,
    "view": "int32",
    "time": "datetime64[us, UTC]",
}


class GalleryError(RuntimeError):
    """A gallery folder is missing, corrupt, locked, or belongs to another model."""


def staged_name(name: str) -> str:
    return f".{name}.new"


def own_files() -> set[str]:
    """Every name a gallery folder may contain (used to refuse creating a gallery in a foreign folder)."""
    return {*DATA_FILES, LOCK_FILE, JOURNAL_FILE, *(staged_name(n) for n in DATA_FILES)}


def make_private_dir(folder: Path) -> None:
    """Create `folder` (and parents) and make it 0700 whatever the umask."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, DIR_MODE)


def fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def private_temp(path: Path) -> Iterator[Path]:
    """Yield a 0600 temp path beside `path`; on success fsync it and rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mkstemp: 0600
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)  # a writer that recreated the file may have used the umask
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    with private_temp(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    """Parse a JSON file; any failure is a GalleryError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GalleryError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GalleryError(f"{path}: corrupt or unreadable JSON ({e})") from None


def empty_meta() -> pd.DataFrame:
    return normalise_meta(pd.DataFrame({c: [] for c in META_COLUMNS}))


def normalise_meta(meta: pd.DataFrame) -> pd.DataFrame:
    """Fixed column order and dtypes, sorted by id, fresh RangeIndex."""
    out = meta.loc[:, list(META_COLUMNS)].astype(META_DTYPES)
    return out.sort_values("id", kind="stable").reset_index(drop=True)


def read_meta(path: Path) -> pd.DataFrame:
    try:
        meta = pd.read_parquet(path)
    except FileNotFoundError:
        raise GalleryError(f"{path}: missing") from None
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise GalleryError(f"{path}: corrupt or unreadable parquet ({type(e).__name__}: {e})") from None
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise GalleryError(f"{path}: missing columns {missing}")
    try:
        return normalise_meta(meta)
    except (TypeError, ValueError) as e:
        raise GalleryError(f"{path}: bad column types ({e})") from None


class FolderStore:
    """Paths, lock and atomic commits of one gallery folder (no FAISS, no model logic)."""

    def __init__(self, folder: str | os.PathLike, lock_timeout: float = 60.0) -> None:
        self.folder = Path(folder)
        self.lock_timeout = float(lock_timeout)
        # thread_local=False: the lock belongs to the Gallery object, whichever thread uses it.
        self._lock = filelock.FileLock(
            self.folder / LOCK_FILE, timeout=self.lock_timeout, mode=FILE_MODE, thread_local=False
        )

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def is_locked(self) -> bool:
        return self._lock.is_locked

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder lock (reentrant); on first acquisition finish or discard any interrupted commit."""
        outermost = not self._lock.is_locked
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise GalleryError(
                f"{self.folder}: gallery is locked by another process "
                f"(waited {self.lock_timeout:g} s for {LOCK_FILE})"
            ) from None
        try:
            if outermost:
                self.recover()
            yield
        finally:
            self._lock.release()

    def acquire(self) -> None:
        """Take the lock until `release` (for a gallery opened writable)."""
        self._enter = self.locked()
        self._enter.__enter__()

    def release(self) -> None:
        enter = getattr(self, "_enter", None)
        if enter is not None:
            self._enter = None
            enter.__exit__(None, None, None)

    def recover(self) -> None:
        """Roll an interrupted commit forward, or drop staged files that were never committed. Needs the lock."""
        journal = self.path(JOURNAL_FILE)
        if journal.exists():
            try:
                names = [n for n in read_json(journal)["files"] if n in DATA_FILES]
            except (GalleryError, KeyError, TypeError) as e:
                # The journal is renamed into place atomically, so this means outside damage.
                raise GalleryError(f"{journal}: unreadable commit journal ({e}); inspect the folder by hand") from None
            for name in names:
                staged = self.path(staged_name(name))
                if staged.exists():
                    os.replace(staged, self.path(name))
            fsync_dir(self.folder)
            journal.unlink()
            log.warning("%s: finished a save that was interrupted (%s)", self.folder, ", ".join(names))
        for name in DATA_FILES:
            staged = self.path(staged_name(name))
            if staged.exists():
                staged.unlink()
                log.warning("%s: discarded %s left by an interrupted save", self.folder, staged.name)

    def commit(self, writers: dict[str, Callable[[Path], None]]) -> None:
        """Write every file with its writer (given a temp path), then swap them all in at once. Needs the lock.

        If any writer fails, nothing is swapped in: the previous gallery stays intact.
        """
        if not self._lock.is_locked:
            raise RuntimeError("FolderStore.commit called without holding the lock")
        names = [n for n in DATA_FILES if n in writers]  # canonical order: manifest last
        staged: list[Path] = []
        try:
            for name in names:
                target = self.path(staged_name(name))
                with private_temp(target) as tmp:
                    writers[name](tmp)
                staged.append(target)
            write_json_atomic(self.path(JOURNAL_FILE), {"files": names})  # the commit point
        except BaseException:
            for p in staged:
                p.unlink(missing_ok=True)
            raise
        fsync_dir(self.folder)
        for name in names:
            os.replace(self.path(staged_name(name)), self.path(name))
        fsync_dir(self.folder)
        self.path(JOURNAL_FILE).unlink()


def as_float32_matrix(x: Any, dim: int, what: str) -> np.ndarray:
    """Validate a (N, dim) real float array (a single (dim,) vector is taken as N=1) and return float32 C-contiguous."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what}: expected a float array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{what}: expected shape (N, {dim}), got {tuple(np.asarray(x).shape)}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: row {int(np.flatnonzero(bad)[0])} has NaN or inf")
    return arr


def l2_normalised(x: np.ndarray, what: str) -> np.ndarray:
    """Rows scaled to unit L2 norm (a copy); an all-zero row is an error."""
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)  # (N, 1); float64 avoids overflow
    zero = norms[:, 0] < 1e-12
    if zero.any():
        raise ValueError(f"{what}: row {int(np.flatnonzero(zero)[0])} has zero norm")
    return (x / norms).astype(np.float32)
