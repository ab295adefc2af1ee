"""Enrollment: a person's photos -> aligned face crops -> original + N augmented views -> embeddings.

Numpy out; the CLI adds the vectors to the gallery (verify/ never imports index/)."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .augment import augment_views
from .faces import FacePipeline, is_image_file
from .model_file import Embedder
from .scoring import normalise, pool_photos

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


@dataclass
class EnrolledPhoto:
    source: str
    sha256: str
    vectors: np.ndarray  # (1 + n_views, D): view 0 is the photo itself
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
    embedder: Embedder,
    *,
    n_views: int = 8,
    augment: dict | None = None,
    seed: int = 0,
    skip_hashes: set[str] | None = None,
) -> EnrollmentBatch:
    """Embed each photo's largest face plus `n_views` augmented views of it (made on the fly)."""
    out = EnrollmentBatch()
    augment = {**DEFAULT_VIEW_AUGMENT, **(augment or {})}
    gen = torch.Generator().manual_seed(seed)
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
    for (p, digest), res in zip(todo, pipeline.iter_process([p for p, _ in todo])):
        if not res.ok:
            out.skipped.append((str(p), res.error.split(": ", 1)[-1] if res.error else "unreadable"))
            continue
        if not res.faces:
            out.skipped.append((str(p), "no face found"))
            continue
        if len(res.faces) > 1:
            out.warnings.append(f"{p}: {len(res.faces)} faces found; using the largest")
        face, crop = res.faces[0]
        views = augment_views(crop, 1 + n_views, generator=gen, include_original=True, **augment)  # (V,S,S,3)
        vecs = embedder.embed(views)  # (V, D)
        out.photos.append(EnrolledPhoto(str(p), digest, vecs, len(res.faces), tuple(float(v) for v in face.box)))
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
