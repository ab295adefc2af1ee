"""Enrollment: a person's photos -> aligned face crops -> original + N augmented views -> embeddings.

A view is made the way a query is seen: the region around the face is augmented (rotation, zoom,
shift, flip), then detected and aligned again. Augmenting the aligned crop itself instead moves the
face off the alignment the model was trained on, and measurably hurt (scripts/scenario.py: 51.4%
true accepts with 8 such views, 55.7% with none, 56.2% with 8 re-aligned views).

Numpy out; verify.identity.enroll adds the vectors to the gallery."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from verify.faces import FacePipeline, ImageFaces, is_image_file, shrink
from verify.identity.scoring import normalise, pool_photos
from verify.identity.views import augment_views

log = logging.getLogger(__name__)

# The original project's augmentation settings (rotation 20 deg, zoom 0.2, shifts 0.1, flip).
DEFAULT_VIEW_AUGMENT = {"hflip": True, "rotation": 20.0, "zoom": 0.2, "shift": 0.1}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given, folders walked recursively (sorted, images by content, no symlinked folders).
    Returns (image files, [(path, problem)] for inputs that are missing or not images)."""
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for root, dirs, names in os.walk(p, followlinks=False):
                dirs.sort()
                for n in sorted(names):
                    f = Path(root) / n
                    if f.is_file() and is_image_file(f):
                        files.append(f)
        elif p.is_file():
            files.append(p)  # given explicitly: load errors are reported per file
        else:
            problems.append((str(p), "no such file or folder"))
    return files, problems


