"""`faceverify people`: the indexed faces that match nobody enrolled, grouped into candidate people, their
page, and enrolling a group (`enroll NAME --group ID`), which decodes the group's photos to make
augmented views (the only step here that reads a photo).

Faces below the quality gate (index.quality, `--min-quality`) are left out of the grouping and listed;
settings and their measurements: index.groups' docstring and docs/people.md."""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)


@dataclass
class PeopleResult:
    groups: dict[int, list[int]]  # group id -> face ids; ids in page order: largest first, then best quality
    faces_considered: int  # faces matched to nobody enrolled
    rows: list[dict] = field(default_factory=list)  # one per grouped face: group, size, path, face, box, prob, quality
    excluded: list[dict] = field(default_factory=list)  # one per face below min_quality: path, face, box, prob, quality
    spread: dict[int, float] = field(default_factory=dict)  # group id -> mean distance of its faces from its centre
    quality: dict[int, float] = field(default_factory=dict)  # group id -> mean quality of its faces
    min_quality: float = 0.0


def unknown_people(library: Library, gallery: Gallery | None, model: str, *, min_faces: int = 3,
                   max_distance: float | None = None, method: str = "auto",
                   min_quality: float | None = None, merge_distance: float | None = None,
                   centre: bool | None = None, save: bool = True) -> PeopleResult:
    """Group the indexed faces of `model` (a fingerprint) that match nobody enrolled in `gallery`
    (every face without one) into candidate people; store the grouping in the index for `enroll --group`
    (unless not `save`: the review app only shows it). Faces decided about are left out when confirmed
    or ignored, and count as unmatched for a person they were rejected as.

    Faces whose quality (index.quality) is below `min_quality` (default DEFAULT_MIN_QUALITY) neither
    form nor join a group: they come back in `excluded`, never dropped silently. `merge_distance`
    (default DEFAULT_MERGE_DISTANCE; 0 = no merging) joins groups whose pooled vectors are that close.
    `centre` (default DEFAULT_CENTRE) groups the vectors less the library's mean (index.groups.centre_on,
    the mean over every indexed face of `model`); max_distance and merge_distance then hold in that space."""
    from index.groups import (DEFAULT_CENTRE, DEFAULT_MAX_DISTANCE, DEFAULT_MERGE_DISTANCE, centre_on, group_faces,
                              group_spread, library_mean, merge_close_groups)
    from index.quality import DEFAULT_MIN_QUALITY

    from verify.identity.decisions import Verdicts, apply_decisions

    min_quality = DEFAULT_MIN_QUALITY if min_quality is None else float(min_quality)
    merge_distance = DEFAULT_MERGE_DISTANCE if merge_distance is None else float(merge_distance)
    require_embedded(library, model)
    if not library.readonly:
        library.fill_quality()  # faces indexed before the score existed: scored once from what is stored
    face_ids, vectors = library.embeddings(model)  # (N,), (N, D)
    centre = DEFAULT_CENTRE if centre is None else bool(centre)
    mean = library_mean(vectors) if centre else None  # (D,) over the whole library, before any face is set aside
    verdicts = Verdicts.load(library, model)
    verdict_of = verdicts.of_face_ids()
    # ignored (not a face) and confirmed (known) faces are never grouped
    settled = np.array([(v := verdict_of.get(int(f))) is not None and (v.ignored_by is not None or v.confirmed is not None)
                        for f in face_ids.tolist()], dtype=bool)
    face_ids, vectors = face_ids[~settled], vectors[~settled]
    if gallery is not None and len(gallery) and len(vectors):
        matcher = build_matcher(gallery)
        matches, _ = apply_decisions(matcher(vectors), [verdict_of.get(int(f)) for f in face_ids.tolist()],
                                     vectors=vectors, impostors=verdicts.impostors, top_k=matcher.top_k)
        matched = np.array([m.match for m in matches], dtype=bool)
        face_ids, vectors = face_ids[~matched], vectors[~matched]
    quality = library.face_quality(face_ids.tolist())  # (N,)
    good = ~(quality < min_quality)  # NaN (not scorable) stays in: only a measured low score excludes
    labels = np.full(len(face_ids), -1, np.int64)
    if good.any():
        space = centre_on(vectors[good], mean) if mean is not None else vectors[good]  # (G, D) what is grouped
        labels[good] = group_faces(space, min_faces=min_faces, method=method,
                                   max_distance=DEFAULT_MAX_DISTANCE if max_distance is None else max_distance)
        if merge_distance > 0:
            labels[good] = merge_close_groups(space, labels[good], merge_distance)
    # page order: largest group first, then the better mean quality
    grouped = np.flatnonzero(labels >= 0)
    by_label = grouped[np.argsort(labels[grouped], kind="stable")]  # one sort, not one scan per group
    ids, starts = np.unique(labels[by_label], return_index=True)
    members = dict(zip(ids.tolist(), np.split(by_label, starts[1:]))) if len(ids) else {}
    order = sorted(members, key=lambda g: (-len(members[g]), -float(np.nanmean(quality[members[g]])), g))
    renumber = {old: new for new, old in enumerate(order)}
    labels = np.array([renumber.get(int(g), -1) for g in labels], np.int64)
    if save:
        library.save_groups(model, face_ids.tolist(), labels.tolist())
    groups = {renumber[g]: face_ids[members[g]].tolist() for g in order}
    spread = {renumber[g]: group_spread(vectors[members[g]]) for g in order}
    mean_quality = {renumber[g]: float(np.nanmean(quality[members[g]])) for g in order}
    low = np.flatnonzero(~good)
    where = library.face_locations([f for m in groups.values() for f in m] + face_ids[low].tolist())
    q_of = dict(zip(face_ids.tolist(), quality.tolist()))

    def row(f: int) -> dict:
        path, _, k, rec, _ = where[f]
        return {"path": path, "face": k, "x1": rec.box[0], "y1": rec.box[1], "x2": rec.box[2], "y2": rec.box[3],
                "prob": rec.prob, "quality": q_of[f]}

    rows = [{"group": g, "size": len(groups[g]), **row(f)} for g in sorted(groups) for f in groups[g]]
    excluded = sorted((row(int(f)) for f in face_ids[low]), key=lambda r: r["quality"])
    if len(low):
        log.info("%d of %d unknown faces below quality %.2f left out of the groups", len(low), len(face_ids), min_quality)
    return PeopleResult(groups, int(len(vectors)), rows, excluded, spread, mean_quality, min_quality)


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

    write_groups_html(result.rows, Path(page).absolute(), max_per_group=max_per_group, source=str(library.path),
                      excluded=result.excluded, spread=result.spread, quality=result.quality,
                      min_quality=result.min_quality)
