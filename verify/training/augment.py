"""Augmentation on whole batches of tensors: one affine_grid + grid_sample per batch.

Replaces per-image PIL transforms: random horizontal flip, rotation, zoom and shift are one random
affine matrix per image, applied to the batch at once (bilinear, border padding); brightness and
contrast jitter are per-image multiplications. Every random number comes from a torch.Generator on
the CPU, so a seed gives the same batch on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from verify.model.geometry import NORMALISATION

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's contrast uses


def _stats(normalisation: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(normalisation["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(normalisation["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def _normalise(u: torch.Tensor, hi: float, normalisation: Mapping[str, Any]) -> torch.Tensor:
    """[0, hi] -> (u / hi - mean) / std as one fused multiply-add pass (this runs on every batch)."""
    mean, std = _stats(normalisation, u.device)
    return torch.addcmul(-mean / std, u, 1.0 / (hi * std))


def to_float(x: torch.Tensor, normalisation: Mapping[str, Any] = NORMALISATION) -> torch.Tensor:
    """uint8 (B,3,S,S) in [0,255] -> float32 normalised with `normalisation` ([-1,1] by default)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {x.dtype}")
    return _normalise(x.float(), 255.0, normalisation)  # the same arithmetic as BatchAugment


def batch_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B,S,S,3) array (e.g. rows gathered from the image cache) -> uint8 tensor (B,3,S,S)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected a (B, S, S, 3) array, got shape {images.shape}")
    a = np.ascontiguousarray(images)
    if not a.flags.writeable:  # read-only memmaps / PIL buffers: torch wants a writable array
        a = a.copy()
    return torch.from_numpy(a).permute(0, 3, 1, 2)


@dataclass
class AugmentParams:
    """One batch's random draw; all (B,) or (B,2) CPU tensors."""

    flip: torch.Tensor  # bool
    angle: torch.Tensor  # radians
    scale: torch.Tensor  # > 1 magnifies the content
    shift: torch.Tensor  # (B,2) fraction of width/height
    brightness: torch.Tensor  # multiplicative factor
    contrast: torch.Tensor  # factor around the per-image grey mean


