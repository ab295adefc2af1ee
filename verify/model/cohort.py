"""The impostor cohort beside a model file, and which source each of its faces comes from (torch-free).

Since issue 31 the cohort lives once, beside the model file and its runtime graph, in
`<model stem>.cohort.npz` (`vectors`: (C, D) float16 unit rows; `source`: what it was made of), so
calibrating a model writes that file alone and never rewrites the weights: the model files of earlier
releases carried it twice, inside the .pt (`extra["cohort"]`) and in the graph's metadata, and those
are still read (verify.model.meta). Its labels live once, beside them too, in
`<model stem>.cohort-sources.npz` (a few tens of kB): one source code and
one person key per cohort row, the source names, and the sha256 of the cohort's float16 bytes they
describe. Labels of another cohort are refused (`read_cohort_sources` returns None and logs why), so a
re-attached cohort never borrows stale labels. verify.identity.scoring calibrates per source with them.

    codes    (C,) uint8   source of each row (an index into names)
    names    (S,) str     e.g. "lfw", "celeba", "utkface"
    persons  (C,) int32   labelled person of each row, -1 for unlabelled sets (each face its own person)
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verify.atomic import atomic_path

log = logging.getLogger(__name__)

SUFFIX = ".cohort-sources.npz"
VECTORS_SUFFIX = ".cohort.npz"


class CohortFileError(ValueError):
    """The cohort file beside a model is unreadable (one line naming it)."""


def vectors_path(model_path: str | Path) -> Path:
    """`default.pt` and `default.onnx` share `default.cohort.npz`."""
    p = Path(model_path)
    return p.with_name(p.stem + VECTORS_SUFFIX)


def write_cohort_vectors(model_path: str | Path, cohort: np.ndarray, source: str) -> Path:
    """Store the (C, D) cohort (unit rows, as float16) and its description beside the model file, atomically."""
    c16 = np.ascontiguousarray(np.asarray(cohort, dtype=np.float32).astype("<f2"))  # (C, D)
    out = vectors_path(model_path)
    with atomic_path(out, mode=0o644) as tmp:  # readable as the model file beside it
        with open(tmp, "wb") as f:
            # uncompressed: float16 unit vectors barely compress, and np.load reads them at once
            np.savez(f, vectors=c16, source=np.array(str(source)))
    return out


def read_cohort_vectors(model_path: str | Path | None) -> tuple[np.ndarray, str] | None:
    """((C, D) float16 cohort, its description) from the file beside `model_path`; None without one;
    CohortFileError (one line naming the file) when it is unreadable."""
    if model_path is None:
        return None
    p = vectors_path(model_path)
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            vectors, source = z["vectors"], str(z["source"])
    except Exception as e:
        raise CohortFileError(f"{p}: unreadable cohort file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if vectors.ndim != 2 or vectors.dtype != np.float16 or not len(vectors):
        raise CohortFileError(f"{p}: a cohort file holds (C, D) float16 vectors, got {vectors.dtype} {vectors.shape}")
    return vectors, source


@dataclass(frozen=True)
class CohortSources:
    codes: np.ndarray  # (C,) uint8
    names: tuple[str, ...]
    persons: np.ndarray  # (C,) int32, -1 unlabelled

    def __post_init__(self) -> None:
        if len(self.codes) != len(self.persons):
            raise ValueError(f"{len(self.codes)} source codes for {len(self.persons)} person keys")
        if len(self.codes) and int(self.codes.max()) >= len(self.names):
            raise ValueError(f"source code {int(self.codes.max())} but only {len(self.names)} source names")

    def counts(self) -> dict[str, int]:
        """Faces per source, in source order."""
        n = np.bincount(self.codes, minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, n)}


def cohort_sha256(cohort: np.ndarray) -> str:
    """sha256 of the cohort as stored (float16 rows), what its labels file is tied to."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(cohort, dtype=np.float16)).tobytes()).hexdigest()


def sources_path(model_path: str | Path) -> Path:
    """`default.pt` and `default.onnx` share `default.cohort-sources.npz`."""
    p = Path(model_path)
    return p.with_name(p.stem + SUFFIX)


def write_cohort_sources(model_path: str | Path, cohort: np.ndarray, sources: CohortSources) -> Path:
    """Store `sources` for `cohort` beside the model file (atomically)."""
    if len(sources.codes) != len(cohort):
        raise ValueError(f"{len(sources.codes)} labels for a cohort of {len(cohort)} faces")
    out = sources_path(model_path)
    with atomic_path(out, mode=0o644) as tmp:  # readable as the model file beside it
        with open(tmp, "wb") as f:
            np.savez_compressed(f, codes=sources.codes.astype(np.uint8), names=np.array(sources.names),
                                persons=sources.persons.astype(np.int32), cohort_sha256=np.array(cohort_sha256(cohort)))
    return out


def read_cohort_sources(model_path: str | Path | None, cohort: np.ndarray | None) -> CohortSources | None:
    """The labels of `cohort` beside `model_path`, or None (no file, unreadable, or made for another
    cohort: logged, and calibration falls back to the pooled cohort)."""
    if model_path is None or cohort is None:
        return None
    p = sources_path(model_path)
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            sha, codes, names, persons = str(z["cohort_sha256"]), z["codes"], tuple(str(n) for n in z["names"]), z["persons"]
        labels = CohortSources(codes.astype(np.uint8), names, persons.astype(np.int32))
    except Exception as e:  # a damaged labels file must not stop verify: the pooled rule still works
        log.warning("%s: unreadable cohort labels (%s: %s); calibrating on the pooled cohort", p, type(e).__name__, e)
        return None
    if sha != cohort_sha256(cohort):
        log.warning("%s: labels of another cohort than the model's; calibrating on the pooled cohort", p)
        return None
    return labels
