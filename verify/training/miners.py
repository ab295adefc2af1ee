"""Triplet miners: pick (anchor, positive, negative) index triplets from a labelled batch.

Split of roles as in pytorch-metric-learning: a miner only chooses indices (under no_grad); the loss
(verify.training.losses.TripletMarginLoss) computes one value per triplet with gradients. Every miner returns
three int64 tensors of equal length on the embeddings' device, possibly empty (no valid triplet:
a single identity in the batch, or only singletons); the loss then returns a zero with a grad path.
"""

from __future__ import annotations

import torch

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def pairwise_distances(emb: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Euclidean distance matrix (B, B) of emb (B, D), in float32 at least.

    Uses |a|^2 - 2ab + |b|^2, clamped at 0 (rounding can make it slightly negative) and with an exact
    zero diagonal. The sqrt only sees values clamped away from 0 and zero entries are selected with
    `where`, so the gradient is finite (zero) where the distance is 0 instead of NaN.
    """
    if emb.ndim != 2:
        raise ValueError(f"pairwise_distances expects (B, D) embeddings, got shape {tuple(emb.shape)}")
    x = emb.float() if emb.dtype in (torch.float16, torch.bfloat16) else emb
    sq = (x * x).sum(dim=1)  # (B,)
    d2 = sq[:, None] - 2.0 * (x @ x.t()) + sq[None, :]  # (B, B)
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    d2 = d2.clamp_min(0.0).masked_fill(eye, 0.0)
    if squared:
        return d2
    positive = d2 > 0
    return torch.where(positive, d2.clamp_min(1e-16).sqrt(), torch.zeros_like(d2))


def _masks(labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"miner labels must be 1-D of length {n} (one per embedding), got shape {tuple(labels.shape)}")
    same = labels[:, None] == labels[None, :]  # (B, B)
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same  # positive mask, negative mask


def _empty(device: torch.device) -> Triplets:
    e = torch.empty(0, dtype=torch.long, device=device)
    return e, e.clone(), e.clone()


class BatchHardMiner:
    """One triplet per anchor: its farthest positive and its nearest negative (Hermans et al. 2017).

    Anchors without a positive or without a negative in the batch are left out. Ties go to the lowest
    index (torch argmax/argmin order).
    """

    def __init__(self) -> None:
        self.last_num_triplets = 0

    @torch.no_grad()
    def __call__(self, emb: torch.Tensor, labels: torch.Tensor) -> Triplets:
        labels = labels.to(emb.device)
        pos, neg = _masks(labels, len(emb))
        d = pairwise_distances(emb.detach())  # (B, B)
        valid = pos.any(dim=1) & neg.any(dim=1)  # (B,)
        hardest_pos = d.masked_fill(~pos, float("-inf")).argmax(dim=1)  # (B,)
        hardest_neg = d.masked_fill(~neg, float("inf")).argmin(dim=1)  # (B,)
        a = torch.nonzero(valid).flatten()
        self.last_num_triplets = len(a)
        return a, hardest_pos[a], hardest_neg[a]


class SemiHardMiner:
    """For each (anchor, positive) pair, the nearest negative with d(a,p) < d(a,n) < d(a,p) + margin.

    Such negatives are ranked below the positive but still inside the margin, so they give a non-zero
    loss without the collapse that the very hardest negatives can cause (FaceNet, Schroff et al. 2015).

    `fallback` decides what happens to a pair with no semi-hard negative:
    - "skip" (default): the pair gives no triplet. A pair with no negative in the band has either
      only hard negatives (d(a,n) <= d(a,p)) or only satisfied ones (loss 0), so nothing useful is lost
      and zero-loss triplets do not dilute a "mean" reduction.
    - "easy": FaceNet/TF-addons style, take the nearest negative with d(a,n) > d(a,p) if there is one
      (its loss is 0, it only counts in the denominator); pairs with only hard negatives are skipped.
    """

    def __init__(self, margin: float = 0.2, fallback: str = "skip") -> None:
        if margin <= 0:
            raise ValueError(f"SemiHardMiner margin must be > 0, got {margin}")
        if fallback not in ("skip", "easy"):
            raise ValueError(f"SemiHardMiner fallback must be 'skip' or 'easy', got {fallback!r}")
        self.margin = float(margin)
        self.fallback = fallback
        self.last_num_triplets = 0

    @torch.no_grad()
    def __call__(self, emb: torch.Tensor, labels: torch.Tensor) -> Triplets:
        labels = labels.to(emb.device)
        pos, neg = _masks(labels, len(emb))
        if not (pos.any() and neg.any()):
            self.last_num_triplets = 0
            return _empty(emb.device)
        d = pairwise_distances(emb.detach())  # (B, B)
        a, p = torch.nonzero(pos, as_tuple=True)  # (T,) each: all positive pairs, row-major
        d_ap = d[a, p][:, None]  # (T, 1)
        d_an = d[a]  # (T, B)
        beyond = neg[a] & (d_an > d_ap)  # (T, B) negatives ranked below the positive
        band = beyond & (d_an < d_ap + self.margin)
        candidates = band
        if self.fallback == "easy":
            has_band = band.any(dim=1, keepdim=True)
            candidates = torch.where(has_band, band, beyond)
        nearest = d_an.masked_fill(~candidates, float("inf")).argmin(dim=1)  # (T,)
        keep = candidates.any(dim=1)
        self.last_num_triplets = int(keep.sum())
        return a[keep], p[keep], nearest[keep]


class BatchAllMiner:
    """Every valid triplet (a != p same identity, n another identity), in (a, p, n) row-major order.

    With `margin`, only triplets violating it (d(a,p) - d(a,n) + margin > 0) are returned. Memory is
    O(B^3) booleans: fine for the usual B <= 512.
    """

    def __init__(self, margin: float | None = None) -> None:
        self.margin = None if margin is None else float(margin)
        self.last_num_triplets = 0

    @torch.no_grad()
    def __call__(self, emb: torch.Tensor, labels: torch.Tensor) -> Triplets:
        labels = labels.to(emb.device)
        pos, neg = _masks(labels, len(emb))
        valid = pos[:, :, None] & neg[:, None, :]  # (B, B, B): [a, p, n]
        if self.margin is not None and valid.any():
            d = pairwise_distances(emb.detach())  # (B, B)
            valid &= (d[:, :, None] - d[:, None, :] + self.margin) > 0
        a, p, n = torch.nonzero(valid, as_tuple=True)
        self.last_num_triplets = len(a)
        return a, p, n
