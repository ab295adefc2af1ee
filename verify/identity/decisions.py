"""What a person decided about faces, and the one place where those decisions overrule the matcher.

Decisions live in the library index (index.library, table `decisions`): confirm "face F of photo P
is NAME", reject "is not NAME", ignore "not a face", and undo of any of them. They name a face by the
photo's content hash and face number, never by an embedding, so they outlive a re-scan, a model
change and a renamed folder.

`apply_decisions` is the only code that turns them into answers; every matcher path calls it last:
report rows of `scan` and `find` (verify.scan.rows.RowBuilder, so the HTML pages too), the unknown
faces of `people` (verify.queries.people) and `verify` of a photo that is in the index.
  confirm NAME  the face is NAME's (a match whatever its score); it also joins NAME's gallery from its
                stored landmarks (no detection; the same views, outlier check and recalibration as
                `enroll`), so NAME's other photos are found better too;
  reject NAME   never matched to NAME again; when NAME was its nearest identity it is reported as
                unknown (and may then be grouped by `people`);
  ignore        never matched, never shown as a near miss, never grouped.
A later decision about the same face and name overrides an earlier one (reject after confirm ...).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from index.library import Decision, DecidedFace, FaceRecord, Library, LibraryError, StoredFile, box_iou

from verify.identity.scoring import Match

if TYPE_CHECKING:
    from index import Gallery

    from verify.faces import FacePipeline
    from verify.identity.enroll import EnrollmentResult

log = logging.getLogger(__name__)


@dataclass
class FaceVerdict:
    """The standing decisions about one face, folded in the order they were made."""

    confirmed: str | None = None  # the name it was confirmed as
    confirmed_by: int | None = None  # that decision's id
    rejected: dict[str, int] = field(default_factory=dict)  # name -> decision id
    ignored_by: int | None = None  # "not a face" decision id

    def add(self, d: Decision) -> None:
        if d.kind == "confirm":
            self.confirmed, self.confirmed_by, self.ignored_by = d.name, d.id, None
            self.rejected.pop(d.name, None)
        elif d.kind == "reject":
            self.rejected[d.name] = d.id
            if self.confirmed == d.name:
                self.confirmed = self.confirmed_by = None
        elif d.kind == "ignore":
            self.ignored_by, self.confirmed, self.confirmed_by = d.id, None, None


Key = tuple[str, int]  # (photo content sha256, face number)


class Verdicts:
    """Every standing decision of an index, by face; empty when there is none (then nothing changes).
    `impostors`: per name, the embeddings (n, D) of the present faces rejected as that name (for one
    model; see `apply_decisions`)."""

    def __init__(self, by_key: dict[Key, FaceVerdict], present: dict[Key, list[DecidedFace]],
                 impostors: dict[str, np.ndarray] | None = None) -> None:
        self.by_key = by_key
        self.present = present  # the decided faces the index holds now (a decided face may be gone)
        self.impostors = impostors or {}

    @classmethod
    def load(cls, library: Library, model: str | None = None) -> "Verdicts":
        """The standing decisions, each on the face it is about now (the index resolves it by box
        overlap, so a re-detection that numbers the faces otherwise keeps it on the same face); with
        `model` (a fingerprint), also the known impostors: `model`'s embeddings of the rejected faces."""
        verdicts = cls._load(library)
        if model is not None:
            rejected: dict[str, list[DecidedFace]] = {}
            for key, faces in verdicts.present.items():
                for name in verdicts.by_key[key].rejected:
                    rejected.setdefault(name, []).extend(faces)
            if rejected:
                stored = library.faces(sorted({f.file_id for fs in rejected.values() for f in fs}), model)
                vector_of = {fid: v for ids, _, emb in stored.values() if emb is not None for fid, v in zip(ids, emb)}
                for name, faces in rejected.items():
                    vecs = [vector_of[f.face_id] for f in faces if f.face_id in vector_of]
                    if vecs:
                        verdicts.impostors[name] = np.stack(vecs)  # (n, D)
        return verdicts

    @classmethod
    def _load(cls, library: Library) -> "Verdicts":
        standing = library.decisions(standing_only=True)
        resolved = library.decided_faces() if standing else {}
        by_key: dict[Key, FaceVerdict] = {}
        present: dict[Key, dict[int, DecidedFace]] = {}
        for d in standing:  # in the order made: later decisions override earlier ones
            for f in resolved.get(d.id, []):
                by_key.setdefault((f.sha256, f.face), FaceVerdict()).add(d)
                present.setdefault((f.sha256, f.face), {})[f.face_id] = f
        return cls(by_key, {k: list(v.values()) for k, v in present.items()})

    def __len__(self) -> int:
        return len(self.by_key)

    def of(self, sha256: str | None, face: int) -> FaceVerdict | None:
        return self.by_key.get((sha256, int(face))) if sha256 is not None else None

    def of_face_ids(self) -> dict[int, FaceVerdict]:
        """Present face id -> its verdict."""
        return {f.face_id: self.by_key[key] for key, faces in self.present.items() for f in faces}

    def confirmed_face_ids(self, names: Sequence[str]) -> list[int]:
        """Present faces confirmed as one of `names`."""
        wanted = set(names)
        return [f.face_id for key, faces in self.present.items() if self.by_key[key].confirmed in wanted
                for f in faces]

    def key_of_box(self, sha256: str, box: Sequence[float], min_iou: float = 0.5) -> Key | None:
        """The decided face of photo `sha256` whose stored box overlaps `box` most (IoU >= min_iou):
        a fresh detection (`verify`) numbers faces its own way."""
        best, best_iou = None, min_iou
        for (sha, k), faces in self.present.items():
            if sha == sha256 and (iou := box_iou(faces[0].box, box)) >= best_iou:
                best, best_iou = (sha, k), iou
        return best


