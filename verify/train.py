"""Training as plain functions: `train_one_epoch`, `evaluate_attributes`, `evaluate_identity`, `fit`.

One loop serves both stages: stage 1 (`task: attributes`) learns CelebA's 40 attributes with
BCE-with-logits; stage 2 (`task: identity`) learns an L2-normalised embedding from P x K batches with
an online-mined triplet loss (plus an optional CosFace identity-classification loss). The same code
runs on CPU, one GPU, or several GPUs under `torchrun` (DistributedDataParallel): only the config
and the launcher change.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from .augment import BatchAugment, to_float
from .backbones import Backbone, backbone_from_config, count_parameters
from .cache import ImageCache
from .celeba import ATTRIBUTES, load_celeba
from .config import TrainConfig, save_config
from .geometry import CropGeometry
from .losses import cosine_distill_loss, relational_distill_loss
from .runtime import atomic_path, atomic_write_text, resolve_device, seed_everything

if TYPE_CHECKING:
    from .distill import TeacherTargets

log = logging.getLogger(__name__)

CKPT_LAST = "ckpt_last.pt"
CKPT_BEST = "ckpt_best.pt"


class TrainingDiverged(RuntimeError):
    """Raised when a loss or gradient is NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class Hooks:
    """Test seams: `before_step(step, x)` may edit the batch tensor in place (e.g. inject a NaN)."""

    before_step: Callable[[int, torch.Tensor], None] | None = None
    after_epoch: Callable[[int, dict], None] | None = None


# --------------------------------------------------------------------------------------------------
# distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


# --------------------------------------------------------------------------------------------------
# data


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
    geometry = CropGeometry(cfg.data.size, cfg.data.box)
    celeba = load_celeba(
        list(cfg.data.roots), need_attributes=cfg.task == "attributes" or cfg.identity.aux_attr_weight > 0
    )
    table = subset(celeba.table, cfg.data.max_images) if cfg.data.max_images else celeba.table
    name = "+".join(Path(r).resolve().name for r in cfg.data.roots)

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


# --------------------------------------------------------------------------------------------------
# models for the two tasks


def prepare_teacher(cfg: TrainConfig, data: FaceData, rows: np.ndarray, device: torch.device, dist: Dist,
                    progress: bool = True) -> "TeacherTargets":
    """The teacher's vectors for `cfg.identity.teacher_views` views of `rows`, computed once and cached
    (keyed by teacher, data, crop box, views, augmentation and seed). The teacher sees the same box of
    each image as the student, at its own input size."""
    from .distill import TeacherTargets, compute_teacher_targets, targets_key
    from .model_file import Embedder

    ic = cfg.identity
    teacher = Embedder.load(ic.teacher, device=device)
    tgeo = CropGeometry(teacher.geometry.size, cfg.data.box)
    if tuple(teacher.geometry.box) != tuple(cfg.data.box):
        log.warning("teacher %s was made for the crop box %s, the data uses %s: it sees a different crop",
                    ic.teacher, teacher.geometry.box, cfg.data.box)
    if teacher.dim != cfg.model.embedding_dim:
        raise ValueError(f"identity.teacher {ic.teacher} gives {teacher.dim}-d vectors, the student "
                         f"{cfg.model.embedding_dim}-d (set model.embedding_dim to match)")
    name = "+".join(Path(r).resolve().name for r in cfg.data.roots)
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


def load_backbone_init(path: str | Path, model: Backbone) -> dict:
    """Load a stage-1 backbone (run folder or checkpoint) into `model`, dropping its head."""
    p = Path(path)
    if p.is_dir():
        p = p / CKPT_BEST if (p / CKPT_BEST).exists() else p / CKPT_LAST
    if not p.exists():
        raise FileNotFoundError(f"{p}: no stage-1 checkpoint found to initialise from")
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(
            f"{p}: backbone does not match the configured model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "use the same model section as the stage-1 run"
        )
    log.info("initialised backbone from %s (%d tensors, head dropped)", p, len(state))
    return {"init": str(p), "init_config": ckpt.get("config")}


