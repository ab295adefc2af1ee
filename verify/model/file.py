"""One model file: weights + everything needed to use them, loadable with
`torch.load(path, weights_only=True)` (plain dicts, lists, numbers, strings and tensors only)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from verify.model.backbones import Backbone, backbone_from_config
from verify.model.meta import ModelMetaMixin

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_MODEL = Path(__file__).resolve().parent / "shipped" / "default.pt"


class ModelFileError(ValueError):
    pass


def fingerprint(state_dict: dict) -> str:
    """Hash of the weights (names, shapes and values): galleries refuse vectors of another model."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def read_model_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: model file not found")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFileError(f"{p}: not a faceverify model file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(blob, dict) or "format_version" not in blob:
        raise ModelFileError(f"{p}: not a faceverify model file (no format_version)")
    if blob["format_version"] > FORMAT_VERSION:
        raise ModelFileError(f"{p}: model format {blob['format_version']} is newer than this faceverify ({FORMAT_VERSION})")
    return blob


@dataclass
class Embedder(ModelMetaMixin):
    """A loaded model: uint8 face crops in, L2-normalised float32 embeddings out."""

    net: Backbone
    meta: dict
    device: torch.device
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path | None = None, device: torch.device | str = "cpu") -> "Embedder":
        path = Path(path) if path else DEFAULT_MODEL
        blob = read_model_file(path)
        net = backbone_from_config(blob["arch"], blob["geometry"]["size"], head="embedding",
                                   out_dim=int(blob["embedding_dim"]))
        try:
            net.load_state_dict(blob["state_dict"])
        except RuntimeError as e:
            raise ModelFileError(f"{path}: weights do not match the architecture ({str(e).splitlines()[0]})") from None
        device = torch.device(device)
        net.to(device).eval()
        if device.type == "cpu":  # same arithmetic; CPU convolutions run ~1.2-1.4x faster channels-last
            net.to(memory_format=torch.channels_last)
        meta = {k: v for k, v in blob.items() if k != "state_dict"}
        return cls(net, meta, device, path)

    @torch.no_grad()
    def embed(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, S, S, 3) uint8 crops -> (N, D) float32 unit vectors."""
        crops = np.asarray(crops)
        size = self.geometry.size
        if crops.ndim != 4 or crops.shape[1:] != (size, size, 3) or crops.dtype != np.uint8:
            raise ValueError(f"expected uint8 crops of shape (N, {size}, {size}, 3), got {crops.dtype} {crops.shape}")
        mean = torch.tensor(self.meta["normalisation"]["mean"], device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.meta["normalisation"]["std"], device=self.device).view(1, 3, 1, 1)
        out = np.zeros((len(crops), self.dim), dtype=np.float32)
        fmt = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format  # as the net (load)
        for s in range(0, len(crops), batch_size):
            block = np.ascontiguousarray(crops[s : s + batch_size])
            if not block.flags.writeable:  # torch wants writable memory (views of read-only buffers)
                block = block.copy()
            x = torch.from_numpy(block).to(self.device)
            x = (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std  # (B,3,S,S)
            y = self.net(x.contiguous(memory_format=fmt)).float()
            if self.meta.get("tta_flip", True):
                y = y + self.net(torch.flip(x, dims=[3]).contiguous(memory_format=fmt)).float()
            out[s : s + len(x)] = torch.nn.functional.normalize(y, dim=1).cpu().numpy()
        return out
