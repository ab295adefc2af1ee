"""`faceverify people`: the indexed faces that match nobody enrolled, grouped into candidate people, their
page, and enrolling a group (`enroll NAME --group ID`), which decodes the group's photos to make
augmented views (the only step here that reads a photo)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from index import Gallery
from index.library import Library

from verify.faces import FacePipeline
from verify.identity.galleries import build_matcher
from verify.queries.find import require_embedded

if TYPE_CHECKING:
    from verify.identity.enroll import EnrollmentResult


@dataclass
class PeopleResult:
    groups: dict[int, list[int]]  # group id -> face ids, largest first
    faces_considered: int  # faces matched to nobody enrolled
    rows: list[dict] = field(default_factory=list)  # one per grouped face: group, path, face, box


def unknown_people(library: Library, gallery: Gallery | None, model: str, *, min_faces: int = 3,
                   max_distance: float | None = None, method: str = "auto") -> PeopleResult:
    """Group the indexed faces of `model` (a fingerprint) that match nobody enrolled in `gallery`
    (every face without one) into candidate people; store the grouping in the index for `enroll --group`."""
    from index.groups import DEFAULT_MAX_DISTANCE, group_faces

    require_embedded(library, model)
    face_ids, vectors = library.embeddings(model)  # (N,), (N, D)
    if gallery is not None and len(gallery):
        matched = np.array([m.match for m in build_matcher(gallery)(vectors)], dtype=bool) \
            if len(vectors) else np.zeros(0, bool)
        face_ids, vectors = face_ids[~matched], vectors[~matched]
    labels = group_faces(vectors, max_distance=DEFAULT_MAX_DISTANCE if max_distance is None else max_distance,
                         min_faces=min_faces, method=method) if len(vectors) else np.zeros(0, np.int64)
    library.save_groups(model, face_ids.tolist(), labels.tolist())
    groups: dict[int, list[int]] = {}
    for f, g in zip(face_ids.tolist(), labels.tolist()):
        if g >= 0:
            groups.setdefault(int(g), []).append(int(f))
    where = library.face_locations([f for members in groups.values() for f in members])
    rows = []
    for g in sorted(groups):
        for f in groups[g]:
            path, _, k, rec, _ = where[f]
            rows.append({"group": g, "size": len(groups[g]), "path": path, "face": k,
                         "x1": rec.box[0], "y1": rec.box[1], "x2": rec.box[2], "y2": rec.box[3], "prob": rec.prob})
    return PeopleResult(groups, int(len(vectors)), rows)


def enroll_group(gallery: Gallery, name: str, library: Library, group: int, pipeline: FacePipeline, *,
                 n_views: int = 8, target_far: float = 1e-3, top_k: int = 3,
                 promise: str = "every-source") -> "EnrollmentResult":
    """Enroll `name` from group `group` of the last `faceverify people` run: each member face aligned
    from its stored landmarks (no detection), plus the same augmented views, calibration and outlier
    check as enrolling photos."""
    from verify.identity.embed import embed_known_faces
    from verify.identity.enroll import enroll_batch

    embedder = pipeline.embedder
    members = library.groups(embedder.fingerprint).get(int(group))
    if not members:
        raise ValueError(f"{library.path}: no group {group} for model {embedder.fingerprint}; "
                         "run faceverify people first (group ids change with every run)")
    where = library.face_locations(members)
    faces = [(fs, sha or path, rec.landmarks, rec.box) for path, fs, _, rec, sha in (where[f] for f in members
                                                                                   if f in where)]
    return enroll_batch(gallery, name, lambda known: embed_known_faces(faces, pipeline, n_views=n_views,
                                                                       skip_hashes=known),
                        embedder, target_far=target_far, top_k=top_k, promise=promise)


def write_people_page(result: PeopleResult, page: str | os.PathLike, library: Library, max_per_group: int = 24) -> None:
    """One row of thumbnails per group, largest first (verify.scan.html cuts them from the photos)."""
    from verify.scan.html import write_groups_html

    write_groups_html(result.rows, Path(page).absolute(), max_per_group=max_per_group, source=str(library.path))
