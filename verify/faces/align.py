"""Alignment: a similarity warp that puts a face's 5 landmarks where the model's crop geometry wants them.

`align` warps with PIL `Image.transform(AFFINE, BILINEAR)` (after an antialiased LANCZOS pre-shrink
when the face is much larger than the crop); pixels that fall outside the image are black. The crop
geometry is the contract with training: `fixed_crop` is the crop training takes from an aligned
CelebA image, `align` warps a photo so that its MTCNN landmarks land where they land in that crop
(`CropGeometry.reference_landmarks()`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from verify.model.geometry import CropGeometry


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) src -> dst.

    Umeyama (1991). src, dst: (N, 2) with N >= 2. Returns M (2, 3) with dst ~= M @ [x, y, 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"src and dst must both be (N, 2) with N >= 2, got {src.shape} and {dst.shape}")
    n = src.shape[0]
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mu_s, dst - mu_d
    var_s = (src_c**2).sum() / n
    if var_s <= 1e-12:
        raise ValueError("src points are all the same point: no transform is defined")
    cov = dst_c.T @ src_c / n  # (2, 2)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # would be a reflection: flip the weakest axis
        sign[1, 1] = -1.0
    rot = u @ sign @ vt  # (2, 2)
    scale = float((d * np.diag(sign)).sum() / var_s)
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])  # (2, 3)


def _as3(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])  # (3, 3)


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _align_pil(img: Image.Image, landmarks: np.ndarray, geometry: CropGeometry) -> np.ndarray:
    size = geometry.size
    m_idx = _as3(similarity_transform(landmarks, geometry.reference_landmarks()))  # image -> crop
    # PIL samples in continuous coordinates (pixel i spans [i, i+1)); ours are pixel centres.
    m_cont = _translate(0.5, 0.5) @ m_idx @ _translate(-0.5, -0.5)  # image cont -> crop cont
    inv = np.linalg.inv(m_cont)  # crop cont -> image cont
    scale = float(np.sqrt(abs(np.linalg.det(m_cont[:2, :2]))))  # crop px per image px

    src = img
    to_src = np.eye(3)  # image cont -> src cont
    if scale < 0.8:
        # Face much larger than the crop: bilinear sampling alone would alias, so first cut the
        # face's footprint out and shrink it with Pillow's antialiased resize, then warp at ~1:1.
        corners = inv @ np.array([[0, size, 0, size], [0, 0, size, size], [1, 1, 1, 1]], float)
        x0, y0 = np.floor(corners[:2].min(axis=1)) - 2
        x1, y1 = np.ceil(corners[:2].max(axis=1)) + 2
        rw, rh = int(x1 - x0), int(y1 - y0)
        nw, nh = max(1, round(rw * scale)), max(1, round(rh * scale))
        # crop() outside the image reads as black, matching the warp's fill colour.
        region = img.crop((int(x0), int(y0), int(x1), int(y1)))
        src = region.resize((nw, nh), Image.LANCZOS)  # the filter the training cache uses
        to_src = np.diag([nw / rw, nh / rh, 1.0]) @ _translate(-x0, -y0)
    coeffs = (to_src @ inv)[:2].reshape(-1)  # crop cont -> src cont, as PIL wants
    out = src.transform((size, size), Image.AFFINE, tuple(coeffs), resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(out, dtype=np.uint8)


def align(image: np.ndarray | Image.Image, landmarks: np.ndarray, geometry: CropGeometry) -> np.ndarray:
    """Warp `image` so its 5 landmarks land on `geometry.reference_landmarks()`: (S, S, 3) uint8."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must be (5, 2), got {landmarks.shape}")
    img = image if isinstance(image, Image.Image) else Image.fromarray(check_rgb(image))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return _align_pil(img, landmarks, geometry)


def fixed_crop(image: np.ndarray | Image.Image, geometry: CropGeometry) -> np.ndarray:
    """The training-side crop of an aligned CelebA image (any size of the 178x218 frame): (S, S, 3).

    `geometry.box_for(w, h)` resized to S x S with Pillow's LANCZOS filter, as verify/training/cache.py
    does. `align` of the same image with its MTCNN landmarks should give (almost) the same crop.
    """
    img = image if isinstance(image, Image.Image) else Image.fromarray(check_rgb(image))
    if img.mode != "RGB":
        img = img.convert("RGB")
    box = geometry.box_for(*img.size)
    out = img.resize((geometry.size, geometry.size), Image.LANCZOS, box=box)
    return np.asarray(out, dtype=np.uint8)


def check_rgb(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB array, got {getattr(image, 'shape', None)} "
            f"{getattr(image, 'dtype', type(image).__name__)}"
        )
    return image


