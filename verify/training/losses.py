"""Metric-learning losses: triplet margin loss on mined triplets, CosFace and ArcFace identity heads,
and the distillation terms that pull a student's unit embeddings towards a teacher's.

All of them compute in float32 even under AMP: margins of 0.2 on unit vectors and scales of 30-64
on cosines are too coarse for float16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("mean", "sum", "none", "mean_active")
DISTANCES = ("euclidean", "squared", "cosine")


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class TripletMarginLoss(nn.Module):
    """Per-triplet `relu(d(a,p) - d(a,n) + margin)`, then `reduction`.

    - distance: "euclidean" (default), "squared" (squared euclidean) or "cosine" (1 - cosine similarity).
    - reduction: "mean" over all triplets, "sum", "none" (per-triplet values, shape (T,)), or
      "mean_active": mean over the triplets with loss > 0 (the rest give no gradient anyway, so a
      plain mean shrinks as training succeeds).
    - No triplet (or no active one for mean_active) gives a 0 that still depends on `emb`, so
      backward() works and yields zero gradients instead of NaN.
    - `last_active_fraction`: fraction of triplets with loss > 0 in the last call (0.0 if none), for logs.
    """

    def __init__(self, margin: float = 0.2, reduction: str = "mean", distance: str = "euclidean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"TripletMarginLoss reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if distance not in DISTANCES:
            raise ValueError(f"TripletMarginLoss distance must be one of {DISTANCES}, got {distance!r}")
        if margin < 0:
            raise ValueError(f"TripletMarginLoss margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.reduction = reduction
        self.distance = distance
        self.last_active_fraction = 0.0
        self.last_num_triplets = 0

    def _dist(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.distance == "cosine":
            return 1.0 - F.cosine_similarity(x, y, dim=1, eps=1e-8)
        d2 = (x - y).pow(2).sum(dim=1)  # (T,)
        if self.distance == "squared":
            return d2
        # Clamp before sqrt so identical points give a zero gradient, not NaN.
        return torch.where(d2 > 0, d2.clamp_min(1e-16).sqrt(), torch.zeros_like(d2))

    def forward(self, emb: torch.Tensor, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if not (len(a) == len(p) == len(n)):
            raise ValueError(f"triplet index tensors differ in length: a={len(a)}, p={len(p)}, n={len(n)}")
        with _no_autocast(emb.device):
            x = emb.float() if emb.dtype in (torch.float16, torch.bfloat16) else emb  # (B, D)
            zero = x.sum() * 0.0  # keeps a grad path when there is nothing to average
            self.last_num_triplets = len(a)
            if len(a) == 0:
                self.last_active_fraction = 0.0
                return x.new_zeros(0) if self.reduction == "none" else zero
            per = F.relu(self._dist(x[a], x[p]) - self._dist(x[a], x[n]) + self.margin)  # (T,)
            active = per > 0
            self.last_active_fraction = float(active.float().mean())
            if self.reduction == "none":
                return per
            if self.reduction == "sum":
                return per.sum()
            if self.reduction == "mean":
                return per.mean()
            n_active = int(active.sum())
            return per.sum() / n_active if n_active else zero


class MarginCosineProduct(nn.Module):
    """CosFace logits (Wang et al. 2018): `scale * (cos(theta_j) - margin * [j == y])`.

    cos(theta_j) is the cosine between the embedding and class j's weight row; both are L2-normalised
    here, so the head works on any embedding. Without labels it returns plain `scale * cos`.
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.35) -> None:
        super().__init__()
        if embedding_dim < 1 or num_classes < 2:
            raise ValueError(f"need embedding_dim >= 1 and num_classes >= 2, got {embedding_dim}, {num_classes}")
        self.embedding_dim, self.num_classes = int(embedding_dim), int(num_classes)
        self.scale, self.margin = float(scale), float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))  # (C, D)
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, C) cosines between embeddings and class weights, in float32."""
        if emb.ndim != 2 or emb.shape[1] != self.embedding_dim:
            raise ValueError(f"expected embeddings of shape (B, {self.embedding_dim}), got {tuple(emb.shape)}")
        with _no_autocast(emb.device):
            return F.normalize(emb.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t()

    def _check_labels(self, labels: torch.Tensor, batch: int) -> torch.Tensor:
        labels = labels.long()
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        if batch and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must be class ids in [0, {self.num_classes}), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return labels

    def _target_logit(self, cos_y: torch.Tensor) -> torch.Tensor:
        return cos_y - self.margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(emb)  # (B, C)
        if labels is None:
            return self.scale * cos
        labels = self._check_labels(labels.to(cos.device), len(cos))
        with _no_autocast(cos.device):
            cos_y = cos.gather(1, labels[:, None])  # (B, 1)
            logits = cos.scatter(1, labels[:, None], self._target_logit(cos_y))
            return self.scale * logits


class CosFaceLoss(MarginCosineProduct):
    """CosFace identity-classification loss: mean cross-entropy over the margin logits.

    Call `loss(emb, labels)`; `last_accuracy` holds the top-1 accuracy of the plain cosines in the
    last call (for logs). `logits(emb)` gives the margin-free scores for inference.
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.35) -> None:
        super().__init__(embedding_dim, num_classes, scale, margin)
        self.last_accuracy = 0.0

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return MarginCosineProduct.forward(self, emb, None)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        margin_logits = MarginCosineProduct.forward(self, emb, labels)  # (B, C) float32
        with torch.no_grad():
            plain = self.scale * self.cosine(emb.detach())
            self.last_accuracy = float((plain.argmax(1) == labels.to(plain.device)).float().mean()) if len(plain) else 0.0
        with _no_autocast(margin_logits.device):
            return F.cross_entropy(margin_logits, labels.to(margin_logits.device).long())