class BatchAugment(nn.Module):
    """Random flip, rotation (+-`rotation` degrees), zoom (scale in [1-zoom, 1+zoom]), shift (+-`shift`
    of the width/height), and optional brightness/contrast factors in [1-b, 1+b] / [1-c, 1+c].

    Input: uint8 (B,3,H,W), or float already normalised (as `to_float` makes). Output: normalised
    float32. With everything off it is the identity (uint8 input: exactly `to_float`).
    """

    def __init__(
        self,
        hflip: bool = True,
        rotation: float = 20.0,
        zoom: float = 0.2,
        shift: float = 0.1,
        brightness: float = 0.0,
        contrast: float = 0.0,
        normalisation: Mapping[str, Any] = NORMALISATION,
    ) -> None:
        super().__init__()
        for name, v, hi in (("rotation", rotation, 180.0), ("zoom", zoom, 0.99), ("shift", shift, 1.0),
                            ("brightness", brightness, 1.0), ("contrast", contrast, 1.0)):  # fmt: skip
            if not 0.0 <= v <= hi:
                raise ValueError(f"augment {name} must be in [0, {hi}], got {v}")
        self.hflip, self.rotation, self.zoom, self.shift = bool(hflip), float(rotation), float(zoom), float(shift)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.normalisation = {"mean": list(normalisation["mean"]), "std": list(normalisation["std"])}

    @classmethod
    def from_config(cls, cfg: Any) -> "BatchAugment":
        """From verify.config.AugmentConfig (or its dict): `color` sets brightness and contrast."""
        c = cfg if isinstance(cfg, Mapping) else vars(cfg)
        color = float(c.get("color", 0.0))
        return cls(
            hflip=c.get("hflip", True), rotation=c.get("rotation", 0.0), zoom=c.get("zoom", 0.0),
            shift=c.get("shift", 0.0), brightness=c.get("brightness", color), contrast=c.get("contrast", color),
        )  # fmt: skip

    @property
    def geometric(self) -> bool:
        return self.rotation > 0 or self.zoom > 0 or self.shift > 0

    @property
    def active(self) -> bool:
        return self.hflip or self.geometric or self.brightness > 0 or self.contrast > 0

    def extra_repr(self) -> str:
        return (f"hflip={self.hflip}, rotation={self.rotation}, zoom={self.zoom}, shift={self.shift}, "
                f"brightness={self.brightness}, contrast={self.contrast}")  # fmt: skip

    def sample(self, batch: int, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw the random parameters for `batch` images (on the CPU, from `generator`)."""

        def uniform(*shape: int, amount: float) -> torch.Tensor:  # U[-amount, amount]
            return (torch.rand(*shape, generator=generator) * 2 - 1) * amount

        # always draw every field, so a config change in one field does not reshuffle the others
        flip = torch.rand(batch, generator=generator) < 0.5
        angle = uniform(batch, amount=math.radians(self.rotation))
        scale = 1 + uniform(batch, amount=self.zoom)
        shift = uniform(batch, 2, amount=self.shift)
        brightness = 1 + uniform(batch, amount=self.brightness)
        contrast = 1 + uniform(batch, amount=self.contrast)
        if not self.hflip:
            flip = torch.zeros_like(flip)
        return AugmentParams(flip, angle, scale, shift, brightness, contrast)

    @staticmethod
    def theta(p: AugmentParams, height: int, width: int) -> torch.Tensor:
        """(B,2,3) matrices for F.affine_grid: output pixel -> input pixel in normalised coordinates.

        In pixels the input point is R(angle)/scale @ flip(out) + shift; normalised coordinates scale x
        by 2/W and y by 2/H, so the off-diagonal terms take the aspect ratio (rotation stays rigid).
        """
        cos, sin = torch.cos(p.angle) / p.scale, torch.sin(p.angle) / p.scale  # (B,)
        f = 1.0 - 2.0 * p.flip.float()  # -1 mirrors the output x
        theta = torch.zeros(len(f), 2, 3)
        theta[:, 0, 0] = cos * f
        theta[:, 0, 1] = -sin * (height / width)
        theta[:, 1, 0] = sin * f * (width / height)
        theta[:, 1, 1] = cos
        theta[:, :, 2] = p.shift * 2  # a fraction of the size is twice that in [-1, 1] units
        return theta

    def apply_unit(self, u: torch.Tensor, p: AugmentParams, hi: float = 1.0) -> torch.Tensor:
        """Apply drawn parameters to float images with values in [0, hi] (1 or 255), (B,3,H,W) -> same.

        Resampling and the jitter are linear in the values, so uint8 data needs no rescaling first."""
        b, _, h, w = u.shape
        if self.geometric:
            theta = self.theta(p, h, w).to(u.device)
            grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)  # (B,H,W,2)
            u = F.grid_sample(u, grid, mode="bilinear", padding_mode="border", align_corners=False)
        elif self.hflip:  # flips alone: exact and cheaper than resampling
            flip = p.flip.to(u.device).view(b, 1, 1, 1)
            u = torch.where(flip, u.flip(-1), u)
        if self.brightness > 0:
            u = (u * p.brightness.to(u.device).view(b, 1, 1, 1)).clamp_(0, hi)
        if self.contrast > 0:
            luma = torch.tensor(_LUMA, device=u.device).view(1, 3, 1, 1)
            grey = (u * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # (B,1,1,1)
            c = p.contrast.to(u.device).view(b, 1, 1, 1)
            u = ((u - grey) * c + grey).clamp_(0, hi)
        return u

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, params: AugmentParams | None = None
    ) -> torch.Tensor:
        """uint8 or normalised float (B,3,H,W) -> augmented normalised float32 (B,3,H,W)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"BatchAugment expects (B, 3, H, W), got {tuple(x.shape)}")
        if not self.active:
            return to_float(x, self.normalisation) if x.dtype == torch.uint8 else x.float()
        if x.dtype == torch.uint8:
            u, hi = x.float(), 255.0  # (B,3,H,W) in [0,255]
        else:
            mean, std = _stats(self.normalisation, x.device)
            u, hi = x.float() * std + mean, 1.0  # back to [0,1]
        if params is None:
            params = self.sample(x.shape[0], generator)
        return _normalise(self.apply_unit(u, params, hi), hi, self.normalisation)


def augment_views(
    image: np.ndarray | torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    include_original: bool = True,
    **augment: Any,
) -> np.ndarray:
    """`n` augmented uint8 views (n, H, W, 3) of one uint8 image (H, W, 3), e.g. to enrol one photo.

    `augment` are BatchAugment arguments; with `include_original` view 0 is the image itself.
    """
    arr = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"augment_views expects a uint8 (H, W, 3) image, got {arr.dtype} {arr.shape}")
    if n < 1:
        raise ValueError(f"augment_views needs n >= 1, got {n}")
    aug = BatchAugment(**augment)
    x = batch_to_tensor(arr[None]).expand(n, -1, -1, -1)  # (n,3,H,W) uint8, no copy
    u = x.float()  # (n,3,H,W) in [0,255]
    if aug.active:
        u = aug.apply_unit(u, aug.sample(n, generator), hi=255.0)
    out = np.ascontiguousarray(u.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())  # (n,H,W,3)
    if include_original:
        out[0] = arr
    return out
