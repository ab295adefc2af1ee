"""Training data: CelebA's table of images mapped onto a decoded uint8 cache, and its three partitions.

Unlabelled roots (faces aligned to the CelebA frame with no identity, `data.unlabelled_roots`) join the
table with identity -1 and partition -1 and the column `unlabelled` set: they are in no partition, so
no identity loss, evaluation or selection ever sees them; stage 2 draws them for distillation only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from verify.data.celeba import ATTRIBUTES, IMAGE_DIR, IMAGE_SUFFIXES, load_celeba
from verify.config import TrainConfig
from verify.model.geometry import CropGeometry
from verify.training.cache import ImageCache
from verify.training.dist import Dist

log = logging.getLogger(__name__)


@dataclass
class FaceData:
    """CelebA table rows mapped onto a decoded uint8 cache (unreadable images already dropped)."""

    table: "object"  # pandas.DataFrame, one row per usable image
    images: np.ndarray  # (N_cache, S, S, 3) uint8, memory-mapped (never loaded whole)
    geometry: CropGeometry
    cache_rows: np.ndarray | None = None  # table row -> cache row; None: the identity

    def batch(self, idx: np.ndarray, device: torch.device) -> torch.Tensor:
        """uint8 (B, 3, S, S) on `device` for table rows `idx`."""
        idx = np.asarray(idx)
        rows = self.cache_rows[idx] if self.cache_rows is not None else idx
        x = torch.from_numpy(np.ascontiguousarray(self.images[rows]))  # (B,S,S,3), a copy
        return x.permute(0, 3, 1, 2).to(device, non_blocking=True)

    def rows(self, partition: int) -> np.ndarray:
        return np.flatnonzero(self.table["partition"].to_numpy() == partition)

    def unlabelled_rows(self) -> np.ndarray:
        """Table rows of the unlabelled roots (no identity, no partition)."""
        if "unlabelled" not in self.table:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.table["unlabelled"].to_numpy())

    def attributes(self) -> np.ndarray | None:
        """(N, 40) float32 attribute targets of every table row, or None without annotations."""
        if ATTRIBUTES[0] not in self.table:
            return None
        return self.table[list(ATTRIBUTES)].to_numpy().astype(np.float32)


@dataclass(frozen=True)
class Splits:
    """Table rows of CelebA's partitions 0 (train), 1 (validation) and 2 (test)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_rows(data: FaceData, roots: Sequence[str]) -> Splits:
    """The three partitions; an empty one is an error (naming `roots`), since every stage needs all three."""
    splits = Splits(data.rows(0), data.rows(1), data.rows(2))
    for name, rows in (("train", splits.train), ("validation", splits.val), ("test", splits.test)):
        if len(rows) == 0:
            raise ValueError(f"partition for {name} is empty in {', '.join(roots)}")
    log.info("images: %d train, %d val, %d test", len(splits.train), len(splits.val), len(splits.test))
    return splits


def dataset_name(roots: Sequence[str], unlabelled_roots: Sequence[str] = ()) -> str:
    """The name caches of these data roots are filed under (their folder names, joined)."""
    name = "+".join(Path(r).resolve().name for r in roots)
    return name + "".join(f"+u-{Path(r).resolve().name}" for r in unlabelled_roots)


def load_unlabelled(roots: Sequence[str]):
    """One table row per image of each unlabelled root (its `img_align_celeba/`, else the folder itself):
    image (root folder name/file name, so two roots never collide), path, root, identity -1,
    partition -1, unlabelled True. Sorted by root, then name."""
    import pandas as pd

    frames = []
    for r in roots:
        root = Path(r).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"unlabelled root {root} does not exist or is not a folder")
        folder = root / IMAGE_DIR if (root / IMAGE_DIR).is_dir() else root
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"unlabelled root {root}: no images in {folder}")
        log.info("%s: %d unlabelled images (distillation only)", root, len(names))
        frames.append(pd.DataFrame({"image": [f"{root.name}/{n}" for n in names],
                                    "path": [str(folder / n) for n in names], "root": str(root),
                                    "identity": np.int64(-1), "partition": np.int64(-1), "unlabelled": True}))
    return pd.concat(frames, ignore_index=True)


def subset(table, n: int):
    """A deterministic subset of about `n` images that keeps every partition (in proportion) and
    whole identities (so a small run still has positives for triplets and held-out identities)."""
    keep = []
    for part, g in table.groupby("partition", sort=True):
        budget = max(1, round(n * len(g) / len(table)))
        order = g.groupby("identity", sort=False)["image"].min().sort_values().index  # identities by first image
        taken = 0
        for ident in order:
            rows = g.index[g["identity"].to_numpy() == ident]
            keep.extend(rows)
            taken += len(rows)
            if taken >= budget:
                break
    return table.loc[sorted(keep)].reset_index(drop=True)


def prepare_data(cfg: TrainConfig, dist: Dist) -> FaceData:
    """CelebA from `cfg.data.roots` (a subset with `data.max_images`), decoded once into the cache."""
    geometry = CropGeometry(cfg.data.size, cfg.data.box)
    celeba = load_celeba(
        list(cfg.data.roots), need_attributes=cfg.task == "attributes" or cfg.identity.aux_attr_weight > 0
    )
    table = subset(celeba.table, cfg.data.max_images) if cfg.data.max_images else celeba.table
    if cfg.data.unlabelled_roots:
        import pandas as pd

        extra = load_unlabelled(cfg.data.unlabelled_roots)
        if cfg.data.max_images:  # the same fraction of them as of the labelled images
            extra = extra.iloc[: max(1, round(len(extra) * len(table) / len(celeba.table)))]
        table = pd.concat([table.assign(unlabelled=False), extra], ignore_index=True)
    name = dataset_name(cfg.data.roots, cfg.data.unlabelled_roots)

    def build() -> ImageCache:
        return ImageCache.build_or_load(
            table["path"].tolist(), geometry, cfg.data.cache_dir, name=name, workers=cfg.data.cache_workers
        )

    # Rank 0 decodes; the others wait, then map the finished file.
    if dist.main:
        cache = build()
    dist.barrier()
    if not dist.main:
        cache = build()
    ok = np.asarray(cache.ok, dtype=bool)
    if not ok.all():
        log.warning("%d of %d images could not be decoded and are skipped", int((~ok).sum()), len(ok))
    keep = np.flatnonzero(ok)
    return FaceData(table.iloc[keep].reset_index(drop=True), cache.images, geometry,
                    None if ok.all() else keep)
