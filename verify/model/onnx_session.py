"""ONNX Runtime sessions for the light product path (no torch): one place that opens a runtime graph,
picks the execution provider and turns a missing or corrupt file into one line naming it.

Imports onnxruntime only when a session is opened, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeDevice:
    """A device outside torch, with the one attribute callers read (`type`, as torch.device has)."""

    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


class RuntimeGraphError(ValueError):
    """A runtime graph that cannot be used: the message is one line and names the file."""


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def providers_for(device: str = "auto") -> list[str]:
    """Execution providers for a device name: `cpu`, `cuda`, or `auto` (CUDA when onnxruntime has it)."""
    name = (device or "auto").lower()
    have = available_providers()
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "auto":
        return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in have else []) + ["CPUExecutionProvider"]
    if name.startswith("cuda"):
        if "CUDAExecutionProvider" not in have:
            raise RuntimeError("device 'cuda' requested but onnxruntime has no CUDA provider here "
                               "(install onnxruntime-gpu, or use --device cpu or auto)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")


def open_session(path: str | os.PathLike, *, threads: int = 1, providers: Sequence[str] | None = None) -> Any:
    """An `onnxruntime.InferenceSession` of the graph at `path` with `threads` intra-op threads
    (0 = onnxruntime's default). Raises RuntimeGraphError (one line, naming the file) when the file is
    missing, unreadable or not a valid graph."""
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise RuntimeGraphError(f"{p}: runtime graph not found")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: onnxruntime's own warnings would bypass logging
    try:
        return ort.InferenceSession(str(p), sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeGraphError(f"{p}: not a usable runtime graph ({first[:200]})") from None
