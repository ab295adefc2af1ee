"""Photo files -> upright (H, W, 3) uint8 RGB arrays: EXIF orientation, every Pillow mode, size limits,
and one-line errors naming the file ("<path>: <problem>")."""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb limit (64 megapixels)

try:  # HEIC only when the optional plugin happens to be installed; it is not a dependency.
    import pillow_heif  # type: ignore[import-not-found]

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - depends on the environment
    pass


class ImageLoadError(ValueError):
    """A file that cannot be turned into an RGB image; the message is one line: "<path>: <problem>"."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the decoder said
        super().__init__(f"{self.path}: {self.problem}")


def _decoder_message(exc: BaseException) -> str:
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
        raise ImageLoadError(path, f"cannot read file ({_decoder_message(exc)})") from exc
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")

    try:
        img = _open_quietly(path)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not an image (unrecognised file content)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"image too large ({_decoder_message(exc)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(path, f"cannot open image ({_decoder_message(exc)})") from exc

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
            raise ImageLoadError(path, f"image too large ({_decoder_message(exc)})") from exc
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
            raise ImageLoadError(path, f"corrupt or truncated image data ({_decoder_message(exc)})") from exc
        try:
            upright = ImageOps.exif_transpose(img)
        except Exception as exc:  # a damaged EXIF block should not cost the photo
            log.warning("%s: ignoring unreadable EXIF orientation (%s)", path, _decoder_message(exc))
            upright = img
        try:
            return _to_rgb(upright), draft
        except ValueError as exc:
            raise ImageLoadError(path, _decoder_message(exc)) from exc


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


