"""A persistent gallery of face embeddings, searched with FAISS (numpy in, numpy/pandas out; no torch).

Vectors are compared by cosine similarity: every vector given to `add` or `search` is L2-normalised
here (any non-zero finite float vector is accepted; an all-zero, NaN or inf row is a ValueError), and
the index is an inner-product one, so inner product == cosine similarity.
`SearchResult.distances` is the cosine distance `1 - similarity`, in [0, 2].

kind="flat": exact search, `IndexIDMap2(IndexFlatIP)`.
kind="ivf":  `IndexIVFFlat` (inner product, `nlist` cells, `nprobe` cells searched) for galleries past
             ~1e6 vectors. It stays an exact flat index until it holds `39 * nlist` vectors (the
             training-set size FAISS asks for), then trains on the vectors it holds and switches over.

With a GPU visible to FAISS (`faiss.get_num_gpus() > 0`) searches run on a GPU copy of the index,
made lazily and dropped on every change; the CPU index stays the master copy and is what gets saved.

Concurrency: every read of the folder and every save happens under the folder lock (`gallery.lock`),
so nobody sees a half-written gallery. For a read-modify-write use

    g = Gallery.open(path, fingerprint=fp)
    with g.locked():          # takes the lock, reloads if another process saved meanwhile,
        g.add(...)            # and saves on a clean exit (changes are discarded if the block raises)

or `with Gallery.open(path, fingerprint=fp, writable=True) as g:` which holds the lock until closed.
A plain `save()` outside the lock refuses to overwrite a gallery that another process changed since
this one was loaded. A Gallery object is not thread-safe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import faiss
import numpy as np
import pandas as pd

from index.store import (
    IDENTITIES_FILE,
    INDEX_FILE,
    JOURNAL_FILE,
    MANIFEST_FILE,
    VECTORS_FILE,
    FolderStore,
    GalleryError,
    as_float32_matrix,
    empty_meta,
    l2_normalised,
    make_private_dir,
    normalise_meta,
    own_files,
    read_json,
    read_meta,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("flat", "ivf")
DEFAULT_NLIST = 1024
IVF_TRAIN_FACTOR = 39  # FAISS warns below 39 training points per centroid
IVF_MAX_TRAIN_PER_LIST = 256  # FAISS subsamples to this anyway; doing it here keeps memory down
GPU_MAX_K = 2048  # FAISS GPU k-selection limit
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_KEYS = {
    "format_version": int,
    "fingerprint": str,
    "dim": int,
    "metric": str,
    "kind": str,
    "created": str,
    "updated": str,
    "generation": int,
    "next_id": int,
    "count": int,
    "uuid": str,
}


@dataclass(frozen=True)
class SearchResult:
    """k nearest gallery vectors per query, best first. Missing neighbours (gallery smaller than k,
    or IVF cells too sparse): id -1, identity None, similarity -inf, distance inf."""

    similarities: np.ndarray  # (Q, k) float32 cosine similarity in [-1, 1]
    distances: np.ndarray  # (Q, k) float32 cosine distance = 1 - similarity, in [0, 2]
    ids: np.ndarray  # (Q, k) int64 gallery vector ids
    identities: np.ndarray  # (Q, k) object: identity name or None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _broadcast_str(value: Any, n: int, what: str, allow_empty: bool = True) -> list[str]:
    """One str (or path) for every row, or a sequence of n of them."""
    if value is None:
        value = ""
    items = [value] * n if isinstance(value, (str, os.PathLike)) else list(value)
    if len(items) != n:
        raise ValueError(f"add: {what} has {len(items)} entries for {n} vectors")
    out = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"add: {what} must be strings, got {type(item).__name__}")
        s = os.fspath(item)
        if not allow_empty and not s:
            raise ValueError(f"add: {what} must not be empty")
        out.append(s)
    return out


def _check_sha256(sha: str, what: str) -> str:
    sha = sha.lower()
    if sha and not _SHA256.fullmatch(sha):
        raise ValueError(f"{what}: {sha[:80]!r} is not a hex SHA-256 digest")
    return sha


def _index_ids(index: faiss.Index) -> np.ndarray:
    """Every id stored in a gallery index (IDMap2 or IVF), unsorted."""
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    parts = []
    for cell in range(ivf.nlist):
        size = invlists.list_size(cell)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(cell), size).copy())
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class Gallery:
    """Face embeddings of enrolled identities plus their provenance, in one folder. See the module doc."""

    def __init__(
        self,
        store: FolderStore,
        manifest: dict[str, Any],
        index: faiss.Index,
        meta: pd.DataFrame,
        info: dict[str, dict[str, Any]],
        use_gpu: bool | None,
    ) -> None:
        # Use Gallery.create / open / open_or_create.
        self._store = store
        self._set_state(manifest, index, meta, info)
        if use_gpu and not _gpu_available():
            raise ValueError("use_gpu=True but FAISS sees no GPU (is faiss-gpu installed?)")
        self._use_gpu = _gpu_available() if use_gpu is None else bool(use_gpu)
        self._gpu_res: Any = None
        self._gpu_index: Any = None
        self._gpu_id_map: np.ndarray | None = None
        self._writable = False

    # ---------------------------------------------------------------- construction

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        dim: int,
        fingerprint: str,
        threshold: float | None = None,
        kind: str = "flat",
        extra: Mapping[str, Any] | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        use_gpu: bool | None = None,
        lock_timeout: float = 60.0,
    ) -> Gallery:
        """Make a new empty gallery in `path` (created 0700; must be absent, empty, or a half-made gallery).

        kind="ivf": `nlist` cells (default 1024) and `nprobe` cells searched (default nlist // 32).
        """
        return cls._create_or_open(
            path, dim, fingerprint, threshold, kind, extra, nlist, nprobe, use_gpu, lock_timeout, may_open=False
        )

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        dim: int,
        fingerprint: str,
        threshold: float | None = None,
        kind: str = "flat",
        extra: Mapping[str, Any] | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        use_gpu: bool | None = None,
        lock_timeout: float = 60.0,
    ) -> Gallery:
        """Open the gallery in `path` (checking fingerprint and dim), or create it there if there is none.

        The creation arguments (threshold, kind, extra, nlist, nprobe) are ignored for an existing gallery.
        """
        return cls._create_or_open(
            path, dim, fingerprint, threshold, kind, extra, nlist, nprobe, use_gpu, lock_timeout, may_open=True
        )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        fingerprint: str | None = None,
        dim: int | None = None,
        writable: bool = False,
        use_gpu: bool | None = None,
        lock_timeout: float = 60.0,
    ) -> Gallery:
        """Load the gallery in `path`. `fingerprint`/`dim` (when given) must match what built it.

        writable=True keeps the folder lock until `close()` (or the end of a `with` block, which also
        saves unsaved changes); otherwise the lock is held only while loading.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise GalleryError(f"{folder}: no such gallery folder")
        if not (folder / MANIFEST_FILE).exists() and not (folder / JOURNAL_FILE).exists():
            raise GalleryError(f"{folder / MANIFEST_FILE}: missing, so {folder} is not a gallery")
        store = FolderStore(folder, lock_timeout)
        if writable:
            store.acquire()
            try:
                gallery = cls(store, *cls._load(store, fingerprint, dim), use_gpu=use_gpu)
            except BaseException:
                store.release()
                raise
            gallery._writable = True
            return gallery
        with store.locked():
            return cls(store, *cls._load(store, fingerprint, dim), use_gpu=use_gpu)

    @classmethod
    def _create_or_open(
        cls,
        path: str | os.PathLike,
        dim: int,
        fingerprint: str,
        threshold: float | None,
        kind: str,
        extra: Mapping[str, Any] | None,
        nlist: int | None,
        nprobe: int | None,
        use_gpu: bool | None,
        lock_timeout: float,
        may_open: bool,
    ) -> Gallery:
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("fingerprint must be a non-empty string")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "flat" and (nlist is not None or nprobe is not None):
            raise ValueError("nlist/nprobe only apply to kind='ivf'")
        if kind == "ivf":
            nlist = DEFAULT_NLIST if nlist is None else int(nlist)
            nprobe = max(1, nlist // 32) if nprobe is None else int(nprobe)
            if nlist < 1 or not 1 <= nprobe <= nlist:
                raise ValueError(f"need nlist >= 1 and 1 <= nprobe <= nlist, got nlist={nlist} nprobe={nprobe}")
        threshold = None if threshold is None else float(threshold)
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise ValueError(f"extra must be JSON-serialisable ({e})") from None

        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise GalleryError(f"{folder}: exists and is not a folder")
        if folder.is_dir():
            # Never chmod or fill a folder that holds someone else's files.
            foreign = sorted(
                n for n in os.listdir(folder) if n not in own_files() and not (n.startswith(".") and n.endswith(".tmp"))
            )
            if foreign:
                raise GalleryError(f"{folder}: not empty and not a gallery (holds {', '.join(foreign[:3])}, ...)")
        make_private_dir(folder)
        store = FolderStore(folder, lock_timeout)
        with store.locked():
            if store.path(MANIFEST_FILE).exists():
                if not may_open:
                    raise GalleryError(f"{folder}: already holds a gallery (use Gallery.open)")
                return cls(store, *cls._load(store, fingerprint, int(dim)), use_gpu=use_gpu)
            now = _now()
            manifest: dict[str, Any] = {
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "dim": int(dim),
                "metric": "ip",
                "kind": kind,
                "threshold": threshold,
                "created": now,
                "updated": now,
                "extra": extra,
                "nlist": nlist,
                "nprobe": nprobe,
                "generation": 0,  # save() below makes it 1
                "next_id": 0,
                "count": 0,
                "uuid": uuid.uuid4().hex,
            }
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(int(dim)))
            gallery = cls(store, manifest, index, empty_meta(), {}, use_gpu=use_gpu)
            gallery._write()
            log.info("created %s gallery %s (dim %d, model %s)", kind, folder, dim, fingerprint)
            return gallery

    @staticmethod
    def _load(
        store: FolderStore, fingerprint: str | None, dim: int | None
    ) -> tuple[dict[str, Any], faiss.Index, pd.DataFrame, dict[str, dict[str, Any]]]:
        """Read and cross-check every file of the folder. Caller holds the lock."""
        folder = store.folder
        mpath = store.path(MANIFEST_FILE)
        manifest = read_json(mpath)
        if not isinstance(manifest, dict):
            raise GalleryError(f"{mpath}: corrupt manifest (not a JSON object)")
        for key, typ in _MANIFEST_KEYS.items():
            if not isinstance(manifest.get(key), typ):
                raise GalleryError(f"{mpath}: corrupt manifest ({key!r} missing or not {typ.__name__})")
        if manifest["format_version"] != FORMAT_VERSION:
            raise GalleryError(
                f"{mpath}: format_version {manifest['format_version']} not supported (this code reads {FORMAT_VERSION})"
            )
        if manifest["metric"] != "ip" or manifest["kind"] not in KINDS:
            raise GalleryError(f"{mpath}: unsupported metric/kind {manifest['metric']!r}/{manifest['kind']!r}")
        if manifest["kind"] == "ivf" and not (
            isinstance(manifest.get("nlist"), int) and isinstance(manifest.get("nprobe"), int)
        ):
            raise GalleryError(f"{mpath}: corrupt manifest (ivf gallery without int nlist/nprobe)")
        if fingerprint is not None and manifest["fingerprint"] != fingerprint:
            raise GalleryError(
                f"{folder}: gallery was built by model {manifest['fingerprint']!r}, not the current model "
                f"{fingerprint!r}; enrol again into a new gallery"
            )
        if dim is not None and manifest["dim"] != int(dim):
            raise GalleryError(f"{folder}: gallery holds {manifest['dim']}-d vectors, not {int(dim)}-d")
        if os.stat(folder).st_mode & 0o077:
            log.warning("%s: folder is readable by others (mode %o); it holds biometric data", folder,
                        os.stat(folder).st_mode & 0o777)

        ipath = store.path(INDEX_FILE)
        if not ipath.exists():
            raise GalleryError(f"{ipath}: missing")
        try:
            index = faiss.read_index(str(ipath))
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise GalleryError(f"{ipath}: corrupt or truncated FAISS index ({reason})") from None
        is_ivf = faiss.try_extract_index_ivf(index) is not None
        if not (isinstance(index, faiss.IndexIDMap2) or (is_ivf and isinstance(index, faiss.IndexIVFFlat))):
            raise GalleryError(f"{ipath}: unexpected index type {type(index).__name__}")
        if is_ivf and manifest["kind"] != "ivf":
            raise GalleryError(f"{ipath}: IVF index in a {manifest['kind']!r} gallery")
        if index.d != manifest["dim"] or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise GalleryError(f"{ipath}: index is {index.d}-d metric {index.metric_type}, manifest says "
                               f"{manifest['dim']}-d inner product")

        meta = read_meta(store.path(VECTORS_FILE))
        vpath = store.path(VECTORS_FILE)
        if not (index.ntotal == len(meta) == manifest["count"]):
            raise GalleryError(
                f"{folder}: inconsistent gallery: {INDEX_FILE} holds {index.ntotal} vectors, {VECTORS_FILE} "
                f"{len(meta)} rows, {MANIFEST_FILE} says {manifest['count']}"
            )
        ids = meta["id"].to_numpy()
        if len(ids) and (np.any(np.diff(ids) <= 0) or ids[-1] >= manifest["next_id"] or ids[0] < 0):
            raise GalleryError(f"{vpath}: ids are duplicated or out of range")
        if not np.array_equal(np.sort(_index_ids(index)), ids):
            raise GalleryError(f"{folder}: inconsistent gallery: ids in {INDEX_FILE} and {VECTORS_FILE} differ")

        info_path = store.path(IDENTITIES_FILE)
        info = read_json(info_path)
        if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
            raise GalleryError(f"{info_path}: expected an object of objects {{identity: {{...}}}}")
        if is_ivf:
            faiss.extract_index_ivf(index).nprobe = manifest["nprobe"]
        log.debug("loaded gallery %s: %d vectors, %d identities", folder, len(meta), meta["identity"].nunique())
        return manifest, index, meta, info

    def _set_state(
        self, manifest: dict[str, Any], index: faiss.Index, meta: pd.DataFrame, info: dict[str, dict[str, Any]]
    ) -> None:
        self._manifest = manifest
        self._index = index
        self._meta_parts = [meta]  # appended to by add(), concatenated on demand
        self._info = info
        self._dirty = False
        self._changed()

    def _changed(self) -> None:
        """Drop everything derived from the vectors (caches, the GPU copy)."""
        self._photo_keys: set[tuple[str, str]] | None = None
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None
        self._gpu_index = None
        self._gpu_id_map = None

    @property
    def _meta(self) -> pd.DataFrame:
        if len(self._meta_parts) > 1:
            self._meta_parts = [pd.concat(self._meta_parts, ignore_index=True)]
        return self._meta_parts[0]

    # ---------------------------------------------------------------- locking and saving

    @contextlib.contextmanager
    def locked(self) -> Iterator[Gallery]:
        """Hold the folder lock for a read-modify-write; see the module doc."""
        outermost = not self._store.is_locked
        with self._store.locked():
            if outermost:
                self._refresh()
            try:
                yield self
            except BaseException:
                if outermost and self._dirty:
                    self._set_state(*self._load(self._store, self.fingerprint, self.dim))  # discard
                raise
            if outermost and self._dirty:
                self.save()

    def _refresh(self) -> None:
        """Reload if another process saved since we loaded. Caller holds the lock."""
        disk = read_json(self._store.path(MANIFEST_FILE))
        if isinstance(disk, dict) and (disk.get("generation"), disk.get("uuid")) == (
            self._manifest["generation"],
            self._manifest["uuid"],
        ):
            return
        if self._dirty:
            raise GalleryError(
                f"{self.path}: changed on disk by another process while this copy has unsaved changes; "
                "make changes inside `with gallery.locked():`"
            )
        self._set_state(*self._load(self._store, self.fingerprint, self.dim))
        log.debug("%s: reloaded (changed by another process)", self.path)

    def save(self) -> None:
        """Write the gallery atomically (all files or none). Refuses if another process saved it meanwhile."""
        with self._store.locked():
            disk = read_json(self._store.path(MANIFEST_FILE))
            mine = (self._manifest["generation"], self._manifest["uuid"])
            if not isinstance(disk, dict) or (disk.get("generation"), disk.get("uuid")) != mine:
                raise GalleryError(
                    f"{self.path}: changed on disk by another process since this copy was loaded; "
                    "reopen it, or make changes inside `with gallery.locked():`"
                )
            self._write()

    def _write(self) -> None:
        """Commit every file; caller holds the lock."""
        meta = self._meta
        manifest = dict(self._manifest)
        manifest.update(
            updated=_now(), generation=self._manifest["generation"] + 1, count=len(meta), format_version=FORMAT_VERSION
        )
        index = self._index
        info = self._info
        self._store.commit(
            {
                INDEX_FILE: lambda p: faiss.write_index(index, str(p)),  # always the CPU master copy
                VECTORS_FILE: lambda p: meta.to_parquet(p, index=False),
                IDENTITIES_FILE: lambda p: p.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n"),
                MANIFEST_FILE: lambda p: p.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n"),
            }
        )
        self._manifest = manifest
        self._dirty = False
        log.info("saved gallery %s: %d vectors, %d identities", self.path, len(meta), meta["identity"].nunique())

    def close(self) -> None:
        """Release the lock of a writable gallery (unsaved changes are dropped; call save() first)."""
        if self._writable:
            if self._dirty:
                log.warning("%s: closed with unsaved changes (dropped)", self.path)
            self._writable = False
            self._store.release()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None and self._dirty:
                if self._writable:
                    self.save()
                else:  # a read-only open never saves implicitly
                    log.warning("%s: leaving `with` with unsaved changes; call save() or use locked()", self.path)
        finally:
            self.close()

    # ---------------------------------------------------------------- properties

    @property
    def path(self) -> Path:
        return self._store.folder

    @property
    def fingerprint(self) -> str:
        return self._manifest["fingerprint"]

    @property
    def dim(self) -> int:
        return self._manifest["dim"]

    @property
    def kind(self) -> str:
        return self._manifest["kind"]

    @property
    def trained(self) -> bool:
        """True once an IVF gallery has switched from its exact start-up index to IVF."""
        return faiss.try_extract_index_ivf(self._index) is not None

    @property
    def threshold(self) -> float | None:
        return self._manifest["threshold"]

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self._manifest["threshold"] = None if value is None else float(value)
        self._dirty = True

    @property
    def extra(self) -> dict[str, Any]:
        """A copy of the caller's manifest extras; assign a new dict to change them."""
        return json.loads(json.dumps(self._manifest.get("extra") or {}))

    @extra.setter
    def extra(self, value: Mapping[str, Any]) -> None:
        try:
            self._manifest["extra"] = json.loads(json.dumps(dict(value)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"extra must be JSON-serialisable ({e})") from None
        self._dirty = True

    @property
    def nprobe(self) -> int | None:
        return self._manifest.get("nprobe")

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind != "ivf":
            raise ValueError("nprobe only applies to kind='ivf'")
        value = int(value)
        if not 1 <= value <= self._manifest["nlist"]:
            raise ValueError(f"nprobe must be in [1, {self._manifest['nlist']}], got {value}")
        self._manifest["nprobe"] = value
        if self.trained:
            faiss.extract_index_ivf(self._index).nprobe = value
        self._dirty = True

    @property
    def dirty(self) -> bool:
        return self._dirty

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return f"Gallery({str(self.path)!r}, {len(self)} vectors, kind={self.kind!r}, model={self.fingerprint!r})"

    def info(self) -> dict[str, Any]:
        """Manifest fields plus live counts, for display."""
        m = self._manifest
        meta = self._meta
        return {
            "path": str(self.path),
            "format_version": m["format_version"],
            "fingerprint": m["fingerprint"],
            "dim": m["dim"],
            "metric": m["metric"],
            "kind": m["kind"],
            "trained": self.trained,
            "nlist": m.get("nlist"),
            "nprobe": m.get("nprobe"),
            "threshold": m["threshold"],
            "vectors": len(meta),
            "identities": int(meta["identity"].nunique()),
            "created": m["created"],
            "updated": m["updated"],
            "device": "gpu" if self._use_gpu else "cpu",
            "unsaved_changes": self._dirty,
            "extra": self.extra,
        }

    # ---------------------------------------------------------------- changing the gallery

    def add(
        self,
        vectors: np.ndarray,
        identity: str | Sequence[str],
        sources: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        sha256s: str | Sequence[str] | None = None,
        views: int | Sequence[int] | None = None,
    ) -> np.ndarray:
        """Add (N, D) embeddings; returns their new int64 ids (never reused).

        `vectors` may be any float dtype; rows are L2-normalised (zero/NaN/inf rows are an error).
        `identity`, `sources` (photo path), `sha256s` (hex content hash of the photo) may be one value
        for all rows or one per row; `views`: 0 = the original photo, 1.. = augmented views (default 0).
        Missing sources/hashes are stored as "". Nothing is checked for duplicates: see has_photo().
        Validation happens before anything changes, so a failed add leaves the gallery as it was.
        """
        x = l2_normalised(as_float32_matrix(vectors, self.dim, "add: vectors"), "add: vectors")  # (N, D)
        n = len(x)
        names = _broadcast_str(identity, n, "identity", allow_empty=False)
        srcs = _broadcast_str(sources, n, "sources")
        shas = [_check_sha256(s, "add: sha256s") for s in _broadcast_str(sha256s, n, "sha256s")]
        view_arr = np.asarray(0 if views is None else views)
        if view_arr.ndim == 0:
            view_arr = np.full(n, view_arr)
        if view_arr.shape != (n,) or not np.issubdtype(view_arr.dtype, np.integer) or (view_arr < 0).any():
            raise ValueError(f"add: views must be {n} non-negative ints")
        if n == 0:
            return np.zeros(0, np.int64)
        ids = np.arange(self._manifest["next_id"], self._manifest["next_id"] + n, dtype=np.int64)
        self._index.add_with_ids(x, ids)
        now = pd.Timestamp.now(tz="UTC")
        rows = pd.DataFrame(
            {"id": ids, "identity": names, "source": srcs, "sha256": shas, "view": view_arr, "time": [now] * n}
        )
        self._meta_parts.append(normalise_meta(rows))
        self._manifest["next_id"] += n
        self._dirty = True
        self._changed()
        self._maybe_train()
        return ids

    def _maybe_train(self) -> None:
        """IVF galleries: once 39 * nlist vectors are in, train IVF on them and move them over."""
        if self.kind != "ivf" or self.trained:
            return
        nlist = self._manifest["nlist"]
        n = len(self)
        if n < IVF_TRAIN_FACTOR * nlist:
            return
        flat = self._index
        ids = faiss.vector_to_array(flat.id_map).astype(np.int64)  # (n,)
        x = flat.index.reconstruct_n(0, n)  # (n, D), row i has id ids[i]
        rng = np.random.default_rng(0)
        n_train = min(n, IVF_MAX_TRAIN_PER_LIST * nlist)
        sample = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(sample)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct() and remove_ids() by id
        ivf.add_with_ids(x, ids)
        ivf.nprobe = self._manifest["nprobe"]
        self._index = ivf
        self._changed()
        log.info("%s: trained IVF (nlist %d) on %d of %d vectors", self.path, nlist, n_train, n)

    def remove_identity(self, name: str) -> int:
        """Remove every vector of `name` (and its info); returns how many were removed (0 if unknown)."""
        meta = self._meta
        mask = (meta["identity"] == name).to_numpy()
        ids = meta["id"].to_numpy()[mask]
        if len(ids):
            removed = self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
            if removed != len(ids):
                raise GalleryError(f"{self.path}: index removed {removed} of {len(ids)} vectors of {name!r}")
            self._meta_parts = [meta.loc[~mask].reset_index(drop=True)]
            self._changed()
            self._dirty = True
        if self._info.pop(name, None) is not None:
            self._dirty = True
        log.info("%s: removed %d vectors of %r", self.path, len(ids), name)
        return int(len(ids))

    def set_identity_info(self, name: str, info: Mapping[str, Any]) -> None:
        """Store a JSON-serialisable dict (e.g. {"threshold": .., "far": ..}) for an enrolled identity."""
        if name not in self._identity_set():
            raise KeyError(f"{self.path}: no identity {name!r} in the gallery")
        try:
            self._info[name] = json.loads(json.dumps(dict(info)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"identity info for {name!r} must be JSON-serialisable ({e})") from None
        self._dirty = True

    # ---------------------------------------------------------------- reading

    def identity_info(self, name: str) -> dict[str, Any]:
        """A copy of the info dict of `name` ({} if none was set); KeyError if `name` is not enrolled."""
        if name not in self._identity_set():
            raise KeyError(f"{self.path}: no identity {name!r} in the gallery")
        return json.loads(json.dumps(self._info.get(name, {})))

    def _identity_set(self) -> set[str]:
        return set(self._meta["identity"].unique())

    def identities(self) -> pd.DataFrame:
        """One row per identity: identity, vectors (count), photos (distinct sha256, else source, else vector)."""
        meta = self._meta
        photo = meta["sha256"].where(meta["sha256"] != "", meta["source"])
        photo = photo.where(photo != "", "#" + meta["id"].astype(str))
        df = (
            pd.DataFrame({"identity": meta["identity"], "photo": photo})
            .groupby("identity", sort=True)
            .agg(vectors=("photo", "size"), photos=("photo", "nunique"))
            .reset_index()
        )
        return df.astype({"vectors": "int64", "photos": "int64"})

    def has_photo(self, identity: str | None, sha256: str) -> bool:
        """Whether a photo with this content hash is already enrolled for `identity` (None: for anyone)."""
        sha = _check_sha256(str(sha256), "has_photo: sha256")
        if not sha:
            raise ValueError("has_photo: sha256 must not be empty")
        if self._photo_keys is None:
            meta = self._meta
            keys = set(zip(meta["identity"], meta["sha256"]))
            keys |= {(None, s) for s in meta["sha256"]}
            self._photo_keys = keys
        return (identity, sha) in self._photo_keys

    def vectors(self, identity: str | None = None) -> tuple[np.ndarray, pd.DataFrame]:
        """Stored (L2-normalised) vectors of `identity` (None: all), (n, D) float32, with their metadata rows
        (row i of the frame describes vector i; ordered by id)."""
        meta = self._meta if identity is None else self._meta.loc[self._meta["identity"] == identity]
        meta = meta.reset_index(drop=True).copy()
        ids = meta["id"].to_numpy()
        if not len(ids):
            return np.zeros((0, self.dim), np.float32), meta
        if isinstance(self._index, faiss.IndexIDMap2) and identity is None:
            # Whole flat gallery: read storage in one go, then order by id.
            x = self._index.index.reconstruct_n(0, len(self))  # (n, D)
            order = np.argsort(faiss.vector_to_array(self._index.id_map), kind="stable")
            return np.ascontiguousarray(x[order]), meta
        return self._index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64)), meta

    def search(self, queries: np.ndarray, k: int = 1, nprobe: int | None = None) -> SearchResult:
        """k nearest gallery vectors by cosine similarity for each of (Q, D) queries (a (D,) query is Q=1).

        `nprobe` overrides the gallery's IVF nprobe for this call (ignored by flat galleries).
        """
        q = l2_normalised(as_float32_matrix(queries, self.dim, "search: queries"), "search: queries")  # (Q, D)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"search: k must be a positive int, got {k!r}")
        k = int(k)
        n_q = len(q)
        if len(self) == 0 or n_q == 0:
            sims = np.full((n_q, k), -np.inf, np.float32)
            labels = np.full((n_q, k), -1, np.int64)
        else:
            sims, labels = self._faiss_search(q, k, nprobe)
        missing = labels < 0
        sims = np.where(missing, -np.inf, np.clip(sims, -1.0, 1.0)).astype(np.float32)  # (Q, k)
        names = np.full(labels.shape, None, dtype=object)  # (Q, k)
        if (~missing).any():
            ids_sorted, names_by_id = self._id_lookup()
            names[~missing] = names_by_id[np.searchsorted(ids_sorted, labels[~missing])]
        return SearchResult(similarities=sims, distances=(1.0 - sims).astype(np.float32), ids=labels, identities=names)

    def _faiss_search(self, q: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is not None:
            probe = self._manifest["nprobe"] if nprobe is None else int(nprobe)
            if not 1 <= probe <= ivf.nlist:
                raise ValueError(f"search: nprobe must be in [1, {ivf.nlist}], got {probe}")
        if self._use_gpu and k <= GPU_MAX_K:
            gpu = self._gpu()
            if ivf is not None:
                gpu.nprobe = probe
            sims, pos = gpu.search(q, k)
            if self._gpu_id_map is None:
                return sims, pos
            # The GPU copy of a flat gallery is the bare inner index: map row positions back to ids.
            return sims, np.where(pos >= 0, self._gpu_id_map[np.maximum(pos, 0)], -1)
        if ivf is not None:
            return self._index.search(q, k, params=faiss.SearchParametersIVF(nprobe=probe))
        return self._index.search(q, k)

    def _gpu(self) -> Any:
        """The GPU copy of the index, made on first use after each change."""
        if self._gpu_index is None:
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            if isinstance(self._index, faiss.IndexIDMap2):
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index.index)
                self._gpu_id_map = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            else:
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index)
                self._gpu_id_map = None
            log.info("%s: moved the index (%d vectors) to GPU 0 for search", self.path, len(self))
        return self._gpu_index

    def _id_lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted ids, identity name per id) for turning search labels into names."""
        if self._lookup is None:
            meta = self._meta  # sorted by id
            self._lookup = (meta["id"].to_numpy(), meta["identity"].to_numpy(dtype=object))
        return self._lookup
