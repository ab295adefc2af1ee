"""The end of an identity run: its best checkpoint as one calibrated model file (written by
verify.model.file, the only writer of model files)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from verify.model.backbones import backbone_from_config
from verify.config import TrainConfig
from verify.model.write import save_model
from verify.training.checkpoint import CKPT_BEST
from verify.training.data import FaceData
from verify.training.evaluation import evaluate_identity_configured

log = logging.getLogger(__name__)


def export_identity_model(run: Path, cfg: TrainConfig, data: FaceData, device: torch.device, provenance: dict) -> Path:
    """Best checkpoint -> one model file, calibrated on partition-1 identities, reported on partition 2."""
    ck = torch.load(run / CKPT_BEST, map_location="cpu", weights_only=True)
    net = backbone_from_config(cfg.model, cfg.data.size, head="embedding", out_dim=cfg.model.embedding_dim)
    net.load_state_dict(ck["model"])
    net.to(device)
    val = evaluate_identity_configured(cfg, net, data, data.rows(1), device)
    test = evaluate_identity_configured(cfg, net, data, data.rows(2), device)
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
