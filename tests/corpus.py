"""A generated corpus of awkward image files, reused by the loader, scan and CLI tests.

`make_bad_corpus(folder, face_image)` writes the files and returns {file name: expected outcome}:
  "face"        loads as RGB and holds (at least) one detectable face
  "no-face"     loads as RGB and holds no face
  "ok"          loads as RGB (no claim about faces: the synthetic stand-in when no face image is given)
  "ok-or-error" may load (libjpeg recovers from some corrupt data) or raise ImageLoadError
  "error:<phrase>"  raises ImageLoadError whose message names the file and contains <phrase>
The face variants are built from `face_image` (a real LFW or CelebA photo) when given; without one a
synthetic picture stands in and "face" becomes "ok". Building takes well under a second.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# EXIF tag 0x0112; value 6: the stored pixels must be turned 90 degrees clockwise to be upright.
ORIENTATION_TAG = 0x0112
NON_ASCII_NAME = "Zoë_李.jpg"
HUGE_SIZE = (9000, 8000)  # 72 MP: over faceverify's default 64 MP limit, under Pillow's own limits
BOMB_SIZE = (20000, 10000)  # 200 MP: over Pillow's hard limit (2 x MAX_IMAGE_PIXELS) as well


def _synthetic(width: int = 200, height: int = 240) -> np.ndarray:
    """A smooth colour picture with some texture: (H, W, 3) uint8, deterministic."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 128 + 100 * np.sin(xx / 17.0)
    g = 128 + 100 * np.cos(yy / 23.0)
    b = 128 + 60 * np.sin((xx + yy) / 11.0)
    return np.clip(np.stack([r, g, b], axis=2), 0, 255).astype(np.uint8)


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_blank_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit black PNG of any declared size, written without holding the image in memory."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = []
    rows_per_piece = max(1, (1 << 20) // len(row))
    for start in range(0, height, rows_per_piece):
        parts.append(comp.compress(row * min(rows_per_piece, height - start)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
    path.write_bytes(png + _png_chunk(b"IEND", b""))


def _corrupt_sof(jpeg: bytes) -> bytes:
    """Point the first component at an undefined quantisation table: libjpeg fails deterministically."""
    i = jpeg.find(b"\xff\xc0")  # baseline SOF0, as Pillow writes it
    if i < 0:
        raise ValueError("no SOF0 marker in the JPEG")
    data = bytearray(jpeg)
    data[i + 12] = 3  # FFC0 len(2) P(1) Y(2) X(2) Nf(1) | C1(1) HV1(1) Tq1 <- here
    return bytes(data)


def make_bad_corpus(folder: Path, face_image: Path | None = None) -> dict[str, str]:
    """Write the corpus into `folder` (created if needed); returns {file name: expected outcome}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if face_image is not None:
        with Image.open(face_image) as im:
            rgb = np.asarray(im.convert("RGB"))
        face = "face"
    else:
        rgb = _synthetic()
        face = "ok"
    img = Image.fromarray(rgb)  # (H, W, 3)
    grey = img.convert("L")
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, outcome: str) -> None:
        (folder / name).write_bytes(data)
        expected[name] = outcome

    def save(name: str, image: Image.Image, outcome: str, **kw) -> None:
        image.save(folder / name, **kw)
        expected[name] = outcome

    jpeg = _jpeg_bytes(img)
    put("face.jpg", jpeg, face)
    put(NON_ASCII_NAME, jpeg, face)
    put("corrupt_header.jpg", _corrupt_sof(jpeg), "error:corrupt")
    middle = bytearray(jpeg)
    mid = len(middle) // 2
    for k in range(mid, min(mid + 64, len(middle) - 2)):
        middle[k] ^= 0xFF
    put("corrupt_middle.jpg", bytes(middle), "ok-or-error")
    put("truncated.jpg", jpeg[: len(jpeg) * 6 // 10], "error:truncated")
    put("empty.jpg", b"", "error:empty")
    put("notes.jpg", "These are my holiday notes, not a photo.\n".encode() * 20, "error:not an image")
    (folder / "folder.jpg").mkdir(exist_ok=True)
    expected["folder.jpg"] = "error:directory"

    png = io.BytesIO()
    img.save(png, format="PNG")
    put("png_named.jpg", png.getvalue(), face)  # content decides, not the extension
    put("truncated.png", png.getvalue()[: len(png.getvalue()) // 2], "error:truncated")

    save("cmyk.jpg", img.convert("CMYK"), face, quality=95)
    save("grey.jpg", grey, face, quality=95)
    grey16 = (np.asarray(grey).astype(np.uint16) * 257).astype(np.uint16)  # full 16-bit range
    save("grey16.png", Image.fromarray(grey16), face)  # mode I;16
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :10, 3] = 0  # a fully transparent band on the left: must come out white
    rgba[:, 10:20, 3] = 128
    save("rgba.png", Image.fromarray(rgba, "RGBA"), face)
    save("la.png", Image.merge("LA", (grey, Image.fromarray(rgba[:, :, 3]))), face)
    save("palette.gif", img.quantize(colors=256), face)
    save("face.webp", img, face, quality=90)

    # Stored sideways with the EXIF tag that turns it upright (the way phones save portraits).
    sideways = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}  # undone by the tag
    for orientation, turn in sideways.items():
        stored = img.transpose(turn)
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        save(f"exif_{orientation}.jpg", stored, face, quality=95, exif=exif.tobytes())

    save("grey_flat.png", Image.new("RGB", (200, 200), (128, 128, 128)), "no-face")
    save("tiny.png", Image.fromarray(rgb[:8, :8]), "no-face")
    save("float.tif", Image.fromarray(np.asarray(grey, dtype=np.float32) / 255.0, "F"), "error:unsupported image mode")

    write_blank_png(folder / "huge.png", *HUGE_SIZE)
    expected["huge.png"] = "error:too large"
    write_blank_png(folder / "bomb.png", *BOMB_SIZE)
    expected["bomb.png"] = "error:too large"
    return expected
