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
    from verify.identity.decisions import Verdicts
    from verify.identity.scoring import IdentityMatcher, Match


@dataclass
class PhotoVerdict:
    source: str
    faces: list[dict]  # per face: "box" and Match.to_dict() (distance, threshold, match, far, ...)
    error: str | None  # unreadable, or "no face found"

    @property
    def matched(self) -> bool:
        return any(f["match"] for f in self.faces)


def verify_photos(photos: Iterable[str | os.PathLike], pipeline: FacePipeline, matcher: IdentityMatcher,
                  only: str | None = None, verdicts: "Verdicts | None" = None) -> Iterator[PhotoVerdict]:
    """Is this photo me? For each photo, every face's decision (1:N, or 1:1 against `only`).
    `verdicts`: the library index's decisions about faces; a photo whose content is indexed gets
    them applied (verify.identity.decisions), its faces paired with the stored ones by box overlap."""
    from verify.identity.decisions import apply_decisions
    from verify.identity.embed import sha256_file

    for res in pipeline.iter_process([str(p) for p in photos]):
        faces = []
        if res.ok and res.faces:
            matches = matcher(res.embeddings, only=only)
            notes: list[str | None] = [None] * len(matches)
            if verdicts:
                try:
                    sha = sha256_file(res.source)
                except OSError:
                    sha = None
                keys = [verdicts.key_of_box(sha, f.box) if sha else None for f, _ in res.faces]
                per_face = [verdicts.of(*k) if k else None for k in keys]

                def rescore(i: int, name: str) -> "Match | None":
                    return matcher(res.embeddings[i:i + 1], only=name)[0] if name in matcher.pooled else None

                matches, notes = apply_decisions(matches, per_face, rescore, vectors=res.embeddings,
                                                 impostors=verdicts.impostors, top_k=matcher.top_k)
            for (face, _), m, note in zip(res.faces, matches, notes):
                faces.append({"box": [round(float(v), 1) for v in face.box], **m.to_dict(),
                              **({"note": note} if note else {})})
        error = res.error if not res.ok else (None if faces else "no face found")
        yield PhotoVerdict(res.source, faces, error)
