"""Report rows for a batch of files: analyse what the workers did not, match every face of the batch
in one call, and write one row per face (or one row for a file without faces).

The decisions a person made about faces (verify.identity.decisions) overrule the matcher here, last,
when the builder has `verdicts` (the indexed paths set them). At most one face per photo is matched
to a given identity: a confirmed one, else the closest. Other faces of that photo that also passed
that identity's threshold get match=False, identity empty, and a `note`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, MutableMapping

import numpy as np

from verify.faces import FacePipeline, error_summary

from verify.scan.html import PageOptions, band_of, save_thumbnail
from verify.scan.report import empty_row
from verify.scan.walk import WalkEntry, report_text
from verify.scan.workers import DecodedFile, analyse_decoded

if TYPE_CHECKING:
    from verify.identity.decisions import Verdicts
    from verify.identity.scoring import Match

log = logging.getLogger(__name__)

Matcher = Callable[[np.ndarray], "list[Match]"]  # (F, D) unit embeddings -> one Match per face


def _finite(v: float | None, digits: int) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return round(float(v), digits)


def _one_match_per_identity(rows: list[dict[str, Any]]) -> None:
    """Within one photo keep only the closest face matched to each identity."""
    best: dict[str, dict[str, Any]] = {}

    def rank(row: dict[str, Any]) -> tuple[bool, float]:  # a confirmed face first, then the closest
        confirmed = (row.get("note") or "").startswith("confirmed as ")
        return (not confirmed, math.inf if row["distance"] is None else row["distance"])

    for row in rows:
        if row["match"]:
            cur = best.get(row["identity"])
            if cur is None or rank(row) < rank(cur):
                best[row["identity"]] = row
    for row in rows:
        if row["match"] and best[row["identity"]] is not row:
            winner = best[row["identity"]]
            row["note"] = f"also passed for {row['identity']}, but face {winner['face']} of this photo is closer"
            row["match"] = False
            row["identity"] = None


class RowBuilder:
    """Rows for one batch of files; a failure costs only its file. `pipeline` analyses the images
    the workers only decoded (None when every image arrives analysed)."""

    def __init__(self, pipeline: FacePipeline | None, matcher: Matcher, timers: MutableMapping[str, float],
                 thumbs_dir: Path | None = None, page: PageOptions | None = None) -> None:
        self.pipeline = pipeline
        self.matcher = matcher
        self.timers = timers
        self.thumbs_dir = thumbs_dir  # with scan --html: where the shown faces' thumbnails go
        self.page = page or PageOptions()
        self.verdicts: Verdicts | None = None  # decisions about faces, by (photo sha256, face number)

    def _save_thumbnails(self, file_rows: list[dict[str, Any]], d: DecodedFile) -> None:
        t0 = time.perf_counter()
        for r in file_rows:
            if r["status"] == "face" and d.thumbs and band_of(r, self.page) is not None:
                save_thumbnail(self.thumbs_dir, r["path"], r["face"], d.thumbs[r["face"]])
        self.timers["thumbs"] = self.timers.get("thumbs", 0.0) + time.perf_counter() - t0

    def _match(self, vectors: np.ndarray) -> list["Match"]:
        t0 = time.perf_counter()
        matches = list(self.matcher(vectors))
        self.timers["match"] += time.perf_counter() - t0
        if len(matches) != len(vectors):
            raise RuntimeError(f"matcher returned {len(matches)} results for {len(vectors)} faces")
        return matches

    def _decide(self, batch: list[tuple[WalkEntry, DecodedFile]], owner: list[int], vectors: np.ndarray,
                matches: list["Match | None"]) -> list[str | None]:
        """Overrule matches by the faces' decisions (verify.identity.decisions.apply_decisions); the
        notes per face."""
        from verify.identity.decisions import apply_decisions

        verdicts, face_of = [], {}
        for i in owner:
            k = face_of.get(i, 0)
            face_of[i] = k + 1
            verdicts.append(self.verdicts.of(batch[i][1].sha256, k))
        impostors = self.verdicts.impostors
        if not any(verdicts) and not any(m is not None and m.match and m.identity in impostors for m in matches):
            # nothing decided about these faces, and none matched to a person with known impostors
            return [None] * len(owner)
        idx = [j for j, m in enumerate(matches) if m is not None]

        def rescore(j: int, name: str) -> "Match | None":
            try:
                return self.matcher(vectors[idx[j]][None], only=name)[0]
            except (KeyError, TypeError):  # not enrolled (yet), or a matcher without 1:1
                return None

        decided, notes = apply_decisions([matches[j] for j in idx], [verdicts[j] for j in idx], rescore,
                                         vectors=vectors[idx], impostors=impostors,
                                         top_k=getattr(self.matcher, "top_k", 3))
        all_notes: list[str | None] = [None] * len(owner)
        for j, m, note in zip(idx, decided, notes):
            matches[j], all_notes[j] = m, note
        return all_notes

    def _face_row(self, path: str, k: int, d: DecodedFile, m: "Match") -> dict[str, Any]:
        face = d.faces[k]
        row = empty_row(path, "face")
        row["face"] = k
        row["x1"], row["y1"], row["x2"], row["y2"] = (round(float(v), 2) for v in face.box)
        row["prob"] = _finite(face.prob, 6)
        row["quality"] = _finite(d.quality[k], 4) if d.quality is not None and k < len(d.quality) else None
        md = m.to_dict()
        row.update(identity=md["identity"], nearest=md["nearest"], match=bool(md["match"]),
                   distance=_finite(md["distance"], 6), threshold=_finite(md["threshold"], 6),
                   far=_finite(md["far"], 8) if md["far"] is not None else None,
                   threshold_source=md.get("threshold_source"))
        for key in ("identity", "nearest"):
            if row[key] is not None:
                row[key] = report_text(str(row[key]))
        return row

    def __call__(self, batch: list[tuple[WalkEntry, DecodedFile]]) -> list[list[dict[str, Any]]]:
        """One list of rows per file, in batch order."""
        if self.pipeline is not None:
            analyse_decoded(self.pipeline, [d for _, d in batch], self.timers, thumbnails=self.thumbs_dir is not None)
        rows: list[list[dict[str, Any]]] = [[] for _ in batch]
        vectors: list[np.ndarray] = []
        owner: list[int] = []  # batch index per face
        for i, (entry, d) in enumerate(batch):
            if d.status is not None or d.faces is None or d.embeddings is None:
                rows[i] = [empty_row(entry.path, d.status or "error", d.error or "internal error: not analysed")]
            elif not d.faces:
                rows[i] = [empty_row(entry.path, "no-face", faces=0)]
            else:
                vectors.append(d.embeddings)
                owner.extend([i] * len(d.faces))
        if not vectors:
            return rows
        all_vectors = np.concatenate(vectors)  # (F, D)
        try:
            matches: list[Match | None] = list(self._match(all_vectors))
        except Exception as exc:
            log.warning("matching failed for a batch (%s); retrying file by file", error_summary(exc))
            matches = []
            for i in dict.fromkeys(owner):
                d = batch[i][1]
                try:
                    matches.extend(self._match(d.embeddings))
                except Exception as exc2:
                    rows[i] = [empty_row(batch[i][0].path, "error", f"matching failed ({error_summary(exc2)})")]
                    matches.extend([None] * len(d.faces))
        notes = self._decide(batch, owner, all_vectors, matches) if self.verdicts else [None] * len(owner)
        face_of: dict[int, int] = {}  # batch index -> next face number
        for i, m, note in zip(owner, matches, notes):
            k = face_of.get(i, 0)
            face_of[i] = k + 1
            if m is not None:  # None: its file failed
                rows[i].append(self._face_row(batch[i][0].path, k, batch[i][1], m))
                if note:
                    rows[i][-1]["note"] = note
        for i in dict.fromkeys(owner):
            if not rows[i]:  # never expected; a file must not vanish from the report
                rows[i] = [empty_row(batch[i][0].path, "error", "internal error: no result for this file")]
            face_rows = [r for r in rows[i] if r["status"] == "face"]
            for r in face_rows:
                r["faces"] = len(face_rows)
            _one_match_per_identity(face_rows)
            if self.thumbs_dir is not None:
                self._save_thumbnails(face_rows, batch[i][1])
        return rows
