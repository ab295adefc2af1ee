"""A teacher for the identity stage: its vectors for K augmented views of every training image,
computed once (the losses that pull the student towards them are in verify.training.losses).

Teacher and student see the same augmented pixels: each view's augmentation parameters (flip,
rotation, zoom, shift, brightness, contrast) are drawn once and stored with the teacher's vector;
a training step picks a view per image and applies *those* parameters to the student's crop (the
same box of the CelebA frame at the student's size; `BatchAugment` works in normalised
coordinates, so one draw means the same warp at 150 and at 96 px). View 0 is the image unaugmented.

The teacher's vectors are centred before they teach: dlib's sit in a narrow cone (random CelebA
pairs have cosine ~0.84), so an angular loss on raw vectors teaches mostly their common mean.
`TeacherTargets.batch` subtracts the mean of the training images' view-0 vectors and renormalises.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from verify.atomic import atomic_path
from verify.training.augment import AugmentParams, BatchAugment
from verify.config import TrainConfig
from verify.model.geometry import CropGeometry
from verify.model.file import Embedder
from verify.training.cache import ImageCache
from verify.training.data import FaceData, dataset_name
from verify.training.dist import Dist

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_PARAM_FIELDS = ("flip", "angle", "scale", "shift_x", "shift_y", "brightness", "contrast")


def params_to_array(p: AugmentParams) -> np.ndarray:
    """AugmentParams of B images -> (B, 7) float32 (flip as 0/1)."""
    return torch.stack([p.flip.float(), p.angle, p.scale, p.shift[:, 0], p.shift[:, 1], p.brightness, p.contrast],
                       dim=1).numpy().astype(np.float32)


def params_from_array(a: np.ndarray) -> AugmentParams:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # (B, 7)
    return AugmentParams(flip=t[:, 0] > 0.5, angle=t[:, 1], scale=t[:, 2], shift=t[:, 3:5].contiguous(),
                         brightness=t[:, 5], contrast=t[:, 6])


def identity_params(n: int) -> np.ndarray:
    """(n, 7) parameters that leave an image unchanged."""
    a = np.zeros((n, 7), np.float32)
    a[:, 2] = a[:, 5] = a[:, 6] = 1.0
    return a


@dataclass
class TeacherTargets:
    """Teacher vectors for `views` views of the table rows `rows` (usually the training rows)."""

    vectors: np.ndarray  # (N, K, D) float16, unit teacher vectors, not centred
    params: np.ndarray  # (N, K, 7) float32 augmentation parameters of each view
    rows: np.ndarray  # (N,) table rows covered
    mean: np.ndarray  # (D,) float32 mean of the view-0 vectors: what centring subtracts
    teacher: str  # teacher fingerprint
    center: bool = True

    def __post_init__(self) -> None:
        self._slot = np.full(int(self.rows.max()) + 1 if len(self.rows) else 0, -1, dtype=np.int64)
        self._slot[self.rows] = np.arange(len(self.rows))

    @property
    def views(self) -> int:
        return int(self.vectors.shape[1])

    def slots(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        bad = (idx >= len(self._slot)) | (self._slot[np.minimum(idx, max(len(self._slot) - 1, 0))] < 0)
        if bad.any():
            raise KeyError(f"no teacher vectors for table rows {idx[bad][:5].tolist()}")
        return self._slot[idx]

    def batch(self, idx: np.ndarray, generator: torch.Generator | None, device: torch.device
              ) -> tuple[AugmentParams, torch.Tensor]:
        """A random view per row: its augmentation parameters and the teacher's (centred) unit vector."""
        s = self.slots(idx)
        v = torch.randint(self.views, (len(s),), generator=generator).numpy()
        params = params_from_array(self.params[s, v])
        t = torch.from_numpy(self.vectors[s, v].astype(np.float32))  # (B, D)
        if self.center:
            t = t - torch.from_numpy(self.mean)
        return params, F.normalize(t, dim=1).to(device)

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, vectors=self.vectors, params=self.params, rows=self.rows, mean=self.mean,
                 meta=np.frombuffer(json.dumps({"format_version": FORMAT_VERSION, "teacher": self.teacher}).encode(),
                                    dtype=np.uint8))
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: Path, center: bool = True) -> "TeacherTargets":
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: teacher targets of format {meta.get('format_version')}, expected {FORMAT_VERSION}")
            return cls(z["vectors"], z["params"], z["rows"], z["mean"], meta["teacher"], center)


