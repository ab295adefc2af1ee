"""The training loop: `train_one_epoch` and `fit`, the same for both stages (see tasks.py for what
differs). It runs on CPU, one GPU, or several GPUs under `torchrun` (DistributedDataParallel): only
the config and the launcher change."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from verify.training.augment import BatchAugment
from verify.model.backbones import Backbone, count_parameters
from verify.config import OptimConfig, TrainConfig
from verify.model.device import seed_everything
from verify.training.checkpoint import CKPT_LAST, git_commit, resume_training, save_epoch, start_run_folder
from verify.training.data import FaceData, prepare_data, split_rows
from verify.training.dist import init_distributed
from verify.training.distill import TeacherTargets
from verify.training.tasks import make_task, task_class

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised when a loss or gradient is NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class Hooks:
    """Test seams: `before_step(step, x)` may edit the batch tensor in place (e.g. inject a NaN)."""

    before_step: Callable[[int, torch.Tensor], None] | None = None
    after_epoch: Callable[[int, dict], None] | None = None


@dataclass
class FitResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    model: Backbone | None = None
    best: dict | None = None


# --------------------------------------------------------------------------------------------------
# schedule, mixed precision, weight average


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def make_optimizer(module: nn.Module, oc: OptimConfig, batches_per_epoch: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on biases and norm weights) with a warmup + cosine schedule per step."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=oc.lr,
    )
    total_steps = oc.epochs * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, int(oc.warmup_epochs * batches_per_epoch))
    )
    return optimizer, scheduler


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


# --------------------------------------------------------------------------------------------------
# one epoch


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
    teacher: TeacherTargets | None = None,
) -> dict:
    """One pass over `batches` (arrays of row indices). Raises TrainingDiverged on a non-finite loss.

    `ema` is (averaged model, the network it follows), updated after every optimiser step.
    `teacher` (verify.training.distill.TeacherTargets): each image gets one of its stored views, augmented
    with that view's parameters, and the teacher's vector for it goes to the module.
    """
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
# fit


def fit(cfg: TrainConfig, *, resume: bool = False, hooks: Hooks | None = None, progress: bool = True) -> FitResult:
    """Train `cfg.task` end to end; writes the run folder `cfg.out` and returns the history."""
    task_class(cfg.task)  # a bad config fails at once, before the data cache is built
    check_ema_decay(cfg.optim.ema)
    dist, device = init_distributed(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed + dist.rank)
    run = Path(cfg.out)
    if dist.main:
        start_run_folder(run, cfg, resume)
    progress = progress and dist.main

    data = prepare_data(cfg, dist)
    provenance: dict = {"data": list(cfg.data.roots), "commit": git_commit(), "images": len(data.table)}
    if cfg.data.unlabelled_roots:
        provenance.update(unlabelled_data=list(cfg.data.unlabelled_roots),
                          unlabelled_images=int(len(data.unlabelled_rows())))
    task = make_task(cfg, data, split_rows(data, cfg.data.roots), dist, device, resume=resume, progress=progress)
    provenance.update(task.provenance)
    module = task.module.to(device)
    if dist.main:
        log.info("%s backbone: %.2fM parameters", cfg.model.backbone, count_parameters(task.net) / 1e6)
    train_module = dist.wrap(module, device)
    optimizer, scheduler = make_optimizer(module, cfg.optim, task.batches_per_epoch)
    augment = BatchAugment.from_config(cfg.augment).to(device)
    ema = make_ema(task.net, cfg.optim.ema)
    eval_net = ema.module if ema is not None else task.net  # what is evaluated, selected and exported

    history: list[dict] = []
    best: dict | None = None
    start_epoch = 1
    if resume:
        history, best, start_epoch = resume_training(run / CKPT_LAST, cfg, device, module=module, optimizer=optimizer,
                                                     scheduler=scheduler, ema=ema, warn=dist.main)
    for epoch in range(start_epoch, cfg.optim.epochs + 1):
        # Every random choice of an epoch derives from (seed, epoch, rank): resume replays it exactly.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 101 + dist.rank)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 7919 + epoch * 31 + dist.rank)
        tr = train_one_epoch(
            train_module, task.batches(epoch), data, task.labels, optimizer, scheduler, augment, device, epoch=epoch,
            grad_clip=cfg.optim.grad_clip, amp=cfg.optim.amp, attrs=task.attrs, generator=gen, hooks=hooks,
            progress=progress, total=task.batches_per_epoch, ema=(ema, task.net) if ema is not None else None,
            teacher=task.teacher,
        )
        if dist.enabled:  # images/s of the whole job
            tr["images_per_s"] = dist.all_sum(tr["images"]) / tr["seconds"]
        entry = {"epoch": epoch, "train": tr, "lr": scheduler.get_last_lr()[0]}
        history.append(entry)
        if dist.main:  # evaluation, selection and the run folder are rank 0's
            entry["val"] = task.evaluate(eval_net, task.splits.val)
            entry["test"] = task.evaluate(eval_net, task.splits.test)
            is_best = best is None or task.improves(entry["val"], best["val"])
            if is_best:
                best = {"epoch": epoch, "val": entry["val"], "test": entry["test"]}
            state = dict(
                config=cfg.to_dict(), epoch=epoch, task=cfg.task, module=module.state_dict(),
                model=eval_net.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                history=history, best=best, provenance=provenance,
            )
            if ema is not None:  # `model` above holds the averaged weights; the raw ones are in `module`
                state["ema"] = ema.state_dict()
            save_epoch(run, state, is_best=is_best, draw_metrics=task.draw_metrics)
            task.log_epoch(entry)
        if hooks and hooks.after_epoch:
            hooks.after_epoch(epoch, entry)
        dist.barrier()

    if dist.main:
        task.finish(run, provenance)
    return FitResult(run, history, eval_net, best)
