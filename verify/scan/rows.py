"""Report rows for a batch of files: analyse what the workers did not, match every face of the batch
in one call, and write one row per face (or one row for a file without faces).

At most one face per photo is matched to a given identity: the closest one. Other faces of that photo
that also passed that identity's threshold get match=False, identity empty, and a `note`.
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
    for row in rows:
        if row["match"]:
            cur = best.get(row["identity"])
            if cur is None or row["distance"] < cur["distance"]:
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

    def _face_row(self, path: str, k: int, d: DecodedFile, m: "Match") -> dict[str, Any]:
        face = d.faces[k]
        row = empty_row(path, "face")
        row["face"] = k
        row["x1"], row["y1"], row["x2"], row["y2"] = (round(float(v), 2) for v in face.box)
        row["prob"] = _finite(face.prob, 6)
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
        try:
            matches: list[Match | None] = list(self._match(np.concatenate(vectors)))
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
        face_of: dict[int, int] = {}  # batch index -> next face number
        for i, m in zip(owner, matches):
            k = face_of.get(i, 0)
            face_of[i] = k + 1
            if m is not None:  # None: its file failed
                rows[i].append(self._face_row(batch[i][0].path, k, batch[i][1], m))
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
