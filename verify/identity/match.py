"""Is this photo me? Every face of each photo matched against the gallery (`verify_photos`).

The decision itself (pooled enrolled views, calibrated per-person threshold) is verify.identity.scoring's
IdentityMatcher (`verify.identity.galleries.build_matcher` makes one); this module walks the photos
through the face pipeline and gathers one `PhotoVerdict` per photo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    from verify.faces import FacePipeline
    from verify.identity.scoring import IdentityMatcher


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
