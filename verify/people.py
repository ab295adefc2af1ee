"""People: enroll a person into a gallery, recalibrate their threshold, build the matcher, verify photos.

The one module that joins `verify` (faces, embeddings, scores) and `index` (the FAISS gallery); the
CLI only parses arguments and prints what these functions return.

Units: the model file, calibration and `IdentityMatcher` work with similarities (cosine, accept when
similarity >= threshold); what a person reads (Match, reports, `verify` output) are distances
(1 - similarity, accept when distance <= distance threshold).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from index import Gallery, GalleryError

from .enroll import embed_enrollment, expand_inputs, outlier_photos
from .faces import DetectorConfig, FaceDetector, FacePipeline
from .model_file import Embedder
from .scoring import IdentityCalibration, IdentityMatcher, calibrate_identity, pool_photos

log = logging.getLogger(__name__)


def default_gallery() -> Path:
    """Per-user data folder: $FACEVERIFY_HOME/gallery, else $XDG_DATA_HOME/faceverify/gallery."""
    home = os.environ.get("FACEVERIFY_HOME")
    if home:
        return Path(home) / "gallery"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "faceverify" / "gallery"


def open_gallery(path: Path | None, embedder: Embedder | None, create: bool = False) -> Gallery:
    """The gallery at `path` (default: `default_gallery()`); `create` makes it for this model.
    Raises GalleryError (one line) when there is none yet or it belongs to another model."""
    path = path or default_gallery()
    if create:
        return Gallery.open_or_create(path, embedder.dim, embedder.fingerprint,
                                      threshold=embedder.similarity_threshold)
    if not (path / "manifest.json").exists():
        raise GalleryError(f"{path}: no gallery here yet; enroll someone first (faceverify enroll NAME PHOTOS...)")
    return Gallery.open(path, fingerprint=embedder.fingerprint if embedder else None)


def face_pipeline(embedder: Embedder, device: str = "auto", min_face: int = 20, min_prob: float = 0.9) -> FacePipeline:
    """MTCNN with these limits, aligning to the model's crop and embedding with it."""
    detector = FaceDetector(DetectorConfig(min_face_size=min_face, min_prob=min_prob, device=device))
    return FacePipeline(detector, embedder=embedder)


def recalibrate(gallery: Gallery, name: str, embedder: Embedder, target_far: float = 1e-3, top_k: int = 3) -> dict:
    """Set `name`'s similarity threshold at `target_far` on the model's impostor cohort (see
    verify.scoring) and store it in the gallery; without a cohort the model's threshold applies."""
    vecs, meta = gallery.vectors(name)
    _, pooled = pool_photos(vecs, meta["sha256"].to_numpy())
    cohort = embedder.cohort
    if cohort is None:
        info = {"threshold": embedder.similarity_threshold, "calibrated": False, "photos": int(len(pooled))}
    else:
        cal = calibrate_identity(pooled, cohort, target_far=target_far, top_k=top_k)
        info = {**cal.to_dict(), "calibrated": True, "photos": int(len(pooled))}
    gallery.set_identity_info(name, info)
    return info


def build_matcher(gallery: Gallery, embedder: Embedder, top_k: int = 3) -> IdentityMatcher:
    """Identity scoring over the gallery: FAISS finds candidate identities, then each candidate is
    scored with its pooled photos and its own calibrated threshold."""
    vecs, meta = gallery.vectors()
    pooled, cals = {}, {}
    for name, rows in meta.groupby("identity").indices.items():
        _, pooled[name] = pool_photos(vecs[rows], meta["sha256"].to_numpy()[rows])
        info = gallery.identity_info(name)
        if info.get("calibrated"):
            cals[name] = IdentityCalibration.from_dict(info)

    def candidates(q: np.ndarray) -> list[list[str]]:
        res = gallery.search(q, k=min(len(gallery), 64))
        return [[n for n in row if n is not None] for row in res.identities.tolist()]

    return IdentityMatcher(pooled, cals, embedder.similarity_threshold, top_k=top_k,
                           candidates=candidates if len(pooled) > 8 else None)


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
                  n_views: int = 8, target_far: float = 1e-3, top_k: int = 3,
                  collected: tuple[list[Path], list[tuple[str, str]]] | None = None) -> EnrollmentResult:
    """Enroll `name` from photos or folders: one face per photo (several: the largest), the photo plus
    `n_views` augmented views, added under the gallery's lock; then recalibrate the person and flag
    photos that look no more like the rest than a stranger does. Photos already enrolled (same
    content) are skipped. `collected`: what `collect_photos(photos)` already returned (folders are
    then not walked again)."""
    if not name.strip():
        raise ValueError("NAME must not be empty")
    embedder = pipeline.embedder
    files, problems = collected if collected is not None else collect_photos(photos)
    out = EnrollmentResult(name, skipped=list(problems))
    with gallery.locked():
        known: set[str] = set()
        if name in set(gallery.identities()["identity"]):
            known = set(gallery.vectors(name)[1]["sha256"])
        out.known_before = bool(known)
        batch = embed_enrollment(files, pipeline, n_views=n_views, skip_hashes=known)
        for ph in batch.photos:
            v = len(ph.vectors)
            gallery.add(ph.vectors, name, sources=[ph.source] * v, sha256s=[ph.sha256] * v, views=list(range(v)))
            out.vectors_added += v
        out.photos_used = len(batch.photos)
        out.skipped += batch.skipped
        out.warnings = batch.warnings
        if name in set(gallery.identities()["identity"]):
            out.calibration = recalibrate(gallery, name, embedder, target_far, top_k=top_k)
            vecs, meta = gallery.vectors(name)
            source_of = dict(zip(meta["sha256"], meta["source"]))
            flagged = outlier_photos(vecs, meta["sha256"].to_numpy(), embedder.similarity_threshold, embedder.cohort)
            out.outliers = [(source_of[sha], sim) for sha, sim in flagged]
    return out


@dataclass
class PhotoVerdict:
    source: str
    faces: list[dict]  # per face: "box" and Match.to_dict() (distance, threshold, match, far, ...)
    error: str | None  # unreadable, or "no face found"

    @property
    def matched(self) -> bool:
        return any(f["match"] for f in self.faces)


def verify_photos(photos: Iterable[str | os.PathLike], pipeline: FacePipeline, matcher: IdentityMatcher,
                  only: str | None = None) -> Iterator[PhotoVerdict]:
    """Is this photo me? For each photo, every face's decision (1:N, or 1:1 against `only`)."""
    for res in pipeline.iter_process([str(p) for p in photos]):
        faces = []
        if res.ok and res.faces:
            for (face, _), m in zip(res.faces, matcher(res.embeddings, only=only)):
                faces.append({"box": [round(float(v), 1) for v in face.box], **m.to_dict()})
        error = res.error if not res.ok else (None if faces else "no face found")
        yield PhotoVerdict(res.source, faces, error)
