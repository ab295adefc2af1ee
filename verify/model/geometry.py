"""The one place that defines the face crop geometry.

Training reads aligned CelebA images (178x218) and takes a fixed square crop; photos go through
MTCNN and are warped with a similarity transform so that their 5 landmarks land where the CelebA
landmarks land in that crop. Both paths use `CropGeometry`, and the geometry is stored in every
model file so that the aligner reproduces what the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Median MTCNN landmarks over 300 full-size aligned CelebA images, (x, y) in the 178x218 frame:
# left eye, right eye, nose, left mouth corner, right mouth corner (see ../shared/docs/DESIGN.md).
CELEBA_FRAME = (178, 218)  # (width, height)
CELEBA_LANDMARKS = (
    (69.9, 112.4),
    (109.2, 112.5),
    (89.0, 137.3),
    (72.1, 153.3),
    (106.8, 153.2),
)


@dataclass(frozen=True)
class CropGeometry:
    """A square crop of the CelebA frame, resized to `size` pixels.

    `box` is (x0, y0, x1, y1) in the 178x218 CelebA frame. The default is centred horizontally on
    the face (x = 89), puts the eyes at 42% of the height and spans 128 px, so the eye distance is
    ~30% of the crop width (close to the common 112x112 ArcFace crop).
    """

    size: int = 112
    box: tuple[float, float, float, float] = (25.0, 59.0, 153.0, 187.0)
    # Where the aligner puts the 5 landmarks, as fractions (x, y) of the crop side, when a model was
    # not trained on this box of CelebA (dlib's chip: measured, see verify.model.dlib_import); None: the
    # CelebA landmarks mapped through `box`.
    landmarks: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.landmarks is not None:
            pts = tuple((float(x), float(y)) for x, y in self.landmarks)
            if len(pts) != 5:
                raise ValueError(f"crop landmarks must be 5 (x, y) points, got {len(pts)}")
            object.__setattr__(self, "landmarks", pts)
        x0, y0, x1, y1 = self.box
        if self.size < 16:
            raise ValueError(f"crop size must be >= 16 px, got {self.size}")
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"crop box must have positive width and height, got {self.box}")
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))

    def box_for(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The crop box scaled to an image of another size (e.g. half-size CelebA, 89x109)."""
        sx, sy = width / CELEBA_FRAME[0], height / CELEBA_FRAME[1]
        x0, y0, x1, y1 = self.box
        return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)

    def reference_landmarks(self) -> np.ndarray:
        """The 5 reference landmarks in output-crop pixel coordinates, shape (5, 2) float32."""
        if self.landmarks is not None:
            return (np.asarray(self.landmarks, dtype=np.float64) * self.size).astype(np.float32)
        x0, y0, x1, y1 = self.box
        pts = np.asarray(CELEBA_LANDMARKS, dtype=np.float64)
        pts[:, 0] = (pts[:, 0] - x0) * self.size / (x1 - x0)
        pts[:, 1] = (pts[:, 1] - y0) * self.size / (y1 - y0)
        return pts.astype(np.float32)

    def to_dict(self) -> dict:
        d: dict = {"size": int(self.size), "box": [float(v) for v in self.box]}
        if self.landmarks is not None:
            d["landmarks"] = [[x, y] for x, y in self.landmarks]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CropGeometry":
        pts = d.get("landmarks")
        return cls(size=int(d["size"]), box=tuple(float(v) for v in d["box"]),
                   landmarks=None if pts is None else tuple((float(x), float(y)) for x, y in pts))


# ImageNet-style per-channel normalisation is unnecessary for faces trained from scratch;
# we map uint8 [0, 255] to [-1, 1] and record it in the model file.
NORMALISATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
