"""The embedding model under ONNX Runtime, without torch: `OnnxEmbedder` runs a model file's runtime graph
(`<model>.onnx` beside it, made by `faceverify model export` / verify/model/graph.py) and has the public
interface of `verify.model.file.Embedder` (load, embed, geometry, fingerprint, similarity_threshold,
cohort, dim, meta, path, device).

The graph does all of `Embedder.embed`'s arithmetic (normalisation, flip TTA, L2 normalisation): `embed`
only validates the crops and calls `session.run` per batch. Everything the product path reads from a
model file is in the graph's metadata, so the .pt file is opened only to check that the graph was made
from it (its sha256): a graph whose model file changed since is stale and refused.

Imports numpy, onnxruntime (through verify.model.onnx_session, when a graph is opened) and torch-free modules
of this package only.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from verify.model.meta import ModelMetaMixin
from verify.model.onnx_session import RuntimeDevice, RuntimeGraphError, open_session, providers_for
from verify.model.graph import (COHORT_KEY, DEFAULT_GRAPH, EXPORT_HINT, GRAPH_FORMAT, INPUT_NAME, META_KEY, OUTPUT_NAME,
                            file_sha256, graph_path_for)

log = logging.getLogger(__name__)


def _fix_hint(model_path: Path | None) -> str:
    return f"make it with: {EXPORT_HINT} {model_path if model_path is not None else 'MODEL.pt'}"


def read_graph_meta(session: Any, graph: Path) -> dict:
    """The model meta stored in an open runtime graph (dict as Embedder.meta, without the cohort:
    `read_graph_cohort` decodes it where it is needed), or RuntimeGraphError naming the file."""
    props = session.get_modelmeta().custom_metadata_map
    raw = props.get(META_KEY)
    if raw is None:
        raise RuntimeGraphError(f"{graph}: not a faceverify runtime graph (no {META_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
        version = int(meta["format_version"])
        for k in ("fingerprint", "embedding_dim", "geometry", "threshold", "normalisation"):
            meta[k]  # noqa: B018 (presence)
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeGraphError(f"{graph}: unreadable faceverify metadata ({type(e).__name__}: {e})") from None
    if version > GRAPH_FORMAT:
        raise RuntimeGraphError(f"{graph}: runtime graph format {version} is newer than this faceverify "
                                f"({GRAPH_FORMAT}); upgrade faceverify or export the graph again")
    extra = dict(meta.get("extra") or {})
    if meta.get("cohort_source") is not None:
        extra["cohort_source"] = meta["cohort_source"]
    meta["extra"] = extra
    return meta


def read_graph_fingerprint(graph: str | os.PathLike | None = None) -> str:
    """The fingerprint of the model a runtime graph was made from (default: the shipped graph), read from
    its metadata without torch and without running it; RuntimeGraphError naming the file otherwise."""
    path = Path(graph) if graph else DEFAULT_GRAPH
    return read_graph_meta(open_session(path), path)["fingerprint"]


def read_graph_cohort(session: Any, graph: Path, meta: dict) -> np.ndarray | None:
    """The (C, D) float16 impostor cohort stored in an open runtime graph's metadata, None without one,
    or RuntimeGraphError naming the file. Only enrollment needs it: verify and scan never decode it
    (the shipped 24,595 faces are 7.7 MB of base64)."""
    c = meta.get("cohort")
    if not c:
        return None
    try:
        props = session.get_modelmeta().custom_metadata_map
        buf = base64.b64decode(props[c.get("key", COHORT_KEY)], validate=True)
        cohort = np.frombuffer(buf, dtype="<f2").reshape(tuple(int(v) for v in c["shape"]))
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise RuntimeGraphError(f"{graph}: unreadable cohort in the metadata ({type(e).__name__}: {e})") from None
    return cohort.astype(np.float16)  # a writable native-order copy


class OnnxEmbedder(ModelMetaMixin):
    """A loaded runtime graph: uint8 face crops in, L2-normalised float32 embeddings out (as Embedder)."""

    def __init__(self, session: Any, meta: dict, graph_path: Path, model_path: Path | None = None,
                 threads: int = 1, device: str = "cpu") -> None:
        self._session = session
        self.meta = meta
        self.graph_path = Path(graph_path)
        self.model_path = model_path
        self.threads = int(threads)
        self._device_name = device
        providers = session.get_providers() if session is not None else ["CPUExecutionProvider"]
        self.device = RuntimeDevice("cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu")

    # ---- the Embedder interface ---------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The model file (.pt) when known, as Embedder.path; else the graph."""
        return self.model_path if self.model_path is not None else self.graph_path

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "cpu", threads: int = 1) -> "OnnxEmbedder":
        """Open a runtime graph: `path` is the graph (.onnx) or its model file (.pt: the graph beside it);
        default verify/model/shipped/default.onnx. Where the model file sits beside the graph, the graph must have
        been made from it (sha256), else it is stale. `threads`: ONNX Runtime intra-op threads (0: one per
        core). A missing, corrupt or stale graph raises RuntimeGraphError (one line naming the file)."""
        p = Path(path) if path else DEFAULT_GRAPH
        if p.suffix == ".onnx":
            graph, model_path = p, None
            beside = p.with_suffix(".pt")  # its model file, when the graph was made from the file beside it
        else:
            graph, model_path = graph_path_for(p), p
            beside = p
            if not p.is_file():
                raise RuntimeGraphError(f"{p}: model file not found")
        hint = model_path if model_path is not None else (beside if beside.is_file() else None)
        if not graph.is_file():
            raise RuntimeGraphError(f"{graph}: runtime graph not found; {_fix_hint(hint)}")
        session = cls._open(graph, hint, threads, device)
        meta = read_graph_meta(session, graph)
        if p.suffix == ".onnx" and beside.is_file() and meta.get("model_file") == beside.name:
            model_path = beside
        if model_path is not None:
            have = file_sha256(model_path)
            if meta.get("model_sha256") != have:
                raise RuntimeGraphError(
                    f"{graph}: runtime graph is stale (made from another version of {model_path.name}: sha256 "
                    f"{str(meta.get('model_sha256'))[:12]}, the file now {have[:12]}); {_fix_hint(model_path)}")
        cls._check_io(session, graph, meta)
        return cls(session, meta, graph, model_path, threads, device)

    @property
    def cohort(self) -> np.ndarray | None:
        """As Embedder.cohort; decoded from the graph's metadata on first use."""
        extra = self.meta.setdefault("extra", {})
        if "cohort" not in extra and self.meta.get("cohort"):
            extra["cohort"] = read_graph_cohort(self._session, self.graph_path, self.meta)
        return ModelMetaMixin.cohort.fget(self)

    def embed(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, S, S, 3) uint8 crops -> (N, D) float32 unit vectors."""
        crops = np.asarray(crops)
        size = self.geometry.size
        if crops.ndim != 4 or crops.shape[1:] != (size, size, 3) or crops.dtype != np.uint8:
            raise ValueError(f"expected uint8 crops of shape (N, {size}, {size}, 3), got {crops.dtype} {crops.shape}")
        out = np.empty((len(crops), self.dim), dtype=np.float32)
        batch_size = max(1, int(batch_size))
        for s in range(0, len(crops), batch_size):
            block = np.ascontiguousarray(crops[s : s + batch_size])
            out[s : s + len(block)] = self._session.run([OUTPUT_NAME], {INPUT_NAME: block})[0]
        return out

    # ---- threads, pickling (scan workers get the embedder through their initialiser) ------------

    def set_threads(self, threads: int) -> None:
        """Reopen the session with `threads` intra-op threads (a scan's worker processes use 1 each)."""
        if int(threads) != self.threads:
            self._session = self._open(self.graph_path, self.model_path, threads, self._device_name)
            self.threads = int(threads)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_session"] = None
        extra = state["meta"].get("extra") or {}
        if "cohort" in extra:  # decoded here: a worker reads it again from the graph if it ever needs it
            state["meta"] = {**state["meta"], "extra": {k: v for k, v in extra.items() if k != "cohort"}}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        session = self._open(self.graph_path, self.model_path, self.threads, self._device_name)
        fp = read_graph_meta(session, self.graph_path).get("fingerprint")
        if fp != self.fingerprint:
            raise RuntimeGraphError(f"{self.graph_path}: runtime graph changed on disk (model {fp}, "
                                    f"expected {self.fingerprint})")
        self._session = session

    def __repr__(self) -> str:
        return f"OnnxEmbedder({str(self.graph_path)!r}, fingerprint={self.fingerprint!r}, threads={self.threads})"

    # ---- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _open(graph: Path, model_path: Path | None, threads: int, device: str) -> Any:
        try:
            return open_session(graph, threads=threads, providers=providers_for(device))
        except RuntimeGraphError as e:
            raise RuntimeGraphError(f"{e}; {_fix_hint(model_path)}") from None

    @staticmethod
    def _check_io(session: Any, graph: Path, meta: dict) -> None:
        ins, outs = session.get_inputs(), session.get_outputs()
        size = int(meta["geometry"]["size"])
        ok = (len(ins) == 1 and ins[0].name == INPUT_NAME and ins[0].type == "tensor(uint8)"
              and list(ins[0].shape[1:]) == [size, size, 3] and any(o.name == OUTPUT_NAME for o in outs))
        if not ok:
            got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in ins)
            raise RuntimeGraphError(f"{graph}: not a faceverify embedding graph (inputs: {got}; want {INPUT_NAME} "
                                    f"uint8 [N, {size}, {size}, 3])")
