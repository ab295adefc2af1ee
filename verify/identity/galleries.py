"""The gallery side, torch-free: where galleries live, opening one for a model, and the matcher over it.

Needs no model weights: the gallery stores its model's fingerprint and pair threshold, so the
library commands (`find`, `people`) answer without loading torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from index import Gallery, GalleryError

from verify.identity.scoring import IdentityCalibration, IdentityMatcher, pool_photos

if TYPE_CHECKING:
    from verify.model.file import Embedder


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


def build_matcher(gallery: Gallery, embedder: "Embedder | None" = None, top_k: int = 3) -> IdentityMatcher:
    """Identity scoring over the gallery: FAISS finds candidate identities, then each candidate is
    scored with its pooled photos and its own calibrated threshold. Uncalibrated identities use the
    model's pair threshold (`embedder`'s, or without one the gallery's, stored from the same model)."""
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
