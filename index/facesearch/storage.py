"""The face-search file: one file per index, written atomically, read back with its length and CRC checked.

On disk an index is one file (written atomically: a 0600 temp file beside it, fsync, os.replace):

    magic b"FVFSIDX\\0" | uint32 header length | JSON header | FAISS index bytes | trailer
    header:  format_version, n, dim, kind, key, metric, nlist, nprobe, created, calibration
             (+ pq_m, pq_bits, opq for kind "ivfpq": an addition, so format_version stays 1 and every
             older file loads; code older than "ivfpq" refuses such a file in one line as of an
             unknown kind)
    trailer: uint64 payload length, uint32 CRC-32 of the payload, b"FVFE"

`read_header` / `read_key` read only the first few hundred bytes, so a caller can tell a stale file
(the catalogue puts model fingerprint + a generation number into `key`) without loading N vectors.
`load` streams the payload into FAISS (no second in-memory copy) and checks its length and CRC, so a
truncated, corrupt or foreign file is a `FaceSearchError` (a ValueError) with one line naming it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import faiss

from index.facesearch.header import (FORMAT_VERSION, IVF_KINDS, KINDS, FaceSearchError, IndexHeader,
                                     StaleIndexError)

log = logging.getLogger(__name__)

_MAGIC = b"FVFSIDX\x00"
_END = b"FVFE"
_PREFIX = struct.Struct("<8sI")  # magic, header length
_TRAILER = struct.Struct("<QI4s")  # payload length, crc32, end magic
_MAX_HEADER = 1 << 20
_READ_CHUNK = 1 << 22


def save_index(index: faiss.Index, header: IndexHeader, path: Path) -> None:
    """Write header + FAISS bytes + trailer to `path` atomically (0600 temp file beside it, fsync, rename)."""
    header_bytes = json.dumps(header.to_json(), sort_keys=True).encode("utf-8")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(_MAGIC, len(header_bytes)))
            f.write(header_bytes)
            state = {"crc": 0, "size": 0}

            def write(chunk: bytes) -> None:
                state["crc"] = zlib.crc32(chunk, state["crc"])
                state["size"] += len(chunk)
                f.write(chunk)

            # Streamed: no second in-memory copy of a 512 MB index.
            writer = faiss.PyCallbackIOWriter(write, _READ_CHUNK)
            faiss.write_index(index, writer)
            del writer  # flushes its buffer into `write`
            f.write(_TRAILER.pack(state["size"], state["crc"], _END))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_header(path: Path) -> IndexHeader:
    """The header of a saved index, reading only its first few hundred bytes."""
    try:
        with open(path, "rb") as f:
            return _read_header(f, path)
    except OSError as e:
        raise FaceSearchError(f"{path}: cannot read face-search index ({e.strerror or e})") from None


def load_index(path: Path, expected_key: str | None = None) -> tuple[faiss.Index, IndexHeader]:
    """(FAISS index, header) of a saved index, checked against each other; see FaceSearch.load."""
    try:
        with open(path, "rb") as f:
            header = _read_header(f, path)
            if expected_key is not None and header.key != expected_key:
                raise StaleIndexError(f"{path}: stale face-search index (key {header.key!r}, expected "
                                      f"{expected_key!r})")
            index = _read_payload(f, path)
    except OSError as e:
        raise FaceSearchError(f"{path}: cannot read face-search index ({e.strerror or e})") from None
    _check_index(index, header, path)
    if header.kind in IVF_KINDS:
        faiss.extract_index_ivf(index).nprobe = header.nprobe
    log.debug("loaded %s from %s", header.kind, path)
    return index, header



def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_header(f: BinaryIO, path: Path) -> IndexHeader:
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or not prefix.startswith(_MAGIC):
        raise FaceSearchError(f"{path}: not a faceverify face-search index (bad magic)")
    _, length = _PREFIX.unpack(prefix)
    if length > _MAX_HEADER:
        raise FaceSearchError(f"{path}: corrupt face-search index (header length {length})")
    raw = f.read(length)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FaceSearchError(f"{path}: corrupt face-search index (unreadable header)") from None
    if not isinstance(obj, dict):
        raise FaceSearchError(f"{path}: corrupt face-search index (header is not an object)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise FaceSearchError(f"{path}: face-search index format {obj.get('format_version')!r} not supported "
                              f"(this code reads {FORMAT_VERSION})")
    try:
        header = IndexHeader(
            n=_typed(obj, "n", int), dim=_typed(obj, "dim", int), kind=_typed(obj, "kind", str),
            key=_typed(obj, "key", str), nlist=obj.get("nlist"), nprobe=obj.get("nprobe"),
            created=str(obj.get("created", "")), calibration=dict(obj.get("calibration") or {}),
            pq_m=obj.get("pq_m"), pq_bits=obj.get("pq_bits"), opq=obj.get("opq"),
        )
    except (KeyError, TypeError, ValueError):
        raise FaceSearchError(f"{path}: corrupt face-search index (header fields missing or mistyped)") from None
    ivf_ok = isinstance(header.nlist, int) and isinstance(header.nprobe, int) and 1 <= header.nprobe <= header.nlist
    pq_ok = (isinstance(header.pq_m, int) and isinstance(header.pq_bits, int) and isinstance(header.opq, bool)
             and header.pq_m >= 1 and 1 <= header.pq_bits <= 16)
    if header.kind not in KINDS or obj.get("metric") != "ip" or header.n < 0 or header.dim < 1 or (
        header.kind in IVF_KINDS and not ivf_ok) or (header.kind == "ivfpq" and not pq_ok
    ):
        raise FaceSearchError(f"{path}: corrupt face-search index (kind {header.kind!r}, n {header.n}, "
                              f"dim {header.dim}, nlist {header.nlist}, nprobe {header.nprobe})")
    return header


def _typed(obj: dict[str, Any], name: str, typ: type) -> Any:
    value = obj[name]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise TypeError(name)
    return value


def _read_payload(f: BinaryIO, path: Path) -> faiss.Index:
    """Stream the FAISS bytes after the header into FAISS, checking length and CRC from the trailer."""
    start = f.tell()
    end = f.seek(0, os.SEEK_END)
    if end - start < _TRAILER.size:
        raise FaceSearchError(f"{path}: truncated face-search index")
    f.seek(end - _TRAILER.size)
    size, crc, magic = _TRAILER.unpack(f.read(_TRAILER.size))
    if magic != _END or start + size + _TRAILER.size != end:
        raise FaceSearchError(f"{path}: truncated or corrupt face-search index (trailer does not match the file)")
    f.seek(start)
    state = {"crc": 0, "left": size}

    def read(n: int) -> bytes:
        chunk = f.read(min(n, state["left"]))  # never past the payload into the trailer
        state["left"] -= len(chunk)
        state["crc"] = zlib.crc32(chunk, state["crc"])
        return chunk

    try:
        index = faiss.read_index(faiss.PyCallbackIOReader(read, _READ_CHUNK))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise FaceSearchError(f"{path}: corrupt face-search index (FAISS: {reason[:200]})") from None
    if state["left"]:
        state["crc"] = zlib.crc32(f.read(state["left"]), state["crc"])  # extra bytes FAISS did not want
        raise FaceSearchError(f"{path}: corrupt face-search index ({state['left']} stray payload bytes)")
    if state["crc"] != crc:
        raise FaceSearchError(f"{path}: corrupt face-search index (checksum mismatch)")
    return index


def _check_index(index: faiss.Index, header: IndexHeader, path: Path) -> None:
    """The FAISS index must be what the header says (a well-formed file written by something else is foreign)."""
    if header.kind == "flat":
        ok = isinstance(index, faiss.IndexIDMap) and isinstance(faiss.downcast_index(index.index), faiss.IndexFlatIP)
    elif header.kind == "ivf":
        ok = isinstance(index, faiss.IndexIVFFlat) and index.nlist == header.nlist
    else:
        inner = index
        if isinstance(index, faiss.IndexPreTransform):
            inner = faiss.downcast_index(index.index)
            ok = (header.opq is True and index.chain.size() == 1
                  and isinstance(faiss.downcast_VectorTransform(index.chain.at(0)), faiss.LinearTransform))
        else:
            ok = header.opq is False
        ok = ok and (isinstance(inner, faiss.IndexIVFPQ) and inner.nlist == header.nlist and inner.pq.M == header.pq_m
                     and inner.pq.nbits == header.pq_bits and inner.metric_type == faiss.METRIC_INNER_PRODUCT
                     and inner.ntotal == header.n)
    if not ok or index.d != header.dim or index.ntotal != header.n or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise FaceSearchError(f"{path}: face-search index does not match its header ({type(index).__name__}, "
                              f"{index.ntotal} x {index.d}; header says {header.kind}, {header.n} x {header.dim})")