def _unknown(m: Match) -> Match:
    return Match(None, math.inf, m.distance_threshold, False, None)


def apply_decisions(matches: Sequence[Match], verdicts: Sequence[FaceVerdict | None],
                    rescore: Callable[[int, str], Match | None] | None = None, *,
                    vectors: np.ndarray | None = None, impostors: dict[str, np.ndarray] | None = None,
                    top_k: int = 3) -> tuple[list[Match], list[str | None]]:
    """The matcher's answer per face, overruled by that face's verdict (None: none): the final
    matches and a note per face saying which decision changed it. `rescore(i, name)`: face i scored
    against `name` alone (a confirmed face whose nearest identity is someone else keeps an honest
    distance); without it such a face gets distance NaN.

    Known impostors (`impostors`: name -> (n, D) embeddings of the faces rejected as that name;
    `vectors`: (F, D) the faces' embeddings): a face matched to NAME that scores higher against the
    faces rejected as NAME than against NAME's own photos (the same top-`top_k` mean of cosine
    similarities on both sides) is not matched; it stays NAME's near miss, for a person to decide.
    Only once at least `top_k` faces were rejected as NAME.
    Parameter-free; on LFW it took out about half of the false matches left after five rejects and
    no true one (docs/review.md)."""
    out: list[Match] = []
    notes: list[str | None] = []
    for i, (m, v) in enumerate(zip(matches, verdicts)):
        if v is None or (v.confirmed is None and v.ignored_by is None and m.identity not in v.rejected):
            # from top_k rejected faces on: one mistaken reject alone never moves another face
            if m.match and impostors and vectors is not None and len(impostors.get(m.identity, ())) >= top_k:
                from verify.identity.scoring import identity_scores

                impostor_similarity = float(identity_scores(vectors[i:i + 1], impostors[m.identity], top_k)[0])
                if impostor_similarity > 1.0 - m.distance:
                    out.append(Match(m.identity, m.distance, m.distance_threshold, False, m.far, m.far_at_least))
                    notes.append(f"looks more like the faces rejected as {m.identity} than like {m.identity}")
                    continue
            out.append(m)
            notes.append(None)
        elif v.ignored_by is not None:
            out.append(_unknown(m))
            notes.append(f"ignored: not a face (decision {v.ignored_by})")
        elif v.confirmed is not None:
            name = v.confirmed
            r = m if m.identity == name else (rescore(i, name) if rescore is not None else None)
            if r is None or r.identity != name:
                r = Match(name, math.nan, m.distance_threshold, True, None)
            out.append(Match(name, r.distance, r.distance_threshold, True, r.far, r.far_at_least))
            notes.append(f"confirmed as {name} (decision {v.confirmed_by})")
        else:  # rejected as its nearest identity
            out.append(_unknown(m))
            notes.append(f"rejected as {m.identity} (decision {v.rejected[m.identity]})")
    if len(out) != len(matches):
        raise ValueError(f"{len(verdicts)} verdicts for {len(matches)} matches")
    return out, notes


# ------------------------------------------------------------------------------------------ deciding


@dataclass
class DecidedAbout:
    """A face of the index a decision is made about."""

    stored: StoredFile
    face: int
    record: FaceRecord

    def known_face(self) -> tuple[str, str, np.ndarray, tuple[float, float, float, float]]:
        """(photo path, content sha256, (5, 2) landmarks, box): what embed_known_faces takes."""
        return self.stored.fs_path, self.stored.sha256, self.record.landmarks, self.record.box