class ArcFaceLoss(CosFaceLoss):
    """ArcFace (Deng et al. 2019): target logit `scale * cos(theta_y + margin)`, then mean CE.

    cos(theta + m) is not monotonic once theta + m > pi, so past the threshold theta > pi - m the
    target logit becomes `cos(theta) - sin(pi - m) * m` (the insightface trick, a CosFace-like margin).
    With `easy_margin` the margin applies only where cos(theta) > 0 and is dropped elsewhere.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.5,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(embedding_dim, num_classes, scale, margin)
        if not 0 <= margin < math.pi / 2:
            raise ValueError(f"ArcFaceLoss margin must be in [0, pi/2) radians, got {margin}")
        self.easy_margin = bool(easy_margin)
        self._cos_m, self._sin_m = math.cos(margin), math.sin(margin)
        self._th = math.cos(math.pi - margin)
        self._mm = math.sin(math.pi - margin) * margin

    def _target_logit(self, cos_y: torch.Tensor) -> torch.Tensor:
        # Clamp keeps sqrt's gradient finite when cos is exactly +-1.
        sin_y = (1.0 - cos_y.pow(2)).clamp(1e-12, 1.0).sqrt()
        phi = cos_y * self._cos_m - sin_y * self._sin_m  # cos(theta + m)
        if self.easy_margin:
            return torch.where(cos_y > 0, phi, cos_y)
        return torch.where(cos_y > self._th, phi, cos_y - self._mm)


def _reduce(per: torch.Tensor, reduction: str, name: str) -> torch.Tensor:
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    if reduction == "none":
        return per
    raise ValueError(f"{name} reduction must be one of mean, sum, none; got {reduction!r}")


def cosine_distill_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """1 - cos(student, teacher) per row; both (B, D), unit rows."""
    per = 1.0 - (student * teacher).sum(1)  # (B,)
    return _reduce(per, reduction, "cosine_distill_loss")


def relational_distill_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Squared difference of the batch's cosine-similarity matrices, off the diagonal (B*(B-1) pairs)."""
    b = student.shape[0]
    diff = (student @ student.T - teacher @ teacher.T) ** 2  # (B, B)
    per = diff[~torch.eye(b, dtype=torch.bool, device=diff.device)]  # (B*(B-1),)
    return _reduce(per, reduction, "relational_distill_loss")