def face_region(image: np.ndarray, box: Sequence[float], margin: float = 0.5, max_side: int = 400) -> np.ndarray:
    """The square around a face box grown by `margin` x its side on every side, clipped to the image,
    and shrunk (antialiased) to at most `max_side` pixels: what the augmented views are cut from."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1) * (0.5 + margin)
    h, w = image.shape[:2]
    left, top = max(0, int(np.floor(cx - half))), max(0, int(np.floor(cy - half)))
    right, bottom = min(w, int(np.ceil(cx + half))), min(h, int(np.ceil(cy + half)))
    region, _ = shrink(np.ascontiguousarray(image[top:bottom, left:right]), max_side)  # (h', w', 3)
    return region


def augmented_view_faces(image: np.ndarray, box: Sequence[float], pipeline: FacePipeline, n_views: int,
                         rng: np.random.Generator | None = None, **augment: object) -> list[ImageFaces]:
    """Up to `n_views` results of the face in `box`: each from an augmented copy of the region around
    it, detected and aligned again (and embedded, when the pipeline has an embedder); the largest face
    of a view is `faces[0]`. A view in which no face is found is dropped, so fewer may come back."""
    if n_views < 1:
        return []
    region = face_region(image, box)
    views = augment_views(region, n_views, rng if rng is not None else np.random.default_rng(), **augment)  # (n, h, w, 3)
    return [res for res in pipeline.process(list(views)) if res.ok and res.faces]


def augmented_view_crops(image: np.ndarray, box: Sequence[float], pipeline: FacePipeline, n_views: int,
                         rng: np.random.Generator | None = None, **augment: object) -> list[np.ndarray]:
    """The aligned crops of `augmented_view_faces`: (S, S, 3) each."""
    return [res.faces[0].crop for res in augmented_view_faces(image, box, pipeline, n_views, rng, **augment)]


@dataclass
class EnrolledPhoto:
    source: str
    sha256: str
    vectors: np.ndarray  # (V, D), V <= 1 + n_views: view 0 is the photo itself
    faces_found: int
    box: tuple[float, float, float, float]


@dataclass
class EnrollmentBatch:
    photos: list[EnrolledPhoto] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    warnings: list[str] = field(default_factory=list)


def embed_enrollment(
    paths: Sequence[Path],
    pipeline: FacePipeline,
    *,
    n_views: int = 8,
    augment: dict | None = None,
    seed: int = 0,
    skip_hashes: set[str] | None = None,
) -> EnrollmentBatch:
    """Embed each photo's largest face plus up to `n_views` augmented views of it (made on the fly,
    re-detected and re-aligned: `augmented_view_faces`). `pipeline` must have an embedder."""
    if pipeline.embedder is None:
        raise ValueError("embed_enrollment needs a FacePipeline with an embedder")
    out = EnrollmentBatch()
    augment = {**DEFAULT_VIEW_AUGMENT, **(augment or {})}
    gen = np.random.default_rng(seed)
    todo: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for p in paths:
        try:
            digest = sha256_file(p)
        except OSError as e:
            out.skipped.append((str(p), f"cannot read ({e.strerror or e})"))
            continue
        if digest in (skip_hashes or set()) or digest in seen:
            out.skipped.append((str(p), "already enrolled (same content)"))
            continue
        seen.add(digest)
        todo.append((p, digest))
    results = pipeline.iter_process([p for p, _ in todo], keep_images=n_views > 0)  # views need the pixels
    for (p, digest), res in zip(todo, results):
        if not res.ok:
            out.skipped.append((str(p), res.error.split(": ", 1)[-1] if res.error else "unreadable"))
            continue
        if not res.faces:
            out.skipped.append((str(p), "no face found"))
            continue
        if len(res.faces) > 1:
            out.warnings.append(f"{p}: {len(res.faces)} faces found; using the largest")
        face = res.faces[0].face
        vecs = [res.embeddings[0]]
        if n_views > 0:
            vecs += [v.embeddings[0] for v in augmented_view_faces(res.image, face.box, pipeline, n_views, gen, **augment)]
            res.image = None  # done with the pixels
            if len(vecs) < 1 + n_views:
                log.info("%s: %d of %d augmented views kept a detectable face", p, len(vecs) - 1, n_views)
        vecs = np.stack(vecs)  # (V, D)
        out.photos.append(EnrolledPhoto(str(p), digest, vecs, len(res.faces), tuple(float(v) for v in face.box)))
    return out


def embed_known_faces(
    faces: Sequence[tuple[str, str, np.ndarray, Sequence[float]]],
    pipeline: FacePipeline,
    *,
    n_views: int = 8,
    augment: dict | None = None,
    seed: int = 0,
    skip_hashes: set[str] | None = None,
) -> EnrollmentBatch:
    """Like `embed_enrollment` for faces found before (a group of the library index): per
    (photo path, content sha256, (5, 2) landmarks, box) in original pixels, the face is aligned from
    its stored landmarks (no detection) and embedded, plus up to `n_views` augmented views made as
    `embed_enrollment` makes them. A photo that cannot be read is skipped with its reason."""
    from verify.faces import ImageLoadError, align, load_image

    if pipeline.embedder is None:
        raise ValueError("embed_known_faces needs a FacePipeline with an embedder")
    out = EnrollmentBatch()
    augment = {**DEFAULT_VIEW_AUGMENT, **(augment or {})}
    gen = np.random.default_rng(seed)
    seen: set[str] = set()
    for path, digest, landmarks, box in faces:
        if digest in (skip_hashes or set()) or digest in seen:
            out.skipped.append((path, "already enrolled (same content)"))
            continue
        seen.add(digest)
        try:
            image = load_image(path, max_pixels=pipeline.max_pixels)  # (H, W, 3), original pixels
        except ImageLoadError as exc:
            out.skipped.append((path, exc.problem))
            continue
        crop = align(image, np.asarray(landmarks, np.float32), pipeline.geometry)  # (S, S, 3)
        vecs = [pipeline.embedder.embed(crop[None])[0]]
        if n_views > 0:
            vecs += [v.embeddings[0] for v in augmented_view_faces(image, box, pipeline, n_views, gen, **augment)]
        out.photos.append(EnrolledPhoto(path, digest, np.stack(vecs), 1, tuple(float(v) for v in box)))
    return out


def outlier_photos(vectors: np.ndarray, photo_keys: np.ndarray, threshold: float,
                   cohort: np.ndarray | None = None, quantile: float = 0.99) -> list[tuple[str, float]]:
    """Photos that look no more like the person's other photos than a stranger does.

    Each photo's pooled embedding is compared with the mean of the person's other photos. With an
    impostor cohort the bar is the `quantile` of the cohort's similarities to that same mean (a
    stranger scores this high only 1% of the time); without one it is the model's pair threshold."""
    keys, pooled = pool_photos(vectors, photo_keys)
    if len(keys) < 3:
        return []
    total = pooled.sum(axis=0)
    flagged = []
    for i, k in enumerate(keys):
        rest = normalise(total - pooled[i])
        sim = float(pooled[i] @ rest)
        bar = float(np.quantile(normalise(cohort) @ rest, quantile)) if cohort is not None and len(cohort) else threshold
        if sim < bar:
            flagged.append((str(k), sim))
    return flagged
