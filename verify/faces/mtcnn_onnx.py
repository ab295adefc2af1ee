"""MTCNN without torch: facenet-pytorch's three networks as ONNX runtime graphs (verify/model/shipped/mtcnn/,
made by scripts/export_mtcnn.py) and a numpy port of the vectorised driver in verify/faces/mtcnn.py.

Same stages, same order of operations and the same float32 arithmetic as that driver and the
facenet-pytorch / torchvision helpers it calls, so the detections are the same (tests/test_mtcnn_onnx.py):

- one summed-area table per image serves every area resampling (pyramid levels and R-/O-net crops),
  exactly as `verify.faces.mtcnn` does;
- `generateBoundingBox`, `bbreg`, `rerec`, `pad` (1-based clipping) from facenet-pytorch;
- torchvision's `batched_nms` (greedy IoU NMS, areas without +1, the boxes shifted per image as its
  "coordinate trick" does up to 1,000 boxes, per image beyond) and facenet-pytorch's
  `batched_nms_numpy(..., "Min")` (areas with +1) for the last stage.

Where the two can differ:
- the networks: ONNX Runtime's convolutions round differently from PyTorch's (oneDNN), about 1e-6 on
  the probabilities and regressions, so boxes differ by ~1e-4 px, and a candidate whose score sits
  within that of a threshold, or two boxes whose IoU sits within that of an NMS threshold, can go the
  other way (none did on 1,000 LFW photos);
- where several boxes of one image have exactly equal scores, torchvision's per-image NMS path (over
  1,000 boxes in one call, i.e. big photos) orders them with an unstable sort; here the order is stable.
  Equal-score boxes that survived the same NMS do not suppress each other, so this can reorder, not
  change, what is found.

Speed (bench/bench_runtime_detect.py): P-net runs on about 32k input pixels at a time (whole images)
and R-/O-net on 16 candidates at a time, so that a run's activations stay cache-sized; the pyramid is
resampled in bands of rows for the same reason. None of that changes a value.

Imports numpy and the standard library only; onnxruntime when a detector is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from verify.model.onnx_session import open_session

MTCNN_DIR = Path(__file__).resolve().parents[1] / "model" / "shipped" / "mtcnn"
GRAPHS = ("pnet", "rnet", "onet")

_F = np.float32
_NORM_SCALE = 0.0078125  # facenet-pytorch's (x - 127.5) * 0.0078125


# --------------------------------------------------------------------------------------------
# Area resampling from summed-area tables (as verify.faces.mtcnn)
# --------------------------------------------------------------------------------------------


def _area_weights(start: np.ndarray, end: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell edges of adaptive average pooling of spans [start, end) into `size` cells: (N, size) each.
    Cell i covers [floor(i*L/size), ceil((i+1)*L/size)) (PyTorch's adaptive_avg_pool2d rule)."""
    start = np.asarray(start, dtype=np.int64).reshape(-1, 1)
    length = np.asarray(end, dtype=np.int64).reshape(-1, 1) - start  # (N, 1), > 0
    i = np.arange(size, dtype=np.int64).reshape(1, -1)
    return start + (i * length) // size, start + ((i + 1) * length + size - 1) // size


