"""Evaluation during training: attribute accuracy against majority baselines, and verification over
every pair of held-out identities' images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from verify.training.augment import to_float
from verify.data.celeba import ATTRIBUTES
from verify.config import TrainConfig
from verify.evaluation.metrics import attribute_accuracy, kfold_accuracy, majority_baseline, summarise_verification, threshold_at_far
from verify.training.data import FaceData


@torch.no_grad()
def predict(net: nn.Module, data: FaceData, rows: np.ndarray, device: torch.device, batch_size: int = 128,
            flip: bool = False) -> torch.Tensor:
    """Forward `rows` in eval mode (no augmentation); with `flip`, add the mirror's output (TTA)."""
    was = net.training
    net.eval()
    outs = []
    for s in range(0, len(rows), batch_size):
        x = to_float(data.batch(rows[s : s + batch_size], device))  # (B, 3, S, S)
        y = net(x).float()
        if flip:
            y = y + net(torch.flip(x, dims=[3])).float()
        outs.append(y.cpu())
    net.train(was)
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate_attributes(net: nn.Module, data: FaceData, rows: np.ndarray, train_rows: np.ndarray,
                        device: torch.device, batch_size: int = 128) -> dict:
    """Per-attribute and mean accuracy, against majority-class baselines on the same images."""
    attrs = data.table[list(ATTRIBUTES)].to_numpy()
    logits = predict(net, data, rows, device, batch_size).numpy()  # (N, 40)
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
    emb = predict(net, data, rows, device, batch_size, flip=flip).numpy()  # (N, D)
    ids = data.table["identity"].to_numpy()[rows]
    scores, same = all_pairs_scores(emb, ids)
    # ROC figures over every pair; accuracy below on a balanced sample, so none over every pair here.
    summary = summarise_verification(scores, same, fars=(1e-2, 1e-3), accuracy=False)
    if summary["auc"] is None:  # AUC picks the best epoch: without it there is nothing to compare
        raise ValueError(f"{len(rows)} images of {len(np.unique(ids))} identities: verification needs both "
                         "genuine and impostor pairs")
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


def evaluate_identity_configured(cfg: TrainConfig, net: nn.Module, data: FaceData, rows: np.ndarray,
                                 device: torch.device) -> dict:
    """`evaluate_identity` with the run's TTA flip, target FAR and seed (epochs and export agree)."""
    return evaluate_identity(net, data, rows, device, flip=cfg.identity.tta_flip,
                             target_far=cfg.identity.target_far, seed=cfg.seed)
