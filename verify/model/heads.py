"""Heads that sit on a backbone's pooled features: stage 1 predicts 40 attribute logits, stage 2
produces an L2-normalised embedding."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AttributeHead(nn.Module):
    """Multi-label logits; trained with BCE-with-logits (never sigmoid + categorical CE)."""

    def __init__(self, in_features: int, num_attributes: int = 40, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_attributes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, 40)
        return self.fc(self.dropout(f))


class EmbeddingHead(nn.Module):
    """Linear -> BatchNorm -> L2 normalise: unit vectors, so inner product = cosine similarity."""

    def __init__(self, in_features: int, embedding_dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(embedding_dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, D), ||row|| = 1
        return F.normalize(self.bn(self.fc(self.dropout(f))).float(), dim=1)


def make_head(kind: str, in_features: int, out_dim: int, dropout: float = 0.0) -> nn.Module:
    if kind == "attributes":
        return AttributeHead(in_features, out_dim, dropout)
    if kind == "embedding":
        return EmbeddingHead(in_features, out_dim, dropout)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown head {kind!r}: attributes | embedding | none")
