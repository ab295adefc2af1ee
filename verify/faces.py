"""Photo -> face crops: load (EXIF, mode -> RGB), detect (MTCNN), align (similarity warp).

Coordinates: landmarks and boxes are in pixel-index coordinates (the centre of pixel (i, j) is at
x=i, y=j), both in the image and in the crop. `align` warps with PIL `Image.transform(AFFINE,
BILINEAR)` (after an antialiased LANCZOS pre-shrink when the face is much larger than the crop);
pixels that fall outside the image are black.

The crop geometry is the contract with training: `fixed_crop` is the crop training takes from an
aligned CelebA image, `align` warps a photo so that its MTCNN landmarks land where they land in that
crop (`CropGeometry.reference_landmarks()`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from verify.geometry import CropGeometry

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb limit (64 megapixels)

try:  # HEIC only when the optional plugin happens to be installed; it is not a dependency.
    import pillow_heif  # type: ignore[import-not-found]

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - depends on the environment
    pass


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class ImageLoadError(ValueError):
    """A file that cannot be turned into an RGB image; the message is one line: "<path>: <problem>"."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the decoder said
        super().__init__(f"{self.path}: {self.problem}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _open_quietly(path: Path) -> Image.Image:
    # Pillow warns (DecompressionBombWarning) on open above its own global limit; we apply our own
    # configurable limit right after, so the warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any supported PIL mode -> (H, W, 3) uint8 RGB; alpha is composited on white."""
    mode = img.mode
    if mode == "RGB":
        rgb = img
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples: scale 0..65535 to 0..255 (dividing by 257 maps 257*v back to v exactly).
        # Pillow opens 16-bit grey PNG/PGM/TIFF as I;16* (older versions as I), so I is read the same.
        arr = np.asarray(img).astype(np.float64)  # (H, W)
        grey = np.clip(np.rint(np.clip(arr, 0, 65535) / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))  # (H, W, 3)
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode in ("L", "1", "P", "CMYK", "YCbCr", "RGBX", "HSV"):
        rgb = img.convert("RGB")
    elif mode == "F":  # float samples have no fixed range to map to 0..255
        raise ValueError("unsupported image mode 'F' (32-bit floating-point samples)")
    else:  # e.g. LAB, or a mode a plugin adds that Pillow cannot convert to RGB
        raise ValueError(f"unsupported image mode {mode!r}")
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"unsupported image mode {mode!r}")
    return np.ascontiguousarray(arr)


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, upright (EXIF orientation applied).

    Raises ImageLoadError ("<path>: <problem>") for a missing or empty file, a file that is not an
    image, corrupt or truncated data (the image is fully decoded, so truncation is caught), an image
    over `max_pixels` (checked from the header, before decoding) and modes with no RGB meaning.
    Pillow's own global limit (Image.MAX_IMAGE_PIXELS, x2) still applies above `max_pixels`.
    """
    return _load(path, max_pixels)[0]


def shrink(image: np.ndarray, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Downscale (antialiased bilinear) so the longer side is at most `max_side`; returns the image and
    the original pixels per returned pixel (x, y). Unchanged when already small enough."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image, (1.0, 1.0)
    s = max_side / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    small = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))  # (nh, nw, 3)
    return small, (w / nw, h / nh)


def load_for_detection(path: str | os.PathLike, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS
                       ) -> tuple[np.ndarray, tuple[float, float]]:
    """`load_image`, shrunk to a longer side of at most `max_side` (the detector's size); returns the
    image and the original pixels per returned pixel (x, y), to map boxes back.

    A JPEG at least twice `max_side` is decoded at 1/2, 1/4 or 1/8 scale directly (libjpeg's DCT
    scaling, Pillow's `draft`), never below `max_side`: a 12-megapixel photo decodes several times
    faster, and the data is still read to its end (truncation is still caught).
    """
    image, draft = _load(path, max_pixels, draft_side=max_side)
    small, (sx, sy) = shrink(image, max_side)
    return small, (sx * draft, sy * draft)


def _load(path: str | os.PathLike, max_pixels: int, draft_side: int | None = None) -> tuple[np.ndarray, float]:
    """The image (upright RGB) and the original pixels per decoded pixel (1 unless JPEG draft decoding
    to no less than `draft_side` on the longer side applied)."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if path.is_dir():
        raise ImageLoadError(path, "is a directory, not an image file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file ({_one_line(exc)})") from exc
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")

    try:
        img = _open_quietly(path)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not an image (unrecognised file content)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"image too large ({_one_line(exc)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(path, f"cannot open image ({_one_line(exc)})") from exc

    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageLoadError(
                path,
                f"image too large: {width}x{height} = {width * height / 1e6:.1f} megapixels "
                f"exceeds the limit of {max_pixels / 1e6:.1f} megapixels",
            )
        if width == 0 or height == 0:
            raise ImageLoadError(path, f"corrupt image: size {width}x{height}")
        draft = 1.0
        if draft_side is not None and img.format == "JPEG" and max(width, height) >= 2 * draft_side:
            k = draft_side / max(width, height)
            # Pillow picks the largest scale 1/s (s in 1, 2, 4, 8) that keeps both sides >= this size.
            picked = img.draft(None, (max(1, math.ceil(width * k)), max(1, math.ceil(height * k))))
            if picked is not None:
                draft = width / picked[1][2]  # box = (0, 0, width / s, height / s)
        try:
            img.load()  # full decode: truncated/corrupt data fails here, not later
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(path, f"image too large ({_one_line(exc)})") from exc
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
            raise ImageLoadError(path, f"corrupt or truncated image data ({_one_line(exc)})") from exc
        try:
            upright = ImageOps.exif_transpose(img)
        except Exception as exc:  # a damaged EXIF block should not cost the photo
            log.warning("%s: ignoring unreadable EXIF orientation (%s)", path, _one_line(exc))
            upright = img
        try:
            return _to_rgb(upright), draft
        except ValueError as exc:
            raise ImageLoadError(path, _one_line(exc)) from exc


def is_image_file(path: str | os.PathLike) -> bool:
    """True when Pillow recognises the file's content as an image (header only, no full decode).

    The extension is ignored: a PNG named .jpg is an image, a text file named .jpg is not.
    """
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with _open_quietly(path):
            return True
    except Image.DecompressionBombError:
        return True  # an image, just too large: load_image reports it
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


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
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))


