"""Writing model files: a new one from a trained network (`save_model`) or an impostor cohort attached to an
existing one (`attach_cohort`). Both keep the runtime graph beside the file in step, so this module sits
above `verify.model.file` (reading) and `verify.model.graph` (export), and neither of those imports it."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import torch

from verify.atomic import atomic_path
from verify.model.backbones import Backbone
from verify.model.cohort import write_cohort_vectors
from verify.model.file import FORMAT_VERSION, ModelFileError, fingerprint, read_model_file
from verify.model.geometry import NORMALISATION, CropGeometry
from verify.model.graph import export_runtime_graph

log = logging.getLogger(__name__)


def save_model(
    path: str | Path,
    net: Backbone,
    *,
    arch: dict,
    geometry: CropGeometry,
    threshold: float,
    calibration: dict,
    provenance: dict,
    tta_flip: bool = True,
    extra: dict | None = None,
) -> str:
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    fp = fingerprint(state)
    blob = {
        "format_version": FORMAT_VERSION,
        "arch": dict(arch),
        "state_dict": state,
        "geometry": geometry.to_dict(),
        "normalisation": dict(NORMALISATION),
        "embedding_dim": int(arch["embedding_dim"]),
        "threshold": float(threshold),
        "calibration": dict(calibration),
        "provenance": provenance,
        "tta_flip": bool(tta_flip),
        "fingerprint": fp,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    _refresh_runtime_graph(Path(path))
    return fp


def _refresh_runtime_graph(model_path: Path) -> None:
    """A runtime graph beside a rewritten model file would be stale (it records the file's sha256):
    make it again. Where there is none, `faceverify model export` (or the first load) makes one."""
    if model_path.with_suffix(".onnx").is_file() and model_path.suffix != ".onnx":
        export_runtime_graph(model_path)


def attach_cohort(model_path: Path, cohort: np.ndarray, source: str) -> None:
    """Attach an impostor cohort to a model: (C, D) unit rows as float16, with `source` describing it, in
    `<stem>.cohort.npz` beside the model file (verify.model.cohort). The model file and its runtime graph
    are left as they are, so a recalibration adds the cohort alone to a repository's history; a model
    file of an earlier release that carries a cohort inside is rewritten once without it (atomically,
    same permissions; its graph made again). The fingerprint hashes the weights only: it does not change."""
    model_path = Path(model_path)
    blob = read_model_file(model_path)
    c = np.asarray(cohort, dtype=np.float32)
    dim = int(blob["embedding_dim"])
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] != dim:
        raise ValueError(f"{model_path}: cohort must be (C, {dim}) with C >= 1, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError(f"{model_path}: cohort has non-finite values")
    c = c / np.linalg.norm(c, axis=1, keepdims=True).clip(1e-12)
    if fingerprint(blob["state_dict"]) != blob.get("fingerprint"):
        raise ModelFileError(f"{model_path}: weights do not match the stored fingerprint; not rewriting it")
    write_cohort_vectors(model_path, c, source)
    extra = dict(blob.get("extra") or {})
    if "cohort" in extra or "cohort_source" in extra:  # an earlier release's copy inside: the file beside wins
        extra.pop("cohort", None)
        extra.pop("cohort_source", None)
        blob["extra"] = extra
        mode = stat.S_IMODE(os.stat(model_path).st_mode)
        with atomic_path(model_path, mode=mode) as tmp:
            torch.save(blob, tmp)
        _refresh_runtime_graph(model_path)
    log.info("%s: attached a cohort of %d faces (%s)", model_path, len(c), source)
