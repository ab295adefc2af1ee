"""Training data: CelebA's table of images mapped onto a decoded uint8 cache, and its three partitions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..celeba import ATTRIBUTES, load_celeba
from ..config import TrainConfig
from ..geometry import CropGeometry
from .cache import ImageCache
from .dist import Dist

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


def dataset_name(roots: Sequence[str]) -> str:
    """The name caches of these data roots are filed under (their folder names, joined)."""
    return "+".join(Path(r).resolve().name for r in roots)


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
    name = dataset_name(cfg.data.roots)

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
