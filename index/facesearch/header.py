"""What a saved face-search index says about itself: its kinds, its header, its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

FORMAT_VERSION = 1
KINDS = ("flat", "ivf", "ivfpq")
IVF_KINDS = ("ivf", "ivfpq")


class FaceSearchError(ValueError):
    """A face-search file that cannot be used (missing, corrupt, foreign, wrong version)."""


class StaleIndexError(FaceSearchError):
    """The file's key is not the one the caller expected (built from another model or generation)."""


@dataclass(frozen=True)
class IndexHeader:
    """What a saved index says about itself (read without loading the vectors)."""

    n: int
    dim: int
    kind: str
    key: str
    nlist: int | None = None
    nprobe: int | None = None
    created: str = ""
    format_version: int = FORMAT_VERSION
    calibration: dict[str, Any] = field(default_factory=dict)
    pq_m: int | None = None  # ivfpq only: sub-quantisers (bytes of code per face at 8 bits)
    pq_bits: int | None = None  # ivfpq only: bits per sub-quantiser code
    opq: bool | None = None  # ivfpq only: an OPQ rotation precedes the IVF-PQ

    def to_json(self) -> dict[str, Any]:
        obj = {
            "format_version": self.format_version,
            "n": self.n,
            "dim": self.dim,
            "kind": self.kind,
            "key": self.key,
            "metric": "ip",
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "created": self.created,
            "calibration": self.calibration,
        }
        if self.kind == "ivfpq":  # flat / ivf headers stay exactly what they were
            obj.update(pq_m=self.pq_m, pq_bits=self.pq_bits, opq=self.opq)
        return obj

    @property
    def code_bytes(self) -> float | None:
        """Bytes of PQ code per face (ivfpq), not counting the 8-byte id every IVF list keeps."""
        return None if self.pq_m is None or self.pq_bits is None else self.pq_m * self.pq_bits / 8



def now_utc() -> str:
    """The header's `created` stamp: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
