"""The model file: one torch.load(weights_only=True)-safe dict that rebuilds the same embedder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verify.model.file import DEFAULT_MODEL, Embedder, ModelFileError, fingerprint, read_model_file

from conftest import make_tiny_model

KEYS = {"format_version", "arch", "state_dict", "geometry", "normalisation", "embedding_dim", "threshold",
        "calibration", "provenance", "fingerprint", "tta_flip"}


def test_round_trip_weights_only(tmp_path, rng):
    path = make_tiny_model(tmp_path / "m.pt", seed=3, threshold=0.42)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert KEYS <= set(blob)
    assert blob["fingerprint"] == fingerprint(blob["state_dict"])
    emb = Embedder.load(path)
    assert emb.similarity_threshold == pytest.approx(0.42) and emb.dim == 32 and emb.geometry.size == 48
    crops = rng.integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
    a, b = emb.embed(crops), Embedder.load(path).embed(crops)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # batch size does not change the result
    np.testing.assert_allclose(emb.embed(crops, batch_size=2), a, atol=1e-5)
    # another seed, another fingerprint
    assert Embedder.load(make_tiny_model(tmp_path / "n.pt", seed=4)).fingerprint != emb.fingerprint
    with pytest.raises(ValueError, match="uint8 crops"):
        emb.embed(crops[:, :40])


def test_bad_model_files_name_the_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        read_model_file(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="junk.pt: not a faceverify model file"):
        Embedder.load(junk)
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="no format_version"):
        Embedder.load(tmp_path / "other.pt")


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="shipped model missing")
def test_shipped_model_is_complete():
    blob = torch.load(DEFAULT_MODEL, map_location="cpu", weights_only=True)
    assert KEYS <= set(blob)
    assert blob["calibration"]["target_far"] == 1e-3 and 0 < blob["calibration"]["far"] <= 1e-3
    assert blob["extra"]["cohort"].shape[1] == blob["embedding_dim"]
    assert blob["provenance"]["celeba_test"]["auc"] > 0.75
    assert DEFAULT_MODEL.stat().st_size < 25 * 2**20
