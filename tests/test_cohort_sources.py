"""verify.model.cohort: the cohort's per-row source labels beside the model, tied to the cohort's bytes;
and the shipped model's labels, read by both runtimes."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from verify.model.cohort import CohortSources, read_cohort_sources, sources_path, write_cohort_sources
from verify.model.file import DEFAULT_MODEL


def _labels(n: int) -> CohortSources:
    return CohortSources(np.repeat([0, 1], [n // 2, n - n // 2]).astype(np.uint8), ("lfw", "utkface"),
                         np.r_[np.arange(n // 2) // 3, np.full(n - n // 2, -1)].astype(np.int32))


def test_labels_round_trip_and_refuse_another_cohort(tmp_path, rng, caplog):
    cohort = rng.standard_normal((40, 8)).astype(np.float16)
    model = tmp_path / "m.pt"
    out = write_cohort_sources(model, cohort, _labels(40))
    assert out == sources_path(tmp_path / "m.onnx") == tmp_path / "m.cohort-sources.npz"
    got = read_cohort_sources(model, cohort.astype(np.float32))  # as the model reports it: float32 of float16
    assert got is not None and got.names == ("lfw", "utkface") and got.counts() == {"lfw": 20, "utkface": 20}
    np.testing.assert_array_equal(got.persons, _labels(40).persons)
    # another cohort (one value changed) does not borrow these labels: None, and a log line says why
    other = cohort.copy()
    other[3, 2] += 1
    with caplog.at_level(logging.WARNING):
        assert read_cohort_sources(model, other) is None
    assert "another cohort" in caplog.text
    # a damaged file: None and a warning naming it, never an exception on the verify path
    out.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING):
        assert read_cohort_sources(model, cohort) is None
    assert str(out) in caplog.text
    with pytest.raises(ValueError, match="labels for a cohort"):
        write_cohort_sources(model, cohort, _labels(30))


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="shipped model missing")
def test_shipped_cohort_has_its_labels_under_both_runtimes():
    from verify.model.onnx_embedder import OnnxEmbedder
    from verify.model.file import Embedder

    torch_labels = Embedder.load(DEFAULT_MODEL).cohort_sources
    onnx = OnnxEmbedder.load(DEFAULT_MODEL.with_suffix(".onnx"))
    assert torch_labels is not None and onnx.cohort_sources is not None
    counts = torch_labels.counts()
    assert list(counts) == ["lfw", "celeba", "utkface", "allagefaces", "scut-fbp5500", "genki-4k"]
    assert sum(counts.values()) == len(onnx.cohort) and min(counts.values()) >= 1000
    np.testing.assert_array_equal(torch_labels.codes, onnx.cohort_sources.codes)
