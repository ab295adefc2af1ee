"""Face detection: MTCNN (facenet-pytorch's networks) in batches, boxes and landmarks in the original
image's pixel coordinates (pixel centres: the centre of pixel (i, j) is at x=i, y=j)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from verify.faces.load import shrink

log = logging.getLogger(__name__)


def to_original(points: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """(..., 2) points (x, y) of a shrunk image -> the original image's pixels, where `scale` is the
    original pixels per shrunk pixel (x, y). Pixel centres: centre i of the shrunk image sits at
    (i + 0.5) * s - 0.5 in the original."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * np.asarray(scale, dtype=np.float64) - 0.5


def face_to_original(face: "Face", scale: tuple[float, float]) -> "Face":
    """The same face with its box and landmarks in the original image's pixels (see `to_original`)."""
    if tuple(scale) == (1.0, 1.0):
        return face
    box = to_original(np.asarray(face.box).reshape(2, 2), scale).reshape(4)
    return Face(box=tuple(float(v) for v in box), prob=face.prob,
                landmarks=to_original(face.landmarks, scale).astype(np.float32))


@dataclass(eq=False)
class Face:
    """One detected face in image pixel coordinates."""

    box: tuple[float, float, float, float]  # (x1, y1, x2, y2); may extend past the image edge
    prob: float
    landmarks: np.ndarray  # (5, 2) float32: left eye, right eye, nose, mouth left, mouth right

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


@dataclass(frozen=True)
class DetectorConfig:
    """MTCNN settings. Sizes are in pixels of the original image."""

    min_face_size: int = 20  # faces smaller than this (box side) are dropped
    min_prob: float = 0.90  # final (O-net) probability below this is dropped
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # MTCNN P/R/O-net thresholds
    factor: float = 0.709  # image pyramid scale step
    max_side: int = 1600  # longer images are downscaled for detection, results mapped back
    batch_size: int = 16  # equal-sized images detected together
    device: str = "auto"
    runtime: str = "auto"  # onnx | torch | auto (verify.model.runtimes.choose_runtime); same faces either way
    threads: int = 0  # ONNX Runtime intra-op threads (0: one per core); scan workers use 1

    def __post_init__(self) -> None:
        if self.min_face_size < 1:
            raise ValueError(f"min_face_size must be >= 1, got {self.min_face_size}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {self.min_prob}")
        if len(self.thresholds) != 3:
            raise ValueError(f"thresholds must have 3 values, got {self.thresholds}")
        if self.max_side < 64:
            raise ValueError(f"max_side must be >= 64, got {self.max_side}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.runtime not in ("auto", "onnx", "torch"):
            raise ValueError(f"runtime must be auto, onnx or torch, got {self.runtime!r}")
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))


class FaceDetector:
    """MTCNN (facenet-pytorch's networks) loaded once, under ONNX Runtime or PyTorch (`config.runtime`);
    `detect` returns faces per image, largest first.

    On an image downscaled for detection (longer side > max_side) the smallest face found is
    min_face_size / scale original pixels.
    """

    def __init__(self, config: DetectorConfig | None = None, **overrides: object) -> None:
        from verify.model.runtimes import RuntimeDevice, choose_runtime

        config = config or DetectorConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)  # type: ignore[arg-type]
        self.config = config
        self.runtime = choose_runtime(config.runtime, config.device)
        self._mtcnn = self._onnx = None
        if self.runtime == "onnx":  # no torch import (verify/faces/mtcnn_onnx.py)
            from verify.faces.mtcnn_onnx import OnnxMTCNN

            self.device = RuntimeDevice("cpu")
            self._onnx = OnnxMTCNN(threads=config.threads)
            return
        from facenet_pytorch import MTCNN  # heavy import, only when a detector is built

        from verify.model.device import resolve_device

        self.device = resolve_device(config.device)
        self._mtcnn = MTCNN(
            min_face_size=max(12, int(config.min_face_size)),  # MTCNN's smallest window is 12 px
            thresholds=list(config.thresholds),
            factor=config.factor,
            keep_all=True,
            select_largest=True,
            device=self.device,
        ).eval()

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Validate and (for large images) downscale; returns the image and the x/y scale back."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            raise ValueError(f"detect expects (H, W, 3) uint8 RGB arrays, got shape {shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"detect expects uint8 images, got {image.dtype}")
        small, (sx, sy) = shrink(image, self.config.max_side)
        return small, sx, sy

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """Faces for each (H, W, 3) uint8 RGB image, sorted by box area (largest first)."""
        prepared = [self._prepare(img) for img in images]
        results: list[list[Face]] = [[] for _ in prepared]
        # MTCNN batches only equal-sized images: group by shape, then chunk.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (small, _, _) in enumerate(prepared):
            groups.setdefault(small.shape, []).append(i)
        bs = self.config.batch_size
        smallest = max(12, self.config.min_face_size)  # MTCNN's pyramid is empty below this
        for shape, idxs in groups.items():
            if min(shape[0], shape[1]) < smallest:
                continue  # too small to hold a face (and MTCNN would crash on it)
            for start in range(0, len(idxs), bs):
                chunk = idxs[start : start + bs]
                batch = np.stack([prepared[i][0] for i in chunk])  # (B, H, W, 3) uint8
                for j, (boxes, probs, points) in enumerate(self._detect_batch(batch)):
                    _, sx, sy = prepared[chunk[j]]
                    results[chunk[j]] = self._faces(boxes, probs, points, sx, sy)
        return results

    def _detect_batch(self, batch: np.ndarray) -> list[tuple]:
        """(boxes, probs, points) per image of an equal-sized (B, H, W, 3) batch."""
        c = self.config
        if self._onnx is not None:
            out = self._onnx.detect_faces(batch, max(12, int(c.min_face_size)), c.thresholds, c.factor)
            return [(b[:, :4], b[:, 4], p) for b, p in out]
        if self.device.type == "cpu":  # same networks and results, vectorised crops (verify/mtcnn.py)
            from verify.faces.mtcnn import detect_faces

            m = self._mtcnn
            out = detect_faces(batch, m.pnet, m.rnet, m.onet, m.min_face_size, m.thresholds, m.factor)
            return [(b[:, :4], b[:, 4], p) for b, p in out]
        boxes, probs, points = self._mtcnn.detect(batch, landmarks=True)
        return list(zip(boxes, probs, points))

    def _faces(self, boxes, probs, points, sx: float, sy: float) -> list[Face]:
        if boxes is None or len(boxes) == 0:
            return []
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (N, 4)
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)  # (N,)
        points = np.asarray(points, dtype=np.float64).reshape(-1, 5, 2)  # (N, 5, 2)
        if sx != 1.0 or sy != 1.0:
            boxes = to_original(boxes.reshape(-1, 2, 2), (sx, sy)).reshape(-1, 4)
            points = to_original(points, (sx, sy))
        faces = []
        for box, prob, pts in zip(boxes, probs, points):
            face = Face(box=tuple(float(v) for v in box), prob=float(prob), landmarks=pts.astype(np.float32))
            if face.prob < self.config.min_prob:
                continue
            if min(face.width, face.height) < self.config.min_face_size:
                continue
            faces.append(face)
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces


