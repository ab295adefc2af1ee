"""faceverify: is this photo me, and which of these photos contain me?

The public API, importable from the package itself (each name is loaded on first use, so importing a
light submodule, e.g. in a decode worker, never pulls in torch or FAISS):

    from verify import Embedder, FacePipeline, FaceDetector, open_gallery, build_matcher, verify_photos

Rooms: `faces` (photo -> aligned faces -> embeddings), `model` (the embedding model, its file and runtime
graph), `identity` (enroll, match and score known people), `queries` (answers from the library index),
`scan` (folder trees -> one report), `training`, `evaluation`, `data`; docs/house.md draws the map.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Embedder": "verify.model.file",
    "DetectorConfig": "verify.faces",
    "FaceDetector": "verify.faces",
    "FacePipeline": "verify.faces",
    "ImageFaces": "verify.faces",
    "load_image": "verify.faces",
    "IdentityMatcher": "verify.identity.scoring",
    "Match": "verify.identity.scoring",
    "run_scan": "verify.scan",
    "ScanSummary": "verify.scan",
    "evaluate_pairs": "verify.evaluation.evaluate",
    "open_gallery": "verify.identity.galleries",
    "face_pipeline": "verify.identity.enroll",
    "enroll_person": "verify.identity.enroll",
    "build_matcher": "verify.identity.galleries",
    "verify_photos": "verify.identity.match",
    "PhotoVerdict": "verify.identity.match",
    "Verdicts": "verify.identity.decisions",
    "apply_decisions": "verify.identity.decisions",
    "library_checks": "verify.queries.library_check",
    "apply_stricter": "verify.queries.library_check",
    "LibraryCheck": "verify.queries.library_check",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'verify' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
