"""Device, seeding, logging and atomic file writes: resolved once per run."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

log = logging.getLogger("verify")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda if present, else cpu. An explicit `cuda` without a GPU is an error."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch once per run; returns a torch Generator for samplers."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if mode is not None:
            os.chmod(tmp_path, mode)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def setup_logging(verbose: bool = False) -> None:
    """Used by the CLI only; library code just logs."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # faiss logs its failed attempt to load an AVX2 build at INFO with a traceback-like line.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