def summed_area_table(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, H+1, W+1, 4) integer sums of image[:y, :x] (int32 while they fit; the 4th
    channel is zero padding, so that one table cell is one 16- or 32-byte item for the crops' gather).
    Channels 0-2 are the same integers as verify.faces.mtcnn.summed_area_table's."""
    images = np.asarray(images)
    b, h, w, c = images.shape
    dtype = np.int32 if h * w * 255 < 2**31 else np.int64
    sat = np.zeros((b, h + 1, w + 1, 4), dtype=dtype)
    sat[:, 1:, 1:, :c] = images
    np.cumsum(sat, axis=1, out=sat)  # contiguous in-place sums: faster than summing into a strided view
    np.cumsum(sat, axis=2, out=sat)
    return sat


def resample_whole(sat: np.ndarray, size: tuple[int, int], scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """Whole images area-resampled to `size`, times `scale` plus `shift`: (B, 3, sh, sw) float32, contiguous.
    The same float32 values as verify.faces.mtcnn.resample_whole (separable: sums over the cells' rows,
    then over their columns; integer sums, float32(sum) * float32(scale / area)).

    Works through bands of output rows whose temporaries stay cache-sized (about 1 MB): on a big photo
    that is several times faster than whole-image temporaries (and the values are the same)."""
    b, h1, w1, c = sat.shape
    sh, sw = size
    ys, ye = (v[0] for v in _area_weights(np.zeros(1), np.full(1, h1 - 1), sh))
    xs, xe = (v[0] for v in _area_weights(np.zeros(1), np.full(1, w1 - 1), sw))
    weight = (scale / ((ye - ys)[:, None] * (xe - xs)[None, :])).astype(_F)  # (sh, sw)
    out = np.empty((b, 3, sh, sw), dtype=_F)  # NCHW
    band = max(1, (1 << 18) // (w1 * c))  # output rows per band
    for i in range(b):
        for r0 in range(0, sh, band):
            r1 = min(sh, r0 + band)
            rows = np.take(sat[i], ye[r0:r1], axis=0) - np.take(sat[i], ys[r0:r1], axis=0)  # (n, W+1, 4) row-cell sums
            sums = np.take(rows, xe, axis=1) - np.take(rows, xs, axis=1)  # (n, sw, 4) cell sums
            np.multiply(sums[..., :3].transpose(2, 0, 1), weight[r0:r1], out=out[i, :, r0:r1], dtype=_F,
                        casting="unsafe")  # float32(int) * weight
    if shift:
        out += _F(shift)
    return out


def crop_resample(sat: np.ndarray, image_inds: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray,
                  x1: np.ndarray, size: int) -> np.ndarray:
    """Boxes [y0:y1, x0:x1] of images `image_inds` area-resampled to (N, 3, size, size) float32 NCHW, then
    normalised as facenet-pytorch does ((x - 127.5) * 0.0078125); `sat` from `summed_area_table`.

    The same values as verify.faces.mtcnn.crop_resample: every cell's four corners in one gather (of
    whole 4-channel table cells), integer box sums, float32(sum) / float32(area)."""
    b, h1, w1, c = sat.shape
    ys, ye = _area_weights(y0, y1, size)
    xs, xe = _area_weights(x0, x1, size)
    n = len(ys)
    cells = np.ascontiguousarray(sat).view(np.dtype((np.void, c * sat.itemsize))).reshape(-1)  # one item per cell
    base = np.asarray(image_inds, dtype=np.int64).reshape(-1, 1, 1) * (h1 * w1)  # (N, 1, 1)
    rows = np.stack([ye, ys, ye, ys])[:, :, :, None] * w1 + base  # (4, N, s, 1): corners D, B, C, A
    cols = np.stack([xe, xe, xs, xs])[:, :, None, :]  # (4, N, 1, s)
    corners = np.take(cells, rows + cols).view(sat.dtype).reshape(4, n, size, size, c)
    total = corners[0] - corners[1]
    total -= corners[2]
    total += corners[3]  # (N, s, s, 4)
    area = ((ye - ys)[:, :, None] * (xe - xs)[:, None, :]).astype(_F)  # (N, s, s)
    out = np.empty((n, 3, size, size), dtype=_F)
    np.divide(total[..., :3].transpose(0, 3, 1, 2), area[:, None], out=out, dtype=_F, casting="unsafe")
    out -= _F(127.5)
    out *= _F(_NORM_SCALE)
    return out


# --------------------------------------------------------------------------------------------
# facenet-pytorch's box helpers (float32, same order of operations)
# --------------------------------------------------------------------------------------------


def generate_bounding_box(reg: np.ndarray, probs: np.ndarray, scale: float, thresh: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """P-net maps -> (K, 9) float32 boxes (x1, y1, x2, y2, score, reg x4) and (K,) image indices."""
    b, yy, xx = np.nonzero(probs >= thresh)
    score = probs[b, yy, xx]
    r = reg[b, :, yy, xx]  # (K, 4)
    bb = np.stack([xx, yy], axis=1).astype(_F)
    s = _F(scale)
    q1 = np.floor((2 * bb + _F(1)) / s)
    q2 = np.floor((2 * bb + _F(12)) / s)
    return np.concatenate([q1, q2, score[:, None], r], axis=1).astype(_F, copy=False), b.astype(np.int64)


def bbreg(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """facenet-pytorch's bbreg, in place on boxes[:, :4]."""
    w = boxes[:, 2] - boxes[:, 0] + _F(1)
    h = boxes[:, 3] - boxes[:, 1] + _F(1)
    b1 = boxes[:, 0] + reg[:, 0] * w
    b2 = boxes[:, 1] + reg[:, 1] * h
    b3 = boxes[:, 2] + reg[:, 2] * w
    b4 = boxes[:, 3] + reg[:, 3] * h
    boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = b1, b2, b3, b4
    return boxes


def rerec(boxes: np.ndarray) -> np.ndarray:
    """facenet-pytorch's rerec (boxes to squares), in place."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = np.maximum(w, h)
    boxes[:, 0] = boxes[:, 0] + w * _F(0.5) - side * _F(0.5)
    boxes[:, 1] = boxes[:, 1] + h * _F(0.5) - side * _F(0.5)
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def pad(boxes: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """facenet-pytorch's pad: truncated int boxes, 1-based clipping (y, ey, x, ex)."""
    b = np.trunc(boxes[:, :4]).astype(np.int32)
    x, y, ex, ey = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    x[x < 1] = 1
    y[y < 1] = 1
    ex[ex > w] = w
    ey[ey > h] = h
    return y, ey, x, ex


# --------------------------------------------------------------------------------------------
# NMS
# --------------------------------------------------------------------------------------------

_BLOCK = 256  # rows of IoU computed at once


def _greedy_iou(b: np.ndarray, areas: np.ndarray, thr: float) -> np.ndarray:
    """Greedy NMS over boxes already in processing order: torchvision's CPU kernel (float32 IoU without
    +1, suppress when IoU > thr as a double). Returns a bool mask of the kept boxes."""
    n = len(b)
    if n <= 1:
        return np.ones(n, dtype=bool)
    keep = np.zeros(n, dtype=bool)
    sup = np.zeros(n, dtype=bool)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    zero = _F(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        for r0 in range(0, n, _BLOCK):
            r1 = min(n, r0 + _BLOCK)
            rows = np.flatnonzero(~sup[r0:r1]) + r0  # not suppressed by earlier blocks
            if rows.size == 0:
                continue
            cols = np.flatnonzero(~sup[r0:]) + r0
            xx1 = np.maximum(x1[rows, None], x1[None, cols])
            yy1 = np.maximum(y1[rows, None], y1[None, cols])
            xx2 = np.minimum(x2[rows, None], x2[None, cols])
            yy2 = np.minimum(y2[rows, None], y2[None, cols])
            inter = np.maximum(zero, xx2 - xx1) * np.maximum(zero, yy2 - yy1)
            ovr = inter / (areas[rows, None] + areas[None, cols] - inter)
            over = ovr.astype(np.float64) > thr  # (rows, cols); NaN never suppresses
            for k, i in enumerate(rows):
                if sup[i]:
                    continue
                keep[i] = True
                sup[cols[over[k]]] = True  # includes i itself and earlier boxes: already decided
    return keep


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, thr: float) -> np.ndarray:
    """torchvision.ops.batched_nms on the CPU: kept indices, by score descending."""
    n = len(boxes)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    boxes = np.asarray(boxes[:, :4], dtype=_F)
    order = np.argsort(-scores, kind="stable")  # torchvision sorts stably, descending
    joint = False
    if n * 4 <= 4000:  # torchvision's "coordinate trick": boxes shifted per image, one NMS
        top = boxes.max()
        b = boxes + (idxs.astype(_F) * (top + _F(1)))[:, None]
        joint = bool(boxes.min() < 0)  # shifted images might overlap: do as torchvision does, all at once
    else:  # per image, unshifted
        b = boxes
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = np.zeros(n, dtype=bool)
    if joint:
        keep[order[_greedy_iou(b[order], areas[order], thr)]] = True
    else:
        ind_sorted = idxs[order]
        for img in np.unique(ind_sorted):
            g = order[ind_sorted == img]
            keep[g[_greedy_iou(b[g], areas[g], thr)]] = True
    return order[keep[order]]


def _nms_numpy(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str) -> np.ndarray:
    """facenet-pytorch's nms_numpy, verbatim (the same numpy calls on the same float32 values)."""
    if boxes.size == 0:
        return np.empty((0, 3))
    x1 = boxes[:, 0].copy()
    y1 = boxes[:, 1].copy()
    x2 = boxes[:, 2].copy()
    y2 = boxes[:, 3].copy()
    s = scores
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s)
    pick = np.zeros_like(s, dtype=np.int16)
    counter = 0
    while order.size > 0:
        i = order[-1]
        pick[counter] = i
        counter += 1
        idx = order[0:-1]
        xx1 = np.maximum(x1[i], x1[idx]).copy()
        yy1 = np.maximum(y1[i], y1[idx]).copy()
        xx2 = np.minimum(x2[i], x2[idx]).copy()
        yy2 = np.minimum(y2[i], y2[idx]).copy()
        w = np.maximum(0.0, xx2 - xx1 + 1).copy()
        h = np.maximum(0.0, yy2 - yy1 + 1).copy()
        inter = w * h
        if method == "Min":
            o = inter / np.minimum(area[i], area[idx])
        else:
            o = inter / (area[i] + area[idx] - inter)
        order = order[np.where(o <= threshold)]
    return pick[:counter].copy()


def batched_nms_numpy(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, threshold: float, method: str
                      ) -> np.ndarray:
    """facenet-pytorch's batched_nms_numpy (boxes shifted per image, float32)."""
    if boxes.size == 0:
        return np.empty(0, dtype=np.int64)
    top = boxes.max()
    shifted = boxes + (idxs.astype(_F) * (top + _F(1)))[:, None]
    return _nms_numpy(shifted, scores, threshold, method).astype(np.int64)


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------


def pyramid_scales(h: int, w: int, min_size: float, factor: float) -> list[float]:
    """MTCNN's image pyramid (as facenet-pytorch): scale 12 / min_size, then x factor while the
    shorter side still holds P-net's 12 px window."""
    m = 12.0 / min_size
    minl = min(h, w) * m
    scales = []
    scale = m
    while minl >= 12:
        scales.append(scale)
        scale *= factor
        minl *= factor
    return scales


class OnnxMTCNN:
    """facenet-pytorch's P-, R-, O-nets under ONNX Runtime; `detect_faces` as verify.faces.mtcnn's.

    `threads`: ONNX Runtime intra-op threads per graph (0: its default, one per core). `chunk`: R-/O-net
    candidates per run (<= 0: all in one run); `pnet_pixels`: P-net input pixels per run (whole images,
    at least one). Neither changes the results. A missing or corrupt graph raises RuntimeGraphError."""

    def __init__(self, model_dir: Path = MTCNN_DIR, *, threads: int = 1, providers: Sequence[str] | None = None,
                 chunk: int = 16, pnet_pixels: int = 1 << 15) -> None:
        model_dir = Path(model_dir)
        self.model_dir = model_dir
        self.chunk = int(chunk)  # R-/O-net candidates per run (bounded memory); <= 0: all at once
        self.pnet_pixels = int(pnet_pixels)  # P-net input pixels per run (whole images, at least one)
        self.pnet, self.rnet, self.onet = (open_session(model_dir / f"{n}.onnx", threads=threads, providers=providers)
                                           for n in GRAPHS)

    @staticmethod
    def _forward(sess, x: np.ndarray) -> list[np.ndarray]:
        return sess.run(None, {sess.get_inputs()[0].name: x})

    def _run(self, sess, x: np.ndarray) -> list[np.ndarray]:
        """R-/O-net over all candidates, `chunk` at a time (the outputs do not depend on the chunking)."""
        if self.chunk <= 0 or len(x) <= self.chunk:
            return self._forward(sess, x)
        outs = [self._forward(sess, x[i : i + self.chunk]) for i in range(0, len(x), self.chunk)]
        return [np.concatenate(v, axis=0) for v in zip(*outs)]

    def _crops(self, sat: np.ndarray, boxes: np.ndarray, image_inds: np.ndarray, w: int, h: int, size: int
               ) -> tuple[np.ndarray, np.ndarray]:
        y, ey, x, ex = pad(boxes, w, h)
        keep = (ey > (y - 1)) & (ex > (x - 1))  # facenet skips empty boxes
        return crop_resample(sat, image_inds[keep], y[keep] - 1, ey[keep], x[keep] - 1, ex[keep], size), keep

    def pnet_stage(self, sat: np.ndarray, h: int, w: int, min_size: float, thresholds: Sequence[float],
                   factor: float) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: P-net over the pyramid, NMS per scale and over scales, regression, squares."""
        scales = pyramid_scales(h, w, min_size, factor)
        boxes_l, inds_l = [], []
        bsz = sat.shape[0]
        for s in scales:
            size = (int(h * s + 1), int(w * s + 1))
            step = max(1, self.pnet_pixels // (size[0] * size[1]))  # images per run: bounded memory
            parts = []
            for b0 in range(0, bsz, step):
                im = resample_whole(sat[b0 : b0 + step], size, scale=_NORM_SCALE, shift=-127.5 * _NORM_SCALE)
                reg, probs = self._forward(self.pnet, im)
                bs, ind = generate_bounding_box(reg, probs[:, 1], s, thresholds[0])
                parts.append((bs, ind + b0))  # image-major order, as one run over the batch gives
            bs = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
            ind = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
            pick = batched_nms(bs[:, :4], bs[:, 4], ind, 0.5)
            boxes_l.append(bs[pick])
            inds_l.append(ind[pick])
        if not boxes_l:
            return np.zeros((0, 5), dtype=_F), np.zeros(0, dtype=np.int64)
        boxes, image_inds = np.concatenate(boxes_l), np.concatenate(inds_l)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds = boxes[pick], image_inds[pick]
        regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = np.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                          boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]], axis=1)
        return rerec(boxes), image_inds

    def rnet_stage(self, sat: np.ndarray, boxes: np.ndarray, image_inds: np.ndarray, w: int, h: int,
                   thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Stage 2: R-net on 24x24 crops, threshold, NMS, regression, squares."""
        if len(boxes) == 0:
            return boxes, image_inds
        data, keep = self._crops(sat, boxes, image_inds, w, h, 24)
        boxes, image_inds = boxes[keep], image_inds[keep]
        if len(boxes) == 0:
            return boxes, image_inds
        reg, prob = self._run(self.rnet, data)
        score = prob[:, 1]
        ok = score > thresholds[1]
        boxes = np.concatenate((boxes[ok, :4], score[ok, None]), axis=1)
        image_inds, mv = image_inds[ok], reg[ok]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds, mv = boxes[pick], image_inds[pick], mv[pick]
        return rerec(bbreg(boxes, mv)), image_inds

    def onet_stage(self, sat: np.ndarray, boxes: np.ndarray, image_inds: np.ndarray, w: int, h: int,
                   thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stage 3: O-net on 48x48 crops: final boxes, probabilities, landmarks, "Min" NMS."""
        points = np.zeros((0, 5, 2), dtype=_F)
        if len(boxes) == 0:
            return boxes, points, image_inds
        data, keep = self._crops(sat, boxes, image_inds, w, h, 48)
        boxes, image_inds = boxes[keep], image_inds[keep]
        if len(boxes) == 0:
            return boxes, points, image_inds
        reg, pts, prob = self._run(self.onet, data)
        score = prob[:, 1]
        ok = score > thresholds[2]
        pts = pts[ok].T  # (10, N)
        boxes = np.concatenate((boxes[ok, :4], score[ok, None]), axis=1)
        image_inds, mv = image_inds[ok], reg[ok]
        w_i = boxes[:, 2] - boxes[:, 0] + _F(1)
        h_i = boxes[:, 3] - boxes[:, 1] + _F(1)
        px = w_i * pts[:5] + boxes[:, 0] - _F(1)  # (5, N)
        py = h_i * pts[5:10] + boxes[:, 1] - _F(1)
        points = np.stack((px, py)).transpose(2, 1, 0)  # (N, 5, 2)
        boxes = bbreg(boxes, mv)
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
        return boxes[pick], points[pick], image_inds[pick]

    def detect_faces(self, imgs: np.ndarray, min_size: float, thresholds: Sequence[float], factor: float
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """MTCNN on a batch of equal-sized (B, H, W, 3) uint8 RGB images. Per image (boxes (N, 5) float32:
        x1, y1, x2, y2, prob; points (N, 5, 2) float32), as verify.faces.mtcnn.detect_faces returns them.
        An image too small for the pyramid (shorter side < min_size) has no faces."""
        imgs = np.asarray(imgs)
        if imgs.ndim != 4 or imgs.shape[3] != 3:
            raise ValueError(f"detect_faces expects (B, H, W, 3) uint8 RGB images, got shape {imgs.shape}")
        bsz, h, w, _ = imgs.shape
        sat = summed_area_table(imgs)
        boxes, image_inds = self.pnet_stage(sat, h, w, min_size, thresholds, factor)
        boxes, image_inds = self.rnet_stage(sat, boxes, image_inds, w, h, thresholds)
        boxes, points, image_inds = self.onet_stage(sat, boxes, image_inds, w, h, thresholds)
        boxes = boxes.astype(_F, copy=False).reshape(-1, 5)
        points = points.astype(_F, copy=False).reshape(-1, 5, 2)
        return [(boxes[image_inds == b].copy(), points[image_inds == b].copy()) for b in range(bsz)]
