"""Which source each impostor-cohort face comes from, and which labelled person it is (torch-free).

The cohort itself ships inside the model file and its runtime graph (`extra["cohort"]`); its labels
live once, beside them, in `<model stem>.cohort-sources.npz` (a few tens of kB): one source code and
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