class FaceDetector:
    """MTCNN (facenet-pytorch) loaded once; `detect` returns faces per image, largest first.

    On an image downscaled for detection (longer side > max_side) the smallest face found is
    min_face_size / scale original pixels.
    """

    def __init__(self, config: DetectorConfig | None = None, **overrides: object) -> None:
        from facenet_pytorch import MTCNN  # heavy import, only when a detector is built

        from verify.runtime import resolve_device

        config = config or DetectorConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)  # type: ignore[arg-type]
        self.config = config
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
        if self.device.type == "cpu":  # same networks and results, vectorised crops (verify/mtcnn.py)
            from .mtcnn import detect_faces

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
        # Back to original pixels (pixel-centre convention: centre i of the small image sits at
        # (i + 0.5) * s - 0.5 in the original).
        scale = np.array([sx, sy])
        if sx != 1.0 or sy != 1.0:
            boxes = (boxes.reshape(-1, 2, 2) + 0.5) * scale - 0.5
            boxes = boxes.reshape(-1, 4)
            points = (points + 0.5) * scale - 0.5
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


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------


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
    img = image if isinstance(image, Image.Image) else Image.fromarray(_check_rgb(image))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return _align_pil(img, landmarks, geometry)


def fixed_crop(image: np.ndarray | Image.Image, geometry: CropGeometry) -> np.ndarray:
    """The training-side crop of an aligned CelebA image (any size of the 178x218 frame): (S, S, 3).

    `geometry.box_for(w, h)` resized to S x S with Pillow's LANCZOS filter, as verify/cache.py
    does. `align` of the same image with its MTCNN landmarks should give (almost) the same crop.
    """
    img = image if isinstance(image, Image.Image) else Image.fromarray(_check_rgb(image))
    if img.mode != "RGB":
        img = img.convert("RGB")
    box = geometry.box_for(*img.size)
    out = img.resize((geometry.size, geometry.size), Image.LANCZOS, box=box)
    return np.asarray(out, dtype=np.uint8)


