"""People: enroll a person into a gallery and recalibrate their threshold (matching photos against the
gallery is verify.identity.match).

Joins `verify` (faces, embeddings, scores) and `index` (the FAISS gallery), with verify.identity.galleries
(where galleries live, opening one, the matcher over it: torch-free) and verify.queries.find (the photo
library index); the CLI only parses arguments and prints what these functions return.

Units: the model file, calibration and `IdentityMatcher` work with similarities (cosine, accept when
similarity >= threshold); what a person reads (Match, reports, `verify` output) are distances
(1 - similarity, accept when distance <= distance threshold).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from index import Gallery

from verify.identity.embed import EnrollmentBatch, embed_enrollment, expand_inputs, outlier_photos
from verify.faces import DetectorConfig, FaceDetector, FacePipeline
from verify.identity.galleries import calibrate_from_gallery

if TYPE_CHECKING:  # the product path runs without torch: an OnnxEmbedder serves as well
    from verify.model.file import Embedder

log = logging.getLogger(__name__)


def face_pipeline(embedder: "Embedder", device: str = "auto", min_face: int = 20, min_prob: float = 0.9,
                  runtime: str = "auto") -> FacePipeline:
    """MTCNN with these limits (under `runtime`: verify.model.runtimes), aligning to the model's crop and
    embedding with it."""
    detector = FaceDetector(DetectorConfig(min_face_size=min_face, min_prob=min_prob, device=device, runtime=runtime))
    return FacePipeline(detector, embedder=embedder)


def recalibrate(gallery: Gallery, name: str, embedder: Embedder, target_far: float = 1e-3, top_k: int = 3,
                promise: str = "every-source") -> dict:
    """Set `name`'s similarity threshold at `target_far` on the model's impostor cohort (see
    verify.identity.galleries.calibrate_from_gallery) and store it in the gallery; without a cohort the
    model's threshold applies."""
    return calibrate_from_gallery(gallery, name, embedder, target_far, top_k, promise)


@dataclass
class EnrollmentResult:
    name: str
    photos_used: int = 0
    vectors_added: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    warnings: list[str] = field(default_factory=list)
    calibration: dict | None = None  # the identity's stored info (threshold is a similarity)
    outliers: list[tuple[str, float]] = field(default_factory=list)  # (source, similarity to the rest)
    known_before: bool = False  # the person had photos enrolled before this call


def collect_photos(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files among `inputs` (folders walked) and (input, problem) for those that are not;
    raises ValueError (one line) when there is no image file at all."""
    files, problems = expand_inputs(inputs)
    if not files:
        missing = "".join(f"; {p}: {why}" for p, why in problems)
        raise ValueError("no image files found in " + ", ".join(str(p) for p in inputs) + missing)
    return files, problems


def enroll_person(gallery: Gallery, name: str, photos: Sequence[str | os.PathLike], pipeline: FacePipeline, *,
                  n_views: int = 8, target_far: float = 1e-3, top_k: int = 3, promise: str = "every-source",
                  collected: tuple[list[Path], list[tuple[str, str]]] | None = None) -> EnrollmentResult:
    """Enroll `name` from photos or folders: one face per photo (several: the largest), the photo plus
    `n_views` augmented views, added under the gallery's lock; then recalibrate the person and flag
    photos that look no more like the rest than a stranger does. Photos already enrolled (same
    content) are skipped. `collected`: what `collect_photos(photos)` already returned (folders are
    then not walked again)."""
    files, problems = collected if collected is not None else collect_photos(photos)
    return enroll_batch(gallery, name, lambda known: embed_enrollment(files, pipeline, n_views=n_views,
                                                                        skip_hashes=known),
                        pipeline.embedder, target_far=target_far, top_k=top_k, skipped=problems, promise=promise)


def enroll_batch(gallery: Gallery, name: str, make_batch: Callable[[set[str]], EnrollmentBatch], embedder: Embedder,
                 *, target_far: float = 1e-3, top_k: int = 3, promise: str = "every-source",
                 skipped: Sequence[tuple[str, str]] = ()) -> EnrollmentResult:
    """Add what `make_batch(hashes already enrolled for name)` embeds to `name`, under the gallery's
    lock, then recalibrate and flag outliers (the shared end of enrolling photos or a library group)."""
    if not name.strip():
        raise ValueError("NAME must not be empty")
    out = EnrollmentResult(name, skipped=list(skipped))
    with gallery.locked():
        known: set[str] = set()
        if name in set(gallery.identities()["identity"]):
            known = set(gallery.vectors(name)[1]["sha256"])
        out.known_before = bool(known)
        batch = make_batch(known)
        for ph in batch.photos:
            v = len(ph.vectors)
            gallery.add(ph.vectors, name, sources=[ph.source] * v, sha256s=[ph.sha256] * v, views=list(range(v)))
            out.vectors_added += v
        out.photos_used = len(batch.photos)
        out.skipped += batch.skipped
        out.warnings = batch.warnings
        if name in set(gallery.identities()["identity"]):
            out.calibration = recalibrate(gallery, name, embedder, target_far, top_k=top_k, promise=promise)
            vecs, meta = gallery.vectors(name)
            source_of = dict(zip(meta["sha256"], meta["source"]))
            flagged = outlier_photos(vecs, meta["sha256"].to_numpy(), embedder.similarity_threshold, embedder.cohort)
            out.outliers = [(source_of[sha], sim) for sha, sim in flagged]
    return out
