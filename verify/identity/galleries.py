"""The gallery side, torch-free: where galleries live, opening one for a model, and the matcher over it.

Needs no model weights: the gallery stores its model's fingerprint and pair threshold, so the
library commands (`find`, `people`) answer without loading torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from index import Gallery, GalleryError

from verify.identity.scoring import PROMISES, RULE_HARDEST_SOURCE, RULE_POOLED, IdentityCalibration, IdentityMatcher, calibrate_identity, pool_photos

if TYPE_CHECKING:
    from verify.model.file import Embedder

log = logging.getLogger(__name__)


def data_home() -> Path:
    """Per-user data folder: $FACEVERIFY_HOME, else $XDG_DATA_HOME/faceverify (~/.local/share/faceverify)."""
    home = os.environ.get("FACEVERIFY_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "faceverify"


def default_gallery() -> Path:
    """The gallery in the per-user data folder (`data_home()/gallery`)."""
    return data_home() / "gallery"


def open_gallery(path: Path | None, embedder: "Embedder | None", create: bool = False) -> Gallery:
    """The gallery at `path` (default: `default_gallery()`); `create` makes it for this model.
    Raises GalleryError (one line) when there is none yet or it belongs to another model."""
    path = path or default_gallery()
    if create:
        return Gallery.open_or_create(path, embedder.dim, embedder.fingerprint,
                                      threshold=embedder.similarity_threshold)
    if not (path / "manifest.json").exists():
        raise GalleryError(f"{path}: no gallery here yet; enroll someone first (faceverify enroll NAME PHOTOS...)")
    return Gallery.open(path, fingerprint=embedder.fingerprint if embedder else None)


def calibrate_from_gallery(gallery: Gallery, name: str, embedder: "Embedder", target_far: float = 1e-3,
                           top_k: int = 3, promise: str = "every-source") -> dict:
    """`name`'s calibration from the vectors the gallery holds (no photo is read) on the model's impostor
    cohort, per source where the model ships cohort labels (verify.identity.scoring); stored in the
    gallery. Without a cohort the model's threshold applies. `promise`: see scoring.PROMISES."""
    if promise not in PROMISES:
        raise ValueError(f"unknown promise {promise!r} (known: {', '.join(PROMISES)})")
    vecs, meta = gallery.vectors(name)
    _, pooled = pool_photos(vecs, meta["sha256"].to_numpy())
    cohort = embedder.cohort
    if cohort is None:
        info = {"threshold": embedder.similarity_threshold, "calibrated": False, "photos": int(len(pooled)),
                "threshold_source": "model"}
    else:
        cal = calibrate_identity(pooled, cohort, target_far=target_far, top_k=top_k, sources=embedder.cohort_sources,
                                 same_person_similarity=embedder.similarity_threshold, **PROMISES[promise])
        info = {**cal.to_dict(), "calibrated": True, "photos": int(len(pooled)), "promise": promise}
    gallery.set_identity_info(name, info)
    return info


def _has_cohort_labels(embedder: "Embedder") -> bool:
    """The model ships cohort labels (checked by file first: decoding the cohort costs verify ~0.1 s)."""
    from verify.model.cohort import sources_path

    path = getattr(embedder, "path", None)
    return path is not None and sources_path(path).is_file() and embedder.cohort_sources is not None


def stale_identities(gallery: Gallery, embedder: "Embedder | None" = None) -> list[str]:
    """Identities whose stored calibration an older rule made: none stored (galleries enrolled before
    issue 28), or the pooled cohort while this model ships cohort labels (hardest-source applies).
    Scoring them with it would break the promise silently. With `embedder`, also those stored without
    the cohort curve the library check reads (recalibrating them keeps their threshold)."""
    out, labelled = [], None
    for name in gallery.identities()["identity"]:
        info = gallery.identity_info(name)
        if not info.get("calibrated"):
            continue
        rule = info.get("rule")
        if rule == RULE_POOLED and embedder is not None:
            if labelled is None:
                labelled = _has_cohort_labels(embedder)
            if labelled:
                out.append(str(name))
        elif rule != RULE_HARDEST_SOURCE and rule != RULE_POOLED:
            out.append(str(name))
        elif embedder is not None and not info.get("curve"):
            # calibrated before the library check kept the cohort's curve: the same threshold, with it
            out.append(str(name))
    return out


def recalibrate_stale(gallery: Gallery, embedder: "Embedder") -> list[str]:
    """Recalibrate every stale identity from its stored vectors (no photo read), at its stored target FAR
    and top-k, under the gallery's lock. Returns their names."""
    with gallery.locked():
        names = stale_identities(gallery, embedder)
        for name in names:
            info = gallery.identity_info(name)
            new = calibrate_from_gallery(gallery, name, embedder, float(info.get("target_far", 1e-3)),
                                         int(info.get("top_k", 3)), str(info.get("promise", "every-source")))
            log.info("%s: %s recalibrated (rule %s): threshold %.4f -> %.4f (%s)", gallery.path, name, new.get("rule"),
                     float(info["threshold"]), float(new["threshold"]), new.get("threshold_source"))
    return names


def build_matcher(gallery: Gallery, embedder: "Embedder | None" = None, top_k: int = 3) -> IdentityMatcher:
    """Identity scoring over the gallery: FAISS finds candidate identities, then each candidate is
    scored with its pooled photos and its own calibrated threshold. Uncalibrated identities use the
    model's pair threshold (`embedder`'s, or without one the gallery's, stored from the same model).

    A calibration stored by an older rule is recalibrated first when `embedder` is given (its vectors
    are in the gallery: no photo is read); without one (find, people: torch-free) the gallery is
    refused in one line that says how to recalibrate it. One decision everywhere: verify, scan and find
    all score with the thresholds stored here."""
    stale = stale_identities(gallery, embedder)
    if stale and embedder is not None:
        recalibrate_stale(gallery, embedder)
    elif stale:
        raise GalleryError(f"{gallery.path}: {len(stale)} identities ({', '.join(stale[:3])}) hold thresholds of an "
                           "older calibration rule; run faceverify gallery recalibrate (reads no photo) first")
    vecs, meta = gallery.vectors()
    pooled, cals = {}, {}
    for name, rows in meta.groupby("identity").indices.items():
        _, pooled[name] = pool_photos(vecs[rows], meta["sha256"].to_numpy()[rows])
        info = gallery.identity_info(name)
        if info.get("calibrated"):
            cals[name] = IdentityCalibration.from_dict(info)

    def candidates(q: np.ndarray) -> list[list[str]]:
        res = gallery.search(q, k=min(len(gallery), 64))
        return [[n for n in row if n is not None] for row in res.identities.tolist()]

    default = embedder.similarity_threshold if embedder is not None else gallery.threshold
    if default is None:
        raise GalleryError(f"{gallery.path}: the gallery stores no model threshold; pass the model")
    return IdentityMatcher(pooled, cals, default, top_k=top_k,
                           candidates=candidates if len(pooled) > 8 else None)


def nobody_matcher(embedder: "Embedder") -> IdentityMatcher:
    """The matcher of an empty gallery: every face is unknown (a scan before anyone is enrolled)."""
    return IdentityMatcher({}, {}, embedder.similarity_threshold)