def _check_rgb(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB array, got {getattr(image, 'shape', None)} "
            f"{getattr(image, 'dtype', type(image).__name__)}"
        )
    return image


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


class AlignedFace(NamedTuple):
    face: Face
    crop: np.ndarray  # (S, S, 3) uint8


@dataclass(eq=False)
class ImageFaces:
    """The result for one input: `error` (one line) or `faces` (largest first, possibly empty)."""

    source: str  # the path, or "<array i>" for an in-memory image
    faces: list[AlignedFace] = dataclasses.field(default_factory=list)
    error: str | None = None
    image_size: tuple[int, int] | None = None  # (width, height) when loaded
    image: np.ndarray | None = None  # the loaded (H, W, 3) image, only with keep_images

    @property
    def ok(self) -> bool:
        return self.error is None


ImageInput = Union[str, os.PathLike, np.ndarray]


class FacePipeline:
    """load -> detect -> align, for paths or in-memory (H, W, 3) uint8 RGB arrays."""

    def __init__(
        self,
        detector: FaceDetector,
        geometry: CropGeometry,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_faces: int | None = None,
    ) -> None:
        self.detector = detector
        self.geometry = geometry
        self.max_pixels = max_pixels
        self.max_faces = max_faces

    def iter_process(self, items: Iterable[ImageInput], chunk_size: int = 16,
                     keep_images: bool = False) -> Iterator[ImageFaces]:
        """Yield one ImageFaces per input, in order; at most `chunk_size` images held at once.
        `keep_images`: each result also carries its loaded image (for work on the pixels that follows)."""
        chunk: list[ImageInput] = []
        start = 0
        for item in items:
            chunk.append(item)
            if len(chunk) == chunk_size:
                yield from self._process_chunk(chunk, start, keep_images)
                start += len(chunk)
                chunk = []
        if chunk:
            yield from self._process_chunk(chunk, start, keep_images)

    def process(self, items: Iterable[ImageInput]) -> list[ImageFaces]:
        return list(self.iter_process(items))

    def _process_chunk(self, items: list[ImageInput], first_index: int, keep_images: bool = False) -> list[ImageFaces]:
        results: list[ImageFaces] = []
        images: list[np.ndarray] = []
        loaded: list[int] = []
        for k, item in enumerate(items):
            if isinstance(item, np.ndarray):
                source = f"<array {first_index + k}>"
                try:
                    image = _check_rgb(item)
                except ValueError as exc:
                    results.append(ImageFaces(source=source, error=f"{source}: {exc}"))
                    continue
            else:
                source = str(item)
                try:
                    image = load_image(item, max_pixels=self.max_pixels)
                except ImageLoadError as exc:
                    log.info("%s", exc)
                    results.append(ImageFaces(source=source, error=str(exc)))
                    continue
            results.append(ImageFaces(source=source, image_size=(image.shape[1], image.shape[0]),
                                      image=image if keep_images else None))
            images.append(image)
            loaded.append(len(results) - 1)
        detections = self.detector.detect(images) if images else []
        for r_idx, image, faces in zip(loaded, images, detections):
            if self.max_faces is not None:
                faces = faces[: self.max_faces]
            if faces:
                pil = Image.fromarray(image)  # one copy per image, shared by its faces
                results[r_idx].faces = [AlignedFace(f, _align_pil(pil, f.landmarks, self.geometry)) for f in faces]
        return results
