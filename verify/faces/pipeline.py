"""The one photo path: images (files or decoded arrays) -> detected faces -> aligned crops -> embeddings.

`FacePipeline.analyse` is the core every caller shares: `verify`, `enroll` and `evaluate` through
`iter_process` (which loads files first), and the scan's workers on images they decoded themselves.
A failure costs only its image: a detection batch that fails is retried image by image, an embedding
batch that fails is retried image by image, and each image that still fails carries a one-line error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, MutableMapping, NamedTuple, Sequence, Union

import numpy as np
from PIL import Image

from verify.model.geometry import CropGeometry

from verify.faces.align import align, check_rgb
from verify.faces.detect import Face, FaceDetector, face_to_original
from verify.faces.load import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

if TYPE_CHECKING:  # torch stays out of modules that only load images
    from verify.model.file import Embedder

log = logging.getLogger(__name__)

Timers = MutableMapping[str, float]  # stage name -> seconds, added to in place


class AlignedFace(NamedTuple):
    face: Face
    crop: np.ndarray  # (S, S, 3) uint8


@dataclass(eq=False)
class ImageFaces:
    """The result for one input: `error` (one line) or `faces` (largest first, possibly empty), and
    with an embedder, `embeddings` (F, D): one unit vector per face, in the same order."""

    source: str  # the path, or "<array i>" for an in-memory image
    faces: list[AlignedFace] = dataclasses.field(default_factory=list)
    error: str | None = None
    image_size: tuple[int, int] | None = None  # (width, height) when loaded
    image: np.ndarray | None = None  # the loaded (H, W, 3) image, only with keep_images
    embeddings: np.ndarray | None = None  # (F, D) when the pipeline has an embedder

    @property
    def ok(self) -> bool:
        return self.error is None


ImageInput = Union[str, os.PathLike, np.ndarray]


def error_summary(exc: BaseException) -> str:
    """One line for an unexpected exception: "TypeName: message"."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _add(timers: Timers | None, stage: str, t0: float) -> None:
    if timers is not None:
        timers[stage] = timers.get(stage, 0.0) + time.perf_counter() - t0


class FacePipeline:
    """load -> detect -> align (-> embed, with an embedder), for paths or (H, W, 3) uint8 RGB arrays.

    `detector` may be a zero-argument callable returning the detector: it is then built on first use
    (a scan whose workers detect never needs one in the main process). The crop geometry is the
    embedder's unless `geometry` is given.
    """

    def __init__(
        self,
        detector: "FaceDetector | Callable[[], FaceDetector]",
        geometry: CropGeometry | None = None,
        *,
        embedder: "Embedder | None" = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_faces: int | None = None,
    ) -> None:
        if geometry is None:
            if embedder is None:
                raise ValueError("FacePipeline needs a crop geometry or an embedder (whose geometry it uses)")
            geometry = embedder.geometry
        self._detector = detector
        self.geometry = geometry
        self.embedder = embedder
        self.max_pixels = max_pixels
        self.max_faces = max_faces

    @property
    def detector(self) -> FaceDetector:
        if not hasattr(self._detector, "detect"):  # a factory: build the detector now
            self._detector = self._detector()
        return self._detector

    # ---- the core: decoded images -> faces (-> embeddings) ------------------------------------

    def analyse(self, images: Sequence[np.ndarray], scales: Sequence[tuple[float, float]] | None = None,
                timers: Timers | None = None) -> list[tuple[list[AlignedFace], np.ndarray | None] | str]:
        """Per image: (faces, embeddings (F, D) or None without an embedder), or a one-line error.

        `scales`: original pixels per pixel of each image (x, y), for images shrunk before detection;
        faces come back in the original image's coordinates (crops are cut from the given pixels).
        `timers` gains the seconds spent in "detect", "align" and "embed".
        """
        out: list[tuple[list[AlignedFace], np.ndarray | None] | str] = []
        if not len(images):
            return out
        t0 = time.perf_counter()
        detections = self._detect(list(images))
        _add(timers, "detect", t0)

        t0 = time.perf_counter()
        for i, (image, faces) in enumerate(zip(images, detections)):
            if isinstance(faces, str):
                out.append(faces)
                continue
            if self.max_faces is not None:
                faces = faces[: self.max_faces]
            try:
                pil = Image.fromarray(image) if faces else None  # one copy per image, shared by its faces
                crops = [align(pil, f.landmarks, self.geometry) for f in faces]  # (S, S, 3) each
            except Exception as exc:
                out.append(f"face alignment failed ({error_summary(exc)})")
                continue
            if scales is not None:
                faces = [face_to_original(f, scales[i]) for f in faces]
            out.append([AlignedFace(f, c) for f, c in zip(faces, crops)])
        _add(timers, "align", t0)

        t0 = time.perf_counter()
        out = self._embed(out)
        _add(timers, "embed", t0)
        return out

    def _detect(self, images: list[np.ndarray]) -> list[list[Face] | str]:
        """Faces per image, or an error message for an image whose detection failed."""
        try:
            found = list(self.detector.detect(images))
            if len(found) != len(images):
                raise RuntimeError(f"detector returned {len(found)} results for {len(images)} images")
            return found
        except Exception as exc:
            if len(images) > 1:
                log.warning("detection failed for a batch of %d images (%s); retrying one by one",
                            len(images), error_summary(exc))
        out: list[list[Face] | str] = []
        for img in images:
            try:
                out.append(self.detector.detect([img])[0])
            except Exception as exc:
                out.append(f"face detection failed ({error_summary(exc)})")
        return out

    def _embed(self, aligned: list) -> list:
        """Attach embeddings (one batch for all faces; image by image if that fails)."""
        emb_dim = self.embedder.dim if self.embedder is not None else 0
        spans = []  # (result index, first crop, end)
        crops: list[np.ndarray] = []
        for i, faces in enumerate(aligned):
            if isinstance(faces, str):
                continue
            spans.append((i, len(crops), len(crops) + len(faces)))
            crops.extend(c for _, c in faces)
        out = list(aligned)
        if self.embedder is None:
            for i, _, _ in spans:
                out[i] = (aligned[i], None)
            return out
        for i, a, b in spans:
            out[i] = (aligned[i], np.zeros((0, emb_dim), np.float32))
        if not crops:
            return out
        try:
            emb = self.embedder.embed(np.stack(crops))  # (F, D)
            if emb.shape != (len(crops), emb_dim):
                raise RuntimeError(f"embedder returned {emb.shape} for {len(crops)} faces")
            for i, a, b in spans:
                out[i] = (aligned[i], emb[a:b])
        except Exception as exc:
            log.warning("embedding failed for a batch (%s); retrying image by image", error_summary(exc))
            for i, a, b in spans:
                if a == b:
                    continue
                try:
                    out[i] = (aligned[i], self.embedder.embed(np.stack(crops[a:b])))
                except Exception as exc2:
                    out[i] = f"embedding failed ({error_summary(exc2)})"
        return out

    # ---- files or arrays in, one ImageFaces per input -----------------------------------------

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
                    image = check_rgb(item)
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
        for r_idx, got in zip(loaded, self.analyse(images)):
            if isinstance(got, str):
                results[r_idx].error = f"{results[r_idx].source}: {got}"
            else:
                results[r_idx].faces, results[r_idx].embeddings = got
        return results
