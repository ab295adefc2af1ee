"""What every embedder exposes from its model file's metadata (no torch): the PyTorch `Embedder` and
the ONNX Runtime `OnnxEmbedder` share it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from verify.model.geometry import CropGeometry

if TYPE_CHECKING:
    from verify.model.cohort import CohortSources


class ModelMetaMixin:
    """Read-only views of `self.meta` (the model file's dict without its weights)."""

    meta: dict

    @property
    def geometry(self) -> CropGeometry:
        return CropGeometry.from_dict(self.meta["geometry"])

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def similarity_threshold(self) -> float:
        """The model's pair threshold: accept when cosine similarity >= this."""
        return float(self.meta["threshold"])

    @property
    def cohort(self) -> np.ndarray | None:
        """(C, D) float32 impostor cohort of the model, or None: the file beside the model
        (`<stem>.cohort.npz`, what `attach_cohort` writes), else the copy inside the model file that
        earlier releases carried. Read once (kept in meta["extra"], which pickling leaves behind)."""
        extra = self.meta.get("extra")
        c = (extra or {}).get("cohort")
        if c is None:
            from verify.model.cohort import read_cohort_vectors

            found = read_cohort_vectors(getattr(self, "path", None))
            if found is None:
                return None
            c, source = found
            extra = self.meta["extra"] = dict(extra or {})
            extra["cohort"] = c
            extra.setdefault("cohort_source", source)
        return np.asarray(c.float().numpy() if hasattr(c, "float") and hasattr(c, "numpy") else c, dtype=np.float32)

    @property
    def cohort_sources(self) -> "CohortSources | None":
        """Per-row source labels of the cohort (verify.model.cohort), from the file beside the model; None
        without one (or for another cohort). Read once."""
        if not hasattr(self, "_cohort_sources"):
            from verify.model.cohort import read_cohort_sources

            self._cohort_sources = read_cohort_sources(getattr(self, "path", None), self.cohort)
        return self._cohort_sources

    @property
    def dim(self) -> int:
        return int(self.meta["embedding_dim"])