def locate_face(library: Library, path: str | os.PathLike, face: int) -> DecidedAbout:
    """Face `face` of the indexed photo at `path`; ValueError (one line) when the photo is not in the
    index, is gone, or has no such face."""
    from verify.scan.walk import report_text

    text = report_text(os.path.abspath(os.fspath(path)))
    stored = library.files([text]).get(text)
    if stored is None:
        raise ValueError(f"{text}: not in the library index {library.path}; scan its folder first")
    if not stored.present:
        raise ValueError(f"{text}: gone from its folder since the last scan (library index {library.path})")
    n = stored.faces or 0
    if stored.status != "face" or not 0 <= face < n or not stored.sha256:
        raise ValueError(f"{text}: has no face {face} in the library index ({n} face{'s' if n != 1 else ''}: "
                         f"{', '.join(map(str, range(n))) or 'none'})")
    _, recs, _ = library.faces([stored.id])[stored.id]
    return DecidedAbout(stored, face, recs[face])


def locate_face_id(library: Library, face_id: int) -> DecidedAbout:
    """The same for a face id of the index (the review app's)."""
    where = library.face_locations([face_id]).get(int(face_id))
    if where is None:
        raise ValueError(f"{library.path}: no face {face_id} in the library index")
    path, _, k, _, _ = where
    return locate_face(library, path, k)


def record_decision(library: Library, kind: str, faces: Sequence[DecidedAbout], name: str | None,
                    origin: str) -> list[int]:
    """Store one decision per face, all in one transaction; returns their ids."""
    if name is not None and not name.strip():
        raise ValueError("NAME must not be empty")
    return library.add_decisions([(kind, f.stored.sha256, f.face, name, f.stored.path, f.record.box) for f in faces],
                                 origin)


def enroll_faces(gallery: "Gallery", name: str, faces: Sequence[DecidedAbout], pipeline: "FacePipeline", *,
                 n_views: int = 8, target_far: float = 1e-3, top_k: int = 3) -> "EnrollmentResult":
    """Add confirmed faces to `name`'s gallery exactly as `enroll --group` does: aligned from their
    stored landmarks (no detection), augmented views, recalibration, outlier check."""
    from verify.identity.embed import embed_known_faces
    from verify.identity.enroll import enroll_batch

    known = [f.known_face() for f in faces]
    return enroll_batch(gallery, name, lambda done: embed_known_faces(known, pipeline, n_views=n_views,
                                                                      skip_hashes=done),
                        pipeline.embedder, target_far=target_far, top_k=top_k)


def remove_photo(gallery: "Gallery", name: str, sha256: str, embedder) -> int:
    """Take one photo (content hash) out of `name`'s gallery entries (undo of a confirm) and
    recalibrate; returns the vectors removed. The gallery removes by identity, so the others are
    put back under its lock."""
    from verify.identity.enroll import recalibrate

    with gallery.locked():
        if name not in set(gallery.identities()["identity"]):
            return 0
        vecs, meta = gallery.vectors(name)  # (n, D)
        keep = (meta["sha256"] != sha256).to_numpy()
        if keep.all():
            return 0
        info = gallery.identity_info(name)
        gallery.remove_identity(name)
        if keep.any():
            gallery.add(vecs[keep], name, sources=meta["source"][keep].tolist(), sha256s=meta["sha256"][keep].tolist(),
                        views=meta["view"][keep].astype(int).tolist())
            gallery.set_identity_info(name, info)
            recalibrate(gallery, name, embedder, float(info.get("target_far", 1e-3)), int(info.get("top_k", 3)))
        return int((~keep).sum())


def undo(library: Library, decision_id: int, origin: str, gallery: "Gallery | None" = None,
         embedder=None) -> Decision:
    """Undo decision `decision_id` (one transaction); an undone confirm also takes that photo out of
    the person's gallery when `gallery` is given and no other standing confirm keeps it there.
    Returns the decision undone; LibraryError (one line) for an unknown or undone id."""
    target = next((d for d in library.decisions() if d.id == int(decision_id)), None)
    library.undo_decision(decision_id, origin)
    if target is None:  # undo_decision raised for it; not reached
        raise LibraryError(f"{library.path}: no decision {decision_id}")
    if target.kind == "confirm" and gallery is not None and embedder is not None:
        still = [d for d in library.decisions(standing_only=True)
                 if d.kind == "confirm" and d.name == target.name and d.sha256 == target.sha256]
        if not still:
            remove_photo(gallery, target.name, target.sha256, embedder)
    return target


def face_gone(library: Library) -> set[int]:
    """Ids of standing decisions about a face the index no longer holds (deleted photo, re-detected
    with fewer faces): listed by `faceverify decisions`, one line each."""
    present = library.decided_faces()
    return {d.id for d in library.decisions(standing_only=True) if d.id not in present}


__all__ = ["DecidedAbout", "FaceVerdict", "Verdicts", "apply_decisions", "box_iou", "enroll_faces", "face_gone",
           "locate_face", "locate_face_id", "record_decision", "remove_photo", "undo"]