@torch.no_grad()
def compute_teacher_targets(
    teacher: nn.Module,
    images: np.ndarray,
    rows: np.ndarray,
    augment: BatchAugment,
    views: int,
    seed: int,
    device: torch.device,
    teacher_id: str = "",
    batch_size: int = 64,
    progress: bool = True,
) -> TeacherTargets:
    """Run `teacher` ([-1, 1] input at the size of `images`, (B, D) output) on `views` views of each of
    `rows` of `images` ((N_cache, S, S, 3) uint8; `rows` index it). View 0 is unaugmented."""
    from tqdm.auto import tqdm

    if views < 1:
        raise ValueError(f"identity.teacher_views must be >= 1, got {views}")
    rows = np.asarray(rows)
    n = len(rows)
    gen = torch.Generator().manual_seed(seed)
    params = params_to_array(augment.sample(n * views, gen)).reshape(n, views, 7)
    params[:, 0] = identity_params(n)
    teacher.eval().to(device)
    out: np.ndarray | None = None
    per = max(1, batch_size // views)
    bar = tqdm(range(0, n, per), desc="teacher views", disable=not progress, unit="batch", leave=False)
    for s in bar:
        chunk = rows[s : s + per]
        x = torch.from_numpy(np.ascontiguousarray(images[chunk])).permute(0, 3, 1, 2)  # (b,3,S,S) uint8
        x = x.repeat_interleave(views, dim=0).to(device)  # (b*K,3,S,S)
        p = params_from_array(params[s : s + len(chunk)].reshape(-1, 7))
        y = teacher(augment(x, params=p)).float()  # (b*K, D)
        y = F.normalize(y, dim=1).cpu().numpy().reshape(len(chunk), views, -1)
        if not np.isfinite(y).all():
            bad = chunk[~np.isfinite(y).all(axis=(1, 2))]
            raise ValueError(f"teacher {teacher_id or ''} gave non-finite vectors for table rows {bad[:5].tolist()}")
        if out is None:
            out = np.zeros((n, views, y.shape[-1]), np.float16)
        out[s : s + len(chunk)] = y
    assert out is not None
    mean = out[:, 0].astype(np.float32).mean(0)
    return TeacherTargets(out, params, rows, mean, teacher_id)


def targets_key(teacher_fingerprint: str, data_name: str, box, size: int, n_rows: int, views: int,
                augment: BatchAugment, seed: int) -> str:
    blob = json.dumps([teacher_fingerprint, data_name, [float(v) for v in box], size, n_rows, views,
                       augment.extra_repr(), seed, FORMAT_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_teacher(cfg: TrainConfig, data: FaceData, rows: np.ndarray, device: torch.device, dist: Dist,
                    progress: bool = True) -> TeacherTargets:
    """The teacher's vectors for `cfg.identity.teacher_views` views of `rows`, computed once and cached
    (keyed by teacher, data, crop box, views, augmentation and seed). The teacher sees the same box of
    each image as the student, at its own input size."""
    ic = cfg.identity
    teacher = Embedder.load(ic.teacher, device=device)
    tgeo = CropGeometry(teacher.geometry.size, cfg.data.box)
    if tuple(teacher.geometry.box) != tuple(cfg.data.box):
        log.warning("teacher %s was made for the crop box %s, the data uses %s: it sees a different crop",
                    ic.teacher, teacher.geometry.box, cfg.data.box)
    if teacher.dim != cfg.model.embedding_dim:
        raise ValueError(f"identity.teacher {ic.teacher} gives {teacher.dim}-d vectors, the student "
                         f"{cfg.model.embedding_dim}-d (set model.embedding_dim to match)")
    name = dataset_name(cfg.data.roots, cfg.data.unlabelled_roots)
    augment = BatchAugment.from_config(cfg.augment)
    key = targets_key(teacher.fingerprint, name, cfg.data.box, tgeo.size, len(rows), ic.teacher_views, augment, cfg.seed)
    path = Path(cfg.data.cache_dir) / f"teacher-{name}-{key}.npz"
    if dist.main and not path.exists():
        cache = ImageCache.build_or_load(data.table["path"].tolist(), tgeo, cfg.data.cache_dir, name=name,
                                         workers=cfg.data.cache_workers)
        if not np.asarray(cache.ok, dtype=bool).all():
            raise ValueError("an image the student cache decoded failed in the teacher's cache")
        log.info("teacher %s: embedding %d views of %d images", ic.teacher, ic.teacher_views, len(rows))
        targets = compute_teacher_targets(teacher.net, cache.images, rows, augment.to(device), ic.teacher_views,
                                          cfg.seed, device, teacher.fingerprint, progress=progress)
        targets.save(path)
    dist.barrier()
    targets = TeacherTargets.load(path, center=ic.teacher_center)
    if targets.teacher != teacher.fingerprint:  # pragma: no cover - the key holds the fingerprint
        raise ValueError(f"{path}: made with teacher {targets.teacher}, not {teacher.fingerprint}")
    log.info("teacher targets %s: %d images x %d views", path.name, len(targets.rows), targets.views)
    return targets
