"""Which runtime runs the product path's networks (MTCNN's three and the embedding model).

- "onnx": ONNX Runtime on the CPU, from runtime graphs (verify/model/shipped/mtcnn/*.onnx, and `<model>.onnx`
  beside each model file). Imports neither torch, torchvision nor facenet_pytorch: a process starts in
  a fraction of a second with a fraction of the memory, and a machine that only runs the product needs
  none of them (the base install).
- "torch": PyTorch (the `train` extra), as training and the parity tests use it; the GPU path.
- "auto" (the default): "torch" when a CUDA device is asked for, or when one is present
  (/dev/nvidiactl) and PyTorch is installed; "onnx" otherwise.

This module imports neither runtime itself.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from verify.model.onnx_session import RuntimeDevice  # noqa: F401  (re-exported: callers name it here)

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnx", "torch")
TRAIN_EXTRA_HINT = "install the training extra: pip install 'faceverify[train]'"


class RuntimeUnavailable(RuntimeError):
    """The runtime asked for cannot run here (one line)."""


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl")


def choose_runtime(runtime: str = "auto", device: str = "auto") -> str:
    """"onnx" or "torch" for a runtime name and a device name (auto | cpu | cuda)."""
    name, dev = (runtime or "auto").lower(), (device or "auto").lower()
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use {', '.join(RUNTIMES)}")
    if name == "auto":
        wants_gpu = dev.startswith("cuda") or (dev == "auto" and gpu_present() and torch_installed())
        name = "torch" if wants_gpu else "onnx"
    if name == "torch" and not torch_installed():
        raise RuntimeUnavailable(f"the PyTorch runtime is not installed here ({TRAIN_EXTRA_HINT}), "
                                 "or use --runtime onnx on the CPU")
    if name == "onnx" and dev.startswith("cuda"):
        raise RuntimeUnavailable("--runtime onnx runs on the CPU; use --runtime torch (or auto) for --device cuda")
    return name


def load_embedder(model: str | os.PathLike | None = None, device: str = "auto", runtime: str = "auto",
                  threads: int = 0) -> Any:
    """The embedding model for the product path: an OnnxEmbedder (runtime "onnx") or a PyTorch
    Embedder. With runtime "auto", a model file whose runtime graph is missing or stale gets one made
    beside it when PyTorch is installed (`faceverify model export` does it explicitly); otherwise a
    missing, stale or corrupt graph is a one-line RuntimeGraphError naming it."""
    chosen = choose_runtime(runtime, device)
    if chosen == "torch":
        from verify.model.file import Embedder
        from verify.model.device import resolve_device

        return Embedder.load(model, resolve_device(device))
    from verify.model.onnx_embedder import OnnxEmbedder
    from verify.model.onnx_session import RuntimeGraphError

    try:
        return OnnxEmbedder.load(model, threads=threads)
    except RuntimeGraphError as e:
        pt = Path(model) if model else None
        if runtime != "auto" or pt is None or pt.suffix == ".onnx" or not pt.is_file() or not torch_installed():
            raise
        log.info("%s; making it from %s", e, pt)
        from verify.model.graph import export_runtime_graph

        try:
            export_runtime_graph(pt)
        except OSError as oe:  # e.g. a read-only folder: run this model with PyTorch instead
            log.warning("%s: cannot write its runtime graph (%s); running it with PyTorch", pt, oe.strerror or oe)
            from verify.model.file import Embedder

            return Embedder.load(pt, "cpu")
        return OnnxEmbedder.load(pt, threads=threads)
