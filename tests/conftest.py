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


@pytest.fixture(scope="session", autouse=True)
def _private_data_home(tmp_path_factory):
    """Commands that default to the per-user data folder (gallery, library index) never touch the real one."""
    old = os.environ.get("FACEVERIFY_HOME")
    os.environ["FACEVERIFY_HOME"] = str(tmp_path_factory.mktemp("faceverify-home"))
    yield
    if old is None:
        os.environ.pop("FACEVERIFY_HOME", None)
    else:
        os.environ["FACEVERIFY_HOME"] = old


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


TINY_ARCH = {"backbone": "resnet", "width": 8, "layers": [1, 1, 1, 1], "feature_dim": 64, "embedding_dim": 32,
             "dropout": 0.0, "pretrained": None}


def make_tiny_model(path: Path, seed: int = 0, threshold: float = 0.5, calibration: dict | None = None) -> Path:
    """A randomly initialised 48 px model file: for tests of mechanics, not of recognition quality."""
    import torch

    from verify.model.backbones import create_backbone
    from verify.model.geometry import CropGeometry
    from verify.model.write import save_model

    torch.manual_seed(seed)
    net = create_backbone("resnet", input_size=48, width=8, layers=(1, 1, 1, 1), feature_dim=64,
                          head="embedding", out_dim=32)
    save_model(path, net, arch=TINY_ARCH, geometry=CropGeometry(size=48), threshold=threshold,
               calibration=calibration if calibration is not None else {"target_far": 1e-3},
               provenance={"test": "random init"})
    return path