class IdentityModule(nn.Module):
    """Embedding network plus the losses that own parameters, so DDP sees every trainable tensor."""

    def __init__(self, net: Backbone, num_classes: int, cfg: TrainConfig) -> None:
        super().__init__()
        from .losses import CosFaceLoss, TripletMarginLoss
        from .miners import BatchHardMiner, SemiHardMiner

        ic = cfg.identity
        self.net = net
        self.cls = CosFaceLoss(cfg.model.embedding_dim, num_classes, ic.cls_scale, ic.cls_margin) if ic.cls_weight > 0 else None
        self.attr = nn.Linear(net.num_features, len(ATTRIBUTES)) if ic.aux_attr_weight > 0 else None
        if ic.miner == "batch-hard":
            self.miner = BatchHardMiner()
        elif ic.miner == "semi-hard":
            self.miner = SemiHardMiner(ic.margin)
        else:
            raise ValueError(f"unknown miner {ic.miner!r}: batch-hard | semi-hard")
        self.triplet = TripletMarginLoss(ic.margin, reduction="mean")
        self.ic = ic

    def forward(self, x: torch.Tensor, labels: torch.Tensor, attrs: torch.Tensor | None = None,
                teacher: torch.Tensor | None = None):
        """`teacher`: (B, D) unit teacher vectors of the same augmented images, or None."""
        feats = self.net.forward_features(x)  # (B, F)
        emb = self.net.forward_head(feats)  # (B, D), unit norm
        loss = emb.new_zeros((), dtype=torch.float32)
        logs: dict = {}
        if self.ic.triplet_weight > 0:
            a, p, n = self.miner(emb.detach().float(), labels)
            tl = self.triplet(emb.float(), a, p, n)
            loss = loss + self.ic.triplet_weight * tl
            logs.update(triplet=tl.detach(), active=torch.tensor(self.triplet.last_active_fraction))
        if teacher is not None:
            dl = cosine_distill_loss(emb.float(), teacher)
            loss = loss + self.ic.distill_weight * dl
            logs["distill"] = dl.detach()
            if self.ic.distill_rel_weight > 0:
                rl = relational_distill_loss(emb.float(), teacher)
                loss = loss + self.ic.distill_rel_weight * rl
                logs["relational"] = rl.detach()
        if self.cls is not None:
            cl = self.cls(emb.float(), labels)
            loss = loss + self.ic.cls_weight * cl
            logs["cls"] = cl.detach()
        if self.attr is not None and attrs is not None:
            al = F.binary_cross_entropy_with_logits(self.attr(feats).float(), attrs.float())
            loss = loss + self.ic.aux_attr_weight * al
            logs["attr"] = al.detach()
        return loss, logs


class AttributeModule(nn.Module):
    def __init__(self, net: Backbone, pos_weight: torch.Tensor | None) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else torch.ones(len(ATTRIBUTES)))

    def forward(self, x: torch.Tensor, targets: torch.Tensor, attrs=None):
        logits = self.net(x)  # (B, 40)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=self.pos_weight)
        return loss, {}


# --------------------------------------------------------------------------------------------------
# one epoch


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def check_ema_decay(decay: float) -> None:
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"optim.ema must be in [0, 1), got {decay}")


