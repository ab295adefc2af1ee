"""The run folder: checkpoints (written atomically, so a crash keeps the last good one), metrics.json,
curves.png, resuming, a stage-1 backbone as initialisation, and the commit that trained."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

from verify.atomic import atomic_path, atomic_write_text
from verify.model.backbones import Backbone
from verify.config import TrainConfig, save_config

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

CKPT_LAST = "ckpt_last.pt"
CKPT_BEST = "ckpt_best.pt"


def start_run_folder(run: Path, cfg: TrainConfig, resume: bool) -> None:
    """Create `run` and write its config; a folder that already holds a run needs `resume`."""
    run.mkdir(parents=True, exist_ok=True)
    if not resume and (run / CKPT_LAST).exists():
        raise FileExistsError(f"{run}: already holds a run; use --resume to continue it or another --out")
    save_config(cfg, run / "config.yaml")


def save_checkpoint(path: Path, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_epoch(run: Path, state: dict, *, is_best: bool,
               draw_metrics: Callable[["Axes", list[dict]], None]) -> None:
    """After an epoch: ckpt_last.pt (and ckpt_best.pt when `is_best`), metrics.json and curves.png.

    `state` is the checkpoint (it holds `task`, `history` and `best`); `draw_metrics` draws the
    task's evaluation curves for plot_curves."""
    save_checkpoint(run / CKPT_LAST, **state)
    if is_best:
        save_checkpoint(run / CKPT_BEST, **state)
    metrics = {"task": state["task"], "history": state["history"], "best": state["best"]}
    atomic_write_text(run / "metrics.json", json.dumps(metrics, indent=1))
    plot_curves(state["history"], run / "curves.png", draw_metrics)


def resume_training(
    path: Path,
    cfg: TrainConfig,
    device: torch.device,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: torch.optim.swa_utils.AveragedModel | None,
    warn: bool = True,
) -> tuple[list[dict], dict | None, int]:
    """Load checkpoint `path` into the training objects; returns (history, best, first epoch to run)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: nothing to resume")
    ck = torch.load(path, map_location=device, weights_only=True)

    def without_epochs(d: dict) -> dict:  # more epochs is the usual reason to resume
        return {**d, "optim": {k: v for k, v in d["optim"].items() if k != "epochs"}}

    if without_epochs(ck["config"]) != without_epochs(cfg.to_dict()) and warn:
        log.warning("resuming %s with a config that differs from the checkpoint's", path.parent)
    module.load_state_dict(ck["module"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    if ema is not None:
        if "ema" not in ck:
            raise ValueError(f"{path}: has no weight average to resume but optim.ema is {cfg.optim.ema}")
        ema.load_state_dict(ck["ema"])
    start_epoch = int(ck["epoch"]) + 1
    log.info("resumed %s at epoch %d", path.parent, start_epoch)
    return ck["history"], ck.get("best"), start_epoch


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


def plot_curves(history: list[dict], path: Path, draw_metrics: Callable[["Axes", list[dict]], None]) -> None:
    """Training loss (left) and the task's evaluation curves (right, drawn by `draw_metrics`) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train"]["loss"] for h in history], "o-", label="train loss")
    ax[0].set_xlabel("epoch"), ax[0].set_title("training loss"), ax[0].legend()
    draw_metrics(ax[1], history)
    ax[1].set_xlabel("epoch"), ax[1].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
