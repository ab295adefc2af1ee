"""`faceverify find`: which indexed faces are the enrolled people's, answered from the library index
without reading a photo. With verify.queries.people, the joint of `verify` (model, matcher) and
`index` (library index, gallery).

`faceverify scan` fills the index (verify.scan.indexed); everything here reads it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from index import Gallery
from index.library import Library, LibraryError

from verify.identity.galleries import build_matcher, data_home
from verify.scan.html import PageOptions, files_dir, write_html
from verify.scan.indexed import find_rows, unindexed
from verify.scan.report import ScanSummary, count_rows, write_report

if TYPE_CHECKING:  # torch stays out of find and people: the gallery names its model
    from index.facesearch import FaceSearch

    from verify.identity.scoring import IdentityMatcher

log = logging.getLogger(__name__)


def default_library() -> Path:
    """The library index beside the default gallery: `data_home()/library.db`."""
    return data_home() / "library.db"


def open_library(path: Path | None, *, readonly: bool = False, create: bool = False) -> Library:
    """The index at `path` (default `default_library()`); LibraryError (one line) when there is none
    (unless `create`), it is not ours, or is newer than this faceverify."""
    return Library.open(path or default_library(), create=create, readonly=readonly)


def require_embedded(library: Library, model: str) -> None:
    """LibraryError unless the index holds faces embedded by `model` (a fingerprint)."""
    if library.model_dim(model) is None:
        stored = ", ".join(library.models()) or "none"
        raise LibraryError(f"{library.path}: no face of the index is embedded with model {model} "
                           f"(index models: {stored}); run faceverify scan FOLDER --model ... to re-embed its stored "
                           "faces (no detection)")


@dataclass
class FindResult:
    summary: ScanSummary
    rows: int
    not_embedded: int  # files whose faces this model has not embedded yet (error rows)
    seconds: float = 0.0
    library_checks: list = field(default_factory=list)  # verify.queries.library_check.LibraryCheck per person


def find(library: Library, gallery: Gallery, *, names: Sequence[str] = (),
         out: str | os.PathLike | None = None, html: str | os.PathLike | None = None,
         page: PageOptions | None = None, under: Sequence[str] | None = None,
         library_threshold: str = "check") -> FindResult:
    """The scan report from the index: every present file (or under `under`), matched against the
    gallery (with the embeddings of the gallery's model); with `names`, only the faces matched to one
    of them. Writes `out` and/or the page `html`. `library_threshold`: "check" reports each person's
    library estimate (FindResult.library_checks), "stricter" also applies the stricter ones
    (verify.queries.library_check)."""
    t0 = time.perf_counter()
    require_embedded(library, gallery.fingerprint)
    known = set(gallery.identities()["identity"])
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not enrolled in {gallery.path}")
    html_path = Path(html).absolute() if html is not None else None
    thumbs_dir = files_dir(html_path) if html_path is not None else None
    from verify.identity.decisions import Verdicts

    from verify.queries.library_check import LIBRARY_RULES, apply_stricter, library_checks

    if library_threshold not in LIBRARY_RULES:
        raise ValueError(f"unknown library threshold rule {library_threshold!r} (known: {', '.join(LIBRARY_RULES)})")
    matcher = build_matcher(gallery)
    checks = library_checks(library, gallery.fingerprint, matcher, list(names) or None)
    if library_threshold == "stricter":
        matcher = apply_stricter(matcher, checks)
    verdicts = Verdicts.load(library, gallery.fingerprint)  # applied in the rows
    candidates = None
    if names:
        # faces confirmed as one of them are theirs whatever their score
        candidates = np.union1d(candidate_faces(library, gallery.fingerprint, matcher, names),
                                np.asarray(verdicts.confirmed_face_ids(names), np.int64))
    rows = find_rows(library, gallery.fingerprint, matcher, under=under, thumbs_dir=thumbs_dir, page=page,
                     only_faces=candidates, verdicts=verdicts)
    missing = unindexed(rows)
    if names:
        wanted = set(names)
        rows = [r for r in rows if r["match"] and r["identity"] in wanted]
    summary = ScanSummary(report=Path(out).absolute() if out is not None else Path("-"))
    rows = list(count_rows(summary, rows))
    if out is not None:
        write_report(rows, out)
    if html_path is not None:
        write_html(rows, html_path, options=page, source=str(library.path))
    return FindResult(summary, len(rows), missing, time.perf_counter() - t0, checks)


def search_cache_path(library: Library, model: str) -> Path:
    """Where the IVF search index over `model`'s library faces is kept: beside the database."""
    return library.path.with_name(f"{library.path.name}.faces-{model}.fsidx")


def library_search(library: Library, model: str, kind: str = "auto") -> "FaceSearch":
    """A FAISS search index over the present library faces of `model` (index.facesearch: flat up to
    IVF_MIN_FACES faces, IVF-Flat beyond, IVF-PQ from IVFPQ_MIN_FACES). An IVF index is kept on disk beside the database, keyed by the
    model and the index's generation, and rebuilt when the library changed; a flat one is built each
    time (building it is copying the vectors, cheaper than reading a saved copy)."""
    from index.facesearch import FaceSearch, FaceSearchError, choose_kind

    key = f"{model}:{library.generation()}"
    cache = search_cache_path(library, model)
    if kind != "flat" and cache.is_file():  # only IVF indexes are kept
        try:
            if FaceSearch.read_key(cache) == key:
                return FaceSearch.load(cache, expected_key=key)
        except FaceSearchError as e:
            log.warning("%s; rebuilding it", e)
    face_ids, vectors = library.embeddings(model)  # (N,), (N, D)
    chosen = choose_kind(len(face_ids)) if kind == "auto" else kind
    search = FaceSearch.build(vectors, face_ids, kind=chosen, key=key)
    if chosen != "flat":
        try:
            search.save(cache)
        except OSError as e:  # a read-only disk: answer anyway, build again next time
            log.warning("%s: cannot keep the face search index (%s)", cache, e.strerror or e)
    return search


PQ_MARGIN_SDS = 4.0  # an IVF-PQ range search is widened by this many sds of its similarity error
PQ_MARGIN_FALLBACK = 0.15  # no error measured in the index header (4 x the ~0.036 sd measured at 1e7)


def approximate_margin(search: "FaceSearch") -> float:
    """How far below a bound to search so that an index with estimated similarities (IVF-PQ) finds
    the faces at or above it as an exact search of its probed cells would (measured: range recall
    0.88 -> 0.996 on clustered faces); 0 for exact vectors. The matcher then decides on the stored
    float32 embeddings, so the answer stays exact for the faces found."""
    if search.kind != "ivfpq":
        return 0.0
    err = (search.header.calibration or {}).get("similarity_error") or {}
    if not err.get("sd"):
        return PQ_MARGIN_FALLBACK
    return max(0.0, -float(err.get("mean", 0.0))) + PQ_MARGIN_SDS * float(err["sd"])  # under-estimates widen it


def candidate_faces(library: Library, model: str, matcher: "IdentityMatcher", names: Sequence[str],
                    widen: float = 0.0) -> np.ndarray:
    """Face ids of the library that can match one of `names`: a face is accepted for a person when
    the mean of its top-k similarities to the person's pooled photos reaches the person's threshold,
    so at least one of those similarities does. One range search per person over the library's
    faces finds that superset (an IVF index: the part in its probed cells, calibrated to 0.99 of the
    pairs); the matcher then decides on it alone, as it would on every face. `widen` (a similarity)
    lowers the bound further, for near misses (the review app shows them)."""
    search = library_search(library, model)
    margin = approximate_margin(search)
    found = [np.zeros(0, np.int64)]
    for name in names:
        pooled = np.asarray(matcher.pooled[name], np.float32)  # (m, D)
        _, ids, _ = search.range_search(pooled, matcher.similarity_threshold_of(name) - widen - margin)
        found.append(ids)
    return np.unique(np.concatenate(found))