def make_ema(net: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """Exponential moving average of `net`'s weights and BN buffers, or None when `decay` is 0.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates (as timm's ModelEmaV2 does),
    so the random or stage-1 initial weights do not linger in the average.
    """
    check_ema_decay(decay)
    if decay == 0.0:
        return None

    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        return averaged * d + current * (1.0 - d)

    return torch.optim.swa_utils.AveragedModel(net, avg_fn=avg, use_buffers=True)


def train_one_epoch(
    module: nn.Module,
    batches: Iterable[np.ndarray],
    data: FaceData,
    labels: np.ndarray,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    augment: BatchAugment,
    device: torch.device,
    *,
    epoch: int,
    grad_clip: float,
    amp: bool,
    attrs: np.ndarray | None = None,
    generator: torch.Generator | None = None,
    hooks: Hooks | None = None,
    progress: bool = True,
    total: int | None = None,
    ema: tuple[torch.optim.swa_utils.AveragedModel, nn.Module] | None = None,
    teacher: "TeacherTargets | None" = None,
) -> dict:
    """One pass over `batches` (arrays of row indices). Raises TrainingDiverged on a non-finite loss.

    `ema` is (averaged model, the network it follows), updated after every optimiser step.
    `teacher` (verify.distill.TeacherTargets): each image gets one of its stored views, augmented with
    that view's parameters, and the teacher's vector for it goes to the module.
    """
    from tqdm.auto import tqdm

    module.train()
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp and not torch.cuda.is_bf16_supported())
    sums: dict[str, float] = {}
    seen, steps, t0 = 0, 0, time.perf_counter()
    bar = tqdm(batches, total=total, desc=f"epoch {epoch}", disable=not progress, leave=False, unit="batch")
    for idx in bar:
        idx = np.asarray(idx)
        x = data.batch(idx, device)
        t = None
        if teacher is not None:
            params, t = teacher.batch(idx, generator, device)  # (B, D) teacher vectors of those views
            x = augment(x, params=params)
        else:
            x = augment(x, generator=generator)  # (B,3,S,S) normalised float
        y = torch.as_tensor(labels[idx], device=device)
        a = torch.as_tensor(attrs[idx], device=device) if attrs is not None else None
        if hooks and hooks.before_step:
            hooks.before_step(steps, x)
        with _autocast(device, amp):
            loss, logs = module(x, y, a) if t is None else module(x, y, a, t)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"non-finite loss ({loss.item()}) at epoch {epoch}, step {steps}; training stopped, "
                "the last good checkpoint is kept"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        if not torch.isfinite(gnorm):
            raise TrainingDiverged(
                f"non-finite gradient norm at epoch {epoch}, step {steps}; training stopped, the last good checkpoint is kept"
            )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema[0].update_parameters(ema[1])
        steps += 1
        seen += len(idx)
        sums["loss"] = sums.get("loss", 0.0) + loss.item()
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    bar.close()
    dt = time.perf_counter() - t0
    out = {k: v / max(1, steps) for k, v in sums.items()}
    out.update(steps=steps, images=seen, seconds=dt, images_per_s=seen / dt if dt > 0 else 0.0)
    return out


# --------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(net: nn.Module, data: FaceData, rows: np.ndarray, device: torch.device, batch_size: int = 128,
            flip: bool = False) -> torch.Tensor:
    """Forward `rows` in eval mode (no augmentation); with `flip`, add the mirror's output (TTA)."""
    was = net.training
    net.eval()
    outs = []
    for s in range(0, len(rows), batch_size):
        x = to_float(data.batch(rows[s : s + batch_size], device))
        y = net(x).float()
        if flip:
            y = y + net(torch.flip(x, dims=[3])).float()
        outs.append(y.cpu())
    net.train(was)
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate_attributes(net: nn.Module, data: FaceData, rows: np.ndarray, train_rows: np.ndarray,
                        device: torch.device, batch_size: int = 128) -> dict:
    """Per-attribute and mean accuracy, against majority-class baselines on the same images."""
    from .metrics import attribute_accuracy, majority_baseline

    attrs = data.table[list(ATTRIBUTES)].to_numpy()
    logits = predict(net, data, rows, device, batch_size).numpy()
    per, mean = attribute_accuracy(logits, attrs[rows])
    base_train, base_train_mean = majority_baseline(attrs[rows], attrs[train_rows])
    base_self, base_self_mean = majority_baseline(attrs[rows])
    return {
        "images": int(len(rows)),
        "mean_accuracy": float(mean),
        "baseline_mean_accuracy": float(base_train_mean),  # majority class of the training split
        "best_constant_mean_accuracy": float(base_self_mean),  # majority class of these very images
        "per_attribute": {a: float(v) for a, v in zip(ATTRIBUTES, per)},
        "per_attribute_baseline": {a: float(v) for a, v in zip(ATTRIBUTES, base_train)},
    }


