"""Training: stage 1 learns CelebA's attributes, stage 2 an identity embedding, in one loop.

    data.py        FaceData (CelebA rows on the decoded cache), prepare_data, the partitions
    cache.py       the decoded uint8 image cache (torch-free: decode workers import it)
    dist.py        Dist: rank, world, DDP wrapping, collectives
    distill.py     a teacher's stored views (TeacherTargets, prepare_teacher)
    tasks.py       AttributeTask / IdentityTask: module, batches, evaluation, best-epoch metric, log line
    loop.py        fit, train_one_epoch, the schedule and the weight average
    evaluation.py  predict, evaluate_attributes, evaluate_identity
    checkpoint.py  the run folder: checkpoints, metrics.json, curves, resume, stage-1 init, git commit
    export.py      the best identity checkpoint -> a calibrated model file (via verify.model.file)

The names below are loaded on first use, so that importing `verify.training.cache` (a decode worker
started with spawn) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("FaceData", "Splits", "prepare_data", "split_rows", "subset"), "data"),
    **dict.fromkeys(("ImageCache", "decode_crop"), "cache"),
    **dict.fromkeys(("Dist", "init_distributed"), "dist"),
    **dict.fromkeys(("TeacherTargets", "compute_teacher_targets", "prepare_teacher"), "distill"),
    **dict.fromkeys(("AttributeModule", "AttributeTask", "IdentityModule", "IdentityTask", "Task", "make_task"),
                    "tasks"),
    **dict.fromkeys(("FitResult", "Hooks", "TrainingDiverged", "fit", "make_ema", "train_one_epoch",
                     "warmup_cosine"), "loop"),
    **dict.fromkeys(("all_pairs_scores", "evaluate_attributes", "evaluate_identity", "predict"), "evaluation"),
    **dict.fromkeys(("CKPT_BEST", "CKPT_LAST", "git_commit", "load_backbone_init", "save_checkpoint"),
                    "checkpoint"),
    "export_identity_model": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
