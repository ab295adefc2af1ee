"""Unlabelled roots (issue 18): faces with no identity join stage 2 for the teacher only. They load with
identity and partition -1, ride along in every P x K batch, get teacher views, and never reach the
identity losses, the partitions or the evaluation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from verify.model.backbones import backbone_from_config
from verify.config import ModelConfig, load_config
from verify.training import Dist, fit, prepare_data, split_rows
from verify.training.tasks import IdentityModule, unlabelled_batches

from test_distill import BOX, _teacher_file
from test_train import tiny_cfg


@pytest.fixture
def unlabelled_root(tmp_path, shared_data) -> Path:
    """60 real in-the-wild CelebA faces, stripped of their names' meaning (an unlabelled set)."""
    src = sorted((shared_data / "celeba_wild" / "img_align_celeba").glob("*.jpg"))[:60]
    out = tmp_path / "unlabelled" / "img_align_celeba"
    out.mkdir(parents=True)
    for i, p in enumerate(src):
        shutil.copy(p, out / f"face{i:03d}.jpg")
    return out.parent


def test_unlabelled_rows_are_in_no_partition(tmp_path, celeba_root, unlabelled_root):
    cfg = tiny_cfg(tmp_path, celeba_root, task="identity",
                   **{"data.unlabelled_roots": [str(unlabelled_root)], "data.max_images": None})
    data = prepare_data(cfg, Dist())
    rows = data.unlabelled_rows()
    assert len(rows) == 60
    assert (data.table["identity"].to_numpy()[rows] == -1).all()
    splits = split_rows(data, cfg.data.roots)
    for part in (splits.train, splits.val, splits.test):
        assert not np.isin(part, rows).any()
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(data.table) - 60
    assert data.table["image"].is_unique


def test_unlabelled_batches_cover_every_row_and_repeat_by_seed():
    rows = np.arange(100, 130)
    b = unlabelled_batches(rows, 8, 10, seed=0, epoch=3, rank=0)  # 80 draws from 30 rows: 3 passes
    assert [len(x) for x in b] == [8] * 10
    flat = np.concatenate(b)
    assert set(flat[:30]) == set(rows) and set(flat[30:60]) == set(rows)
    assert all(np.array_equal(x, y) for x, y in zip(b, unlabelled_batches(rows, 8, 10, 0, 3, 0)))
    assert not np.array_equal(flat, np.concatenate(unlabelled_batches(rows, 8, 10, 0, 4, 0)))


def test_identity_losses_ignore_unlabelled_faces(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, {"task": "identity", "identity.p": 4, "identity.k": 2, "identity.cls_weight": 1.0,
                             "model.width": 8, "model.layers": [1, 1, 1, 1], "model.feature_dim": 32,
                             "model.embedding_dim": 16})
    net = backbone_from_config(cfg.model, 32, head="embedding", out_dim=16).eval()
    module = IdentityModule(net, num_classes=4, cfg=cfg).eval()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1])
    x = torch.randn(11, 3, 32, 32)
    teacher = torch.nn.functional.normalize(torch.randn(11, 16), dim=1)
    _, logs = module(x, labels, None, teacher)
    y = x.clone()
    y[8:] = torch.randn(3, 3, 32, 32)  # other unlabelled faces: identity losses must not move
    _, logs2 = module(y, labels, None, teacher)
    assert torch.equal(logs["triplet"], logs2["triplet"]) and torch.equal(logs["cls"], logs2["cls"])
    assert not torch.equal(logs["distill"], logs2["distill"])
    _, alone = module(x[:8], labels[:8], None, teacher[:8])
    assert torch.allclose(alone["triplet"], logs["triplet"]) and torch.allclose(alone["cls"], logs["cls"])


def test_training_draws_unlabelled_faces_for_the_teacher(tmp_path, celeba_root, unlabelled_root):
    teacher = _teacher_file(tmp_path / "teacher.pt")
    over = {"data.box": list(BOX), "data.max_images": 900, "optim.epochs": 2, "optim.batches_per_epoch": 4,
            "data.unlabelled_roots": [str(unlabelled_root)], "identity.unlabelled_per_batch": 4,
            "identity.teacher": str(teacher), "identity.teacher_views": 2, "identity.tta_flip": False}
    cfg = tiny_cfg(tmp_path, celeba_root, task="identity", **over)
    res = fit(cfg, progress=False)
    assert all(np.isfinite(h["train"]["distill"]) for h in res.history)
    assert res.history[0]["train"]["images"] == 4 * (8 * 4 + 4)  # P x K + 4 unlabelled per batch
    from verify.training.distill import TeacherTargets

    (targets_path,) = Path(cfg.data.cache_dir).glob("teacher-*u-unlabelled*.npz")
    data = prepare_data(cfg, Dist())
    assert np.isin(data.unlabelled_rows(), TeacherTargets.load(targets_path).rows).all()


def test_unlabelled_per_batch_needs_a_teacher_and_roots(tmp_path, celeba_root):
    cfg = tiny_cfg(tmp_path, celeba_root, task="identity", **{"identity.unlabelled_per_batch": 4})
    with pytest.raises(ValueError, match="needs identity.teacher and data.unlabelled_roots"):
        fit(cfg, progress=False)


def test_identity_subset_keeps_whole_identities():
    from verify.training.tasks import identity_subset

    ids = np.repeat(np.arange(50), 7)  # 350 rows, 7 per identity
    rows = np.arange(0, 350)
    sub = identity_subset(rows, ids, 100, seed=0)
    kept = np.unique(ids[sub])
    assert 100 <= len(sub) < 107 and len(sub) == 7 * len(kept)
    assert np.array_equal(sub, identity_subset(rows, ids, 100, seed=0))
    assert not np.array_equal(sub, identity_subset(rows, ids, 100, seed=1))
