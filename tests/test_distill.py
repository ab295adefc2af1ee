"""Distillation: stored views replay the teacher's exact augmentation on the student's crop, teacher
vectors are centred, the losses are right, and identity training with a teacher pulls the student
towards it (real CelebA images, tiny networks, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from verify.training.augment import BatchAugment, batch_to_tensor
from verify.model.backbones import backbone_from_config
from verify.config import ModelConfig
from verify.training.distill import (TeacherTargets, compute_teacher_targets, identity_params,
                                     params_from_array, params_to_array)
from verify.training.losses import cosine_distill_loss, relational_distill_loss
from verify.model.geometry import CropGeometry
from verify.model.write import save_model
from verify.training import fit

from test_train import tiny_cfg

BOX = (36.8, 80.25, 142.37, 185.82)


def test_params_round_trip_and_identity_view():
    aug = BatchAugment(rotation=20, zoom=0.2, shift=0.1, brightness=0.2, contrast=0.2)
    p = aug.sample(16, torch.Generator().manual_seed(3))
    q = params_from_array(params_to_array(p))
    for name in ("flip", "angle", "scale", "shift", "brightness", "contrast"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    same = aug(x, params=params_from_array(identity_params(3)))
    plain = BatchAugment(hflip=False, rotation=0, zoom=0, shift=0)(x)
    assert torch.allclose(same, plain, atol=1e-4)


def test_one_draw_is_the_same_warp_at_two_sizes(celeba_root):
    """The student (96 px) and the teacher (150 px) see the same augmented picture."""
    from PIL import Image

    from verify.training.cache import decode_crop

    files = sorted((celeba_root / "img_align_celeba").glob("*.jpg"))[:8]
    big = np.stack([decode_crop(f, CropGeometry(150, BOX)) for f in files])
    small = np.stack([decode_crop(f, CropGeometry(96, BOX)) for f in files])
    aug = BatchAugment(rotation=20, zoom=0.2, shift=0.1)
    p = aug.sample(len(files), torch.Generator().manual_seed(0))
    a_big = aug(batch_to_tensor(big), params=p)
    a_small = aug(batch_to_tensor(small), params=p)
    shrunk = F.interpolate(a_big, size=96, mode="area")
    err_same = (shrunk - a_small).abs().mean().item()
    other = aug(batch_to_tensor(small), params=aug.sample(len(files), torch.Generator().manual_seed(1)))
    err_other = (other - a_small).abs().mean().item()
    assert err_same < 0.05 and err_other > 4 * err_same, (err_same, err_other)


def test_teacher_targets_view0_centring_and_lookup():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2), torch.nn.Flatten(), torch.nn.LazyLinear(8))
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    rows = np.array([1, 4, 5, 9])
    aug = BatchAugment(rotation=15, zoom=0.1, shift=0.05)
    with torch.no_grad():
        teacher(torch.zeros(1, 3, 16, 16))  # materialise the lazy layer
    t = compute_teacher_targets(teacher, images, rows, aug, views=3, seed=0, device=torch.device("cpu"),
                                teacher_id="t", progress=False)
    assert t.vectors.shape == (4, 3, 8) and t.params.shape == (4, 3, 7)
    with torch.no_grad():
        plain = F.normalize(teacher(BatchAugment(hflip=False, rotation=0, zoom=0, shift=0)(
            batch_to_tensor(images[rows]))), dim=1).numpy()
    assert np.allclose(t.vectors[:, 0].astype(np.float32), plain, atol=2e-3)  # view 0: unaugmented
    assert not np.allclose(t.vectors[:, 1], t.vectors[:, 0], atol=1e-2)  # the others are not
    assert np.allclose(t.mean, t.vectors[:, 0].astype(np.float32).mean(0), atol=1e-6)

    params, vec = t.batch(np.array([9, 1]), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert vec.shape == (2, 8) and torch.allclose(vec.norm(dim=1), torch.ones(2), atol=1e-5)
    # centred: the returned vector is normalise(stored - mean) of the view whose parameters came back
    for i, row in enumerate((3, 0)):
        k = int(np.argmin(np.abs(t.params[row, :, 1] - params.angle[i].item())))
        want = F.normalize(torch.from_numpy(t.vectors[row, k].astype(np.float32) - t.mean), dim=0)
        assert torch.allclose(vec[i], want, atol=1e-5)
    raw = TeacherTargets(t.vectors, t.params, t.rows, t.mean, "t", center=False)
    _, v_raw = raw.batch(np.array([9]), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert not torch.allclose(v_raw, vec[:1], atol=1e-3)
    with pytest.raises(KeyError, match="no teacher vectors"):
        t.batch(np.array([2]), None, torch.device("cpu"))


def test_distill_losses():
    s = F.normalize(torch.randn(6, 8), dim=1)
    assert cosine_distill_loss(s, s).abs() < 1e-6
    assert relational_distill_loss(s, s).abs() < 1e-10
    t = F.normalize(torch.randn(6, 8), dim=1)
    per = cosine_distill_loss(s, t, reduction="none")
    assert per.shape == (6,) and torch.allclose(per, 1 - (s * t).sum(1))
    assert torch.isclose(cosine_distill_loss(s, t, reduction="sum"), per.sum())
    rel = relational_distill_loss(s, t, reduction="none")
    assert rel.shape == (30,) and (rel >= 0).all() and rel.mean() > 0
    # relational ignores a rotation of the whole space, cosine does not
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert relational_distill_loss(s @ q, s) < 1e-10 and cosine_distill_loss(s @ q, s) > 0.1
    with pytest.raises(ValueError, match="reduction"):
        cosine_distill_loss(s, t, reduction="avg")


def _teacher_file(path: Path, size: int = 40, dim: int = 32) -> Path:
    torch.manual_seed(7)
    mc = ModelConfig(width=8, layers=(1, 1, 1, 1), feature_dim=64, embedding_dim=dim)
    net = backbone_from_config(mc, size, head="embedding", out_dim=dim).eval()
    arch = {k: (list(v) if isinstance(v, tuple) else v) for k, v in mc.__dict__.items()}
    save_model(path, net, arch=arch, geometry=CropGeometry(size, BOX), threshold=0.5, calibration={},
               provenance={}, tta_flip=False)
    return path


def test_identity_training_with_teacher_pulls_student_towards_it(tmp_path, celeba_root):
    teacher = _teacher_file(tmp_path / "teacher.pt")
    over = {"data.box": list(BOX), "data.max_images": 900, "optim.epochs": 4, "optim.batches_per_epoch": 6,
            "identity.teacher": str(teacher), "identity.teacher_views": 2, "identity.distill_weight": 5.0,
            "identity.distill_rel_weight": 1.0, "identity.cls_weight": 0.0, "identity.tta_flip": False}
    cfg = tiny_cfg(tmp_path, celeba_root, task="identity", **over)
    res = fit(cfg, progress=False)
    d = [h["train"]["distill"] for h in res.history]
    assert np.isfinite(d).all() and d[-1] < d[0] - 0.05, d
    assert all(np.isfinite(h["train"]["relational"]) for h in res.history)
    targets = list(Path(cfg.data.cache_dir).glob("teacher-*.npz"))
    assert len(targets) == 1
    from verify.model.file import Embedder, read_model_file

    blob = read_model_file(Path(cfg.out) / "model.pt")
    assert blob["provenance"]["teacher"]["fingerprint"] == Embedder.load(teacher).fingerprint
    assert blob["provenance"]["teacher"]["views"] == 2
    # a second run with the same teacher and data reuses the stored views
    stamp = targets[0].stat().st_mtime_ns
    again = tiny_cfg(tmp_path / "again", celeba_root, task="identity",
                     **{**over, "optim.epochs": 1, "data.cache_dir": cfg.data.cache_dir})
    fit(again, progress=False)
    assert targets[0].stat().st_mtime_ns == stamp
    json.loads((Path(again.out) / "metrics.json").read_text())


def test_teacher_of_another_dimension_is_refused(tmp_path, celeba_root):
    teacher = _teacher_file(tmp_path / "teacher.pt", dim=16)
    cfg = tiny_cfg(tmp_path, celeba_root, task="identity",
                   **{"data.box": list(BOX), "identity.teacher": str(teacher), "optim.epochs": 1})
    with pytest.raises(ValueError, match="16-d vectors, the student 32-d"):
        fit(cfg, progress=False)


def test_non_finite_teacher_stops_with_the_rows():
    class Broken(torch.nn.Module):
        def forward(self, x):
            y = x.flatten(1)[:, :4].clone()
            y[1] = float("nan")
            return y

    images = np.zeros((5, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"non-finite vectors for table rows \[3\]"):
        compute_teacher_targets(Broken(), images, np.array([2, 3, 4]), BatchAugment(hflip=False, rotation=0, zoom=0,
                                shift=0), views=1, seed=0, device=torch.device("cpu"), progress=False)