def all_pairs_scores(emb: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity and same-identity label for every unordered pair of rows."""
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    sim = emb @ emb.T  # (N, N)
    iu = np.triu_indices(len(emb), k=1)
    return sim[iu].astype(np.float64), (ids[:, None] == ids[None, :])[iu]


def evaluate_identity(net: nn.Module, data: FaceData, rows: np.ndarray, device: torch.device, *,
                      flip: bool = True, target_far: float = 1e-3, seed: int = 0, batch_size: int = 128) -> dict:
    """Verification on held-out identities: ROC AUC, EER and TAR@FAR over every pair of their images,
    10-fold accuracy over a balanced, seeded sample of genuine and impostor pairs."""
    from .metrics import kfold_accuracy, summarise_verification, threshold_at_far

    emb = predict(net, data, rows, device, batch_size, flip=flip).numpy()
    ids = data.table["identity"].to_numpy()[rows]
    scores, same = all_pairs_scores(emb, ids)
    summary = summarise_verification(scores, same, fars=(1e-2, 1e-3))
    rng = np.random.default_rng(seed)
    gen, imp = np.flatnonzero(same), np.flatnonzero(~same)
    n = min(len(gen), len(imp))
    pick = np.concatenate([rng.choice(gen, n, replace=False), rng.choice(imp, n, replace=False)])
    folds = rng.permutation(len(pick)) % 10
    acc, acc_std, _ = kfold_accuracy(scores[pick], same[pick], folds=folds)
    thr = threshold_at_far(scores[~same], target_far)
    return {
        "images": int(len(rows)),
        "identities": int(len(np.unique(ids))),
        "pairs": int(len(scores)),
        "genuine_pairs": int(same.sum()),
        "auc": float(summary["auc"]),
        "eer": float(summary["eer"]),
        "tar_at_far": {k: (None if v is None else float(v)) for k, v in summary["tar_at_far"].items()},
        "accuracy": float(acc),
        "accuracy_std": float(acc_std),
        "threshold_at_target_far": float(thr),
        "far_at_threshold": float((scores[~same] >= thr).mean()),
        "tar_at_threshold": float((scores[same] >= thr).mean()),
    }


# --------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: Path, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def git_commit(where: Path | None = None) -> str | None:
    """Short commit of the code that trains (this package's checkout, or `where`), with "-dirty" when
    tracked files differ from it; None outside a git checkout."""
    here = where or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=here)
        commit = out.stdout.strip()
        if not commit:
            return None
        diff = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                              text=True, timeout=5, cwd=here)
        return commit + ("-dirty" if diff.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def plot_curves(history: list[dict], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train"]["loss"] for h in history], "o-", label="train loss")
    ax[0].set_xlabel("epoch"), ax[0].set_title("training loss"), ax[0].legend()
    if task == "attributes":
        for split in ("val", "test"):
            ax[1].plot(ep, [h[split]["mean_accuracy"] for h in history], "o-", label=f"{split} mean accuracy")
        ax[1].plot(ep, [h["test"]["best_constant_mean_accuracy"] for h in history], "--", label="test majority baseline")
        ax[1].set_title("attribute accuracy")
    else:
        for split in ("val", "test"):
            ax[1].plot(ep, [h[split]["auc"] for h in history], "o-", label=f"{split} ROC AUC")
            ax[1].plot(ep, [h[split]["accuracy"] for h in history], "s--", label=f"{split} pair accuracy")
        ax[1].set_title("verification on held-out identities")
    ax[1].set_xlabel("epoch"), ax[1].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# fit


@dataclass
class FitResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    model: Backbone | None = None
    best: dict | None = None


def _attribute_batches(rows: np.ndarray, batch_size: int, seed: int, epoch: int, dist: Dist,
                       limit: int | None) -> list[np.ndarray]:
    perm = np.random.default_rng([seed, epoch]).permutation(rows)
    per_rank = len(perm) // dist.world
    mine = perm[dist.rank * per_rank : (dist.rank + 1) * per_rank]  # equal share on every rank
    batches = [np.sort(mine[i : i + batch_size]) for i in range(0, len(mine) - batch_size + 1, batch_size)]
    return batches[:limit] if limit else batches


def fit(cfg: TrainConfig, *, resume: bool = False, hooks: Hooks | None = None, progress: bool = True) -> FitResult:
    """Train `cfg.task` end to end; writes the run folder `cfg.out` and returns the history."""
    if cfg.task not in ("attributes", "identity"):
        raise ValueError(f"unknown task {cfg.task!r}: attributes | identity")
    teacher = None
    check_ema_decay(cfg.optim.ema)  # before the data cache is built: a bad config fails at once
    dist, device = init_distributed(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed + dist.rank)
    run = Path(cfg.out)
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
        if not resume and (run / CKPT_LAST).exists():
            raise FileExistsError(f"{run}: already holds a run; use --resume to continue it or another --out")
        save_config(cfg, run / "config.yaml")
    progress = progress and dist.main

    data = prepare_data(cfg, dist)
    train_rows, val_rows, test_rows = data.rows(0), data.rows(1), data.rows(2)
    for name, rows in (("train", train_rows), ("validation", val_rows), ("test", test_rows)):
        if len(rows) == 0:
            raise ValueError(f"partition for {name} is empty in {', '.join(cfg.data.roots)}")
    log.info("images: %d train, %d val, %d test", len(train_rows), len(val_rows), len(test_rows))

    attrs_all = data.table[list(ATTRIBUTES)].to_numpy().astype(np.float32) if "5_o_Clock_Shadow" in data.table else None
    provenance: dict = {"data": list(cfg.data.roots), "commit": git_commit(), "images": len(data.table)}

    if cfg.task == "attributes":
        net = backbone_from_config(cfg.model, cfg.data.size, head="attributes", out_dim=len(ATTRIBUTES))
        pw = None
        if cfg.attributes.pos_weight:
            pos = attrs_all[train_rows].mean(0).clip(1e-3, 1 - 1e-3)
            pw = torch.tensor((1 - pos) / pos, dtype=torch.float32)
        module: nn.Module = AttributeModule(net, pw)
        labels, aux = attrs_all, None
        batches_per_epoch = cfg.optim.batches_per_epoch or (len(train_rows) // dist.world) // cfg.optim.batch_size
        sampler = None
    else:
        from .samplers import PKSampler

        net = backbone_from_config(cfg.model, cfg.data.size, head="embedding", out_dim=cfg.model.embedding_dim)
        if cfg.identity.init:
            if resume:  # the checkpoint's weights replace the init below; only record where it came from
                provenance.update({"init": str(cfg.identity.init)})
            else:
                provenance.update(load_backbone_init(cfg.identity.init, net))
        if cfg.identity.freeze_stages:
            net.freeze_stages(cfg.identity.freeze_stages)
        ids = data.table["identity"].to_numpy()
        # Dense class ids over training identities (CosFace needs 0..C-1); others map to -1.
        uniq = np.unique(ids[train_rows])
        lut = {int(v): i for i, v in enumerate(uniq)}
        labels = np.array([lut.get(int(v), -1) for v in ids], dtype=np.int64)
        module = IdentityModule(net, len(uniq), cfg)
        aux = attrs_all if cfg.identity.aux_attr_weight > 0 else None
        if cfg.identity.aux_attr_weight > 0 and aux is None:
            raise ValueError("identity.aux_attr_weight > 0 needs attribute annotations in the data roots")
        sampler = PKSampler(
            labels[train_rows], cfg.identity.p, cfg.identity.k, batches_per_epoch=cfg.optim.batches_per_epoch,
            replacement=cfg.identity.replacement, min_images=cfg.data.min_images_per_identity, seed=cfg.seed,
            rank=dist.rank, world_size=dist.world,
        )
        batches_per_epoch = len(sampler)
        if cfg.identity.teacher:
            # only rows the sampler can draw (identities with enough images) need teacher vectors
            counts = np.bincount(labels[train_rows], minlength=len(uniq))
            drawn = train_rows[counts[labels[train_rows]] >= max(1, cfg.data.min_images_per_identity)]
            teacher = prepare_teacher(cfg, data, drawn, device, dist, progress)
            provenance["teacher"] = {"model": str(cfg.identity.teacher), "fingerprint": teacher.teacher,
                                     "views": teacher.views, "centred": teacher.center}
    module.to(device)
    if dist.main:
        log.info("%s backbone: %.2fM parameters", cfg.model.backbone, count_parameters(net) / 1e6)
    train_module: nn.Module = module
    if dist.enabled:
        train_module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )

    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
    )
    total_steps = cfg.optim.epochs * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, int(cfg.optim.warmup_epochs * batches_per_epoch))
    )
    augment = BatchAugment.from_config(cfg.augment).to(device)
    ema = make_ema(net, cfg.optim.ema)
    eval_net = ema.module if ema is not None else net  # what is evaluated, selected and exported

    history: list[dict] = []
    best: dict | None = None
    start_epoch = 1
    if resume:
        ck_path = run / CKPT_LAST
        if not ck_path.exists():
            raise FileNotFoundError(f"{ck_path}: nothing to resume")
        ck = torch.load(ck_path, map_location=device, weights_only=True)
        def _without_epochs(d: dict) -> dict:  # more epochs is the usual reason to resume
            return {**d, "optim": {k: v for k, v in d["optim"].items() if k != "epochs"}}

        if _without_epochs(ck["config"]) != _without_epochs(cfg.to_dict()) and dist.main:
            log.warning("resuming %s with a config that differs from the checkpoint's", run)
        module.load_state_dict(ck["module"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ema is not None:
            if "ema" not in ck:
                raise ValueError(f"{ck_path}: has no weight average to resume but optim.ema is {cfg.optim.ema}")
            ema.load_state_dict(ck["ema"])
        history, best, start_epoch = ck["history"], ck.get("best"), int(ck["epoch"]) + 1
        log.info("resumed %s at epoch %d", run, start_epoch)

    select_key = "mean_accuracy" if cfg.task == "attributes" else "auc"
    for epoch in range(start_epoch, cfg.optim.epochs + 1):
        # Every random choice of an epoch derives from (seed, epoch, rank): resume replays it exactly.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 101 + dist.rank)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 7919 + epoch * 31 + dist.rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
            batches = (np.asarray(train_rows)[np.asarray(b)] for b in sampler)
        else:
            batches = iter(_attribute_batches(train_rows, cfg.optim.batch_size, cfg.seed, epoch, dist,
                                              cfg.optim.batches_per_epoch))
        tr = train_one_epoch(
            train_module, batches, data, labels, optimizer, scheduler, augment, device, epoch=epoch,
            grad_clip=cfg.optim.grad_clip, amp=cfg.optim.amp, attrs=aux, generator=gen, hooks=hooks,
            progress=progress, total=batches_per_epoch, ema=(ema, net) if ema is not None else None,
            teacher=teacher,
        )
        if dist.enabled:  # images/s of the whole job
            t = torch.tensor([tr["images"]], dtype=torch.float64)
            tdist.all_reduce(t)
            tr["images_per_s"] = float(t.item()) / tr["seconds"]
        entry = {"epoch": epoch, "train": tr, "lr": scheduler.get_last_lr()[0]}
        if dist.main:
            if cfg.task == "attributes":
                entry["val"] = evaluate_attributes(eval_net, data, val_rows, train_rows, device)
                entry["test"] = evaluate_attributes(eval_net, data, test_rows, train_rows, device)
            else:
                kw = dict(flip=cfg.identity.tta_flip, target_far=cfg.identity.target_far, seed=cfg.seed)
                entry["val"] = evaluate_identity(eval_net, data, val_rows, device, **kw)
                entry["test"] = evaluate_identity(eval_net, data, test_rows, device, **kw)
            history.append(entry)
            is_best = best is None or entry["val"][select_key] > best["val"][select_key]
            if is_best:
                best = {"epoch": epoch, "val": entry["val"], "test": entry["test"]}
            state = dict(
                config=cfg.to_dict(), epoch=epoch, task=cfg.task, module=module.state_dict(),
                model=eval_net.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                history=history, best=best, provenance=provenance,
            )
            if ema is not None:  # `model` above holds the averaged weights; the raw ones are in `module`
                state["ema"] = ema.state_dict()
            save_checkpoint(run / CKPT_LAST, **state)
            if is_best:
                save_checkpoint(run / CKPT_BEST, **state)
            atomic_write_text(run / "metrics.json", json.dumps({"task": cfg.task, "history": history, "best": best},
                                                               indent=1))
            plot_curves(history, run / "curves.png", cfg.task)
            _log_epoch(cfg.task, entry)
        else:
            history.append(entry)
        if hooks and hooks.after_epoch:
            hooks.after_epoch(epoch, entry)
        dist.barrier()

    result = FitResult(run, history, eval_net, best)
    if dist.main and cfg.task == "identity":
        export_identity_model(run, cfg, data, device, provenance)
    return result


def _log_epoch(task: str, e: dict) -> None:
    tr = e["train"]
    if task == "attributes":
        log.info(
            "epoch %d: loss %.4f, %.0f img/s | val mean acc %.4f | test mean acc %.4f (majority baseline %.4f)",
            e["epoch"], tr["loss"], tr["images_per_s"], e["val"]["mean_accuracy"], e["test"]["mean_accuracy"],
            e["test"]["best_constant_mean_accuracy"],
        )
    else:
        log.info(
            "epoch %d: loss %.4f (active triplets %.2f, distill %.4f), %.0f img/s | val AUC %.4f acc %.4f | "
            "test AUC %.4f acc %.4f",
            e["epoch"], tr["loss"], tr.get("active", float("nan")), tr.get("distill", float("nan")),
            tr["images_per_s"], e["val"]["auc"], e["val"]["accuracy"], e["test"]["auc"], e["test"]["accuracy"],
        )


def export_identity_model(run: Path, cfg: TrainConfig, data: FaceData, device: torch.device, provenance: dict) -> Path:
    """Best checkpoint -> one model file, calibrated on partition-1 identities, reported on partition 2."""
    from .model_file import save_model

    ck = torch.load(run / CKPT_BEST, map_location="cpu", weights_only=True)
    net = backbone_from_config(cfg.model, cfg.data.size, head="embedding", out_dim=cfg.model.embedding_dim)
    net.load_state_dict(ck["model"])
    net.to(device)
    kw = dict(flip=cfg.identity.tta_flip, target_far=cfg.identity.target_far, seed=cfg.seed)
    val = evaluate_identity(net, data, data.rows(1), device, **kw)
    test = evaluate_identity(net, data, data.rows(2), device, **kw)
    calibration = {
        "target_far": cfg.identity.target_far,
        "threshold": val["threshold_at_target_far"],
        "far": val["far_at_threshold"],
        "tar": val["tar_at_threshold"],
        "data": "CelebA partition 1 (validation identities), all pairs",
        "pairs": val["pairs"],
        "genuine_pairs": val["genuine_pairs"],
    }
    path = run / "model.pt"
    save_model(
        path, net.cpu(), arch=cfg.to_dict()["model"], geometry=data.geometry, threshold=val["threshold_at_target_far"],
        calibration=calibration, provenance={**provenance, "config": cfg.to_dict(), "best_epoch": ck["epoch"],
                                              "celeba_val": val, "celeba_test": test},
        tta_flip=cfg.identity.tta_flip,
    )
    log.info("model written to %s (threshold %.4f at FAR %.1e on validation identities)", path,
             val["threshold_at_target_far"], val["far_at_threshold"])
    return path
