"""Shared fixtures: CPU device, seeded generators, and the path to ../shared/data.

Tests that need the real data skip with a clear reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FACEVERIFY_DATA", REPO.parent / "shared" / "data"))


def _need(sub: str) -> Path:
    p = SHARED_DATA / sub
    if not p.exists():
        pytest.skip(f"real data not found at {p} (set FACEVERIFY_DATA to the shared data folder)")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need("")


@pytest.fixture(scope="session")
def celeba_root() -> Path:
    return _need("celeba")


@pytest.fixture(scope="session")
def celeba_half_root() -> Path:
    return _need("celeba_half")


@pytest.fixture(scope="session")
def lfw_root() -> Path:
    return _need("lfw")


@pytest.fixture(scope="session")
def orl_root() -> Path:
    return _need("orl")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _torch_seed():
    try:
        import torch
    except ImportError:  # index/ tests run without torch too
        yield
        return
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
