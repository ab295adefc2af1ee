"""A faster driver for facenet-pytorch's MTCNN networks: the same three stages, the same weights.

facenet-pytorch's `detect_face` cuts every candidate box out of the image and resamples it to
24x24 (R-net) or 48x48 (O-net) one box at a time, and runs the networks in the default memory
layout, where CPU max-pooling is slow. On 250x250 photos those two account for most of the
detection time. Here:

- one channels-last summed-area table per image (integer sums, numpy: its cumulative sums are 3x
  faster than torch's on big photos) serves every area resampling, so the averages are those of
  `interpolate(mode="area")` up to float rounding: the pyramid levels by whole rows and columns
  (area averaging is separable: two row gathers, two column gathers), all R-/O-net candidates of a
  batch in one gather of box corners;
- the networks run on channels-last tensors (same arithmetic, faster pooling on CPU).

Everything else (pyramid scales, thresholds, box regression, the NMS steps and their order) calls
facenet-pytorch's own helpers, so the detections match `MTCNN.detect` (tested on LFW photos).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.ops.boxes import batched_nms

from facenet_pytorch.models.utils.detect_face import (
    batched_nms_numpy,
    bbreg,
    generateBoundingBox,
    pad,
    rerec,
)

from verify.faces.mtcnn_onnx import pyramid_scales  # numpy only, shared with the ONNX Runtime driver


def _area_weights(start: torch.Tensor, end: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell edges of adaptive average pooling of spans [start, end) into `size` cells: (N, size) each.

    Same rule as PyTorch's adaptive_avg_pool2d: cell i covers [floor(i*L/size), ceil((i+1)*L/size)).
    """
    length = (end - start).view(-1, 1)  # (N, 1)
    i = torch.arange(size, dtype=torch.int64).view(1, -1)  # (1, size)
    lo = torch.div(i * length, size, rounding_mode="floor")
    hi = torch.div((i + 1) * length + size - 1, size, rounding_mode="floor")
    return start.view(-1, 1) + lo, start.view(-1, 1) + hi


def summed_area_table(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 images -> (B, H+1, W+1, C) integer tables of sums of image[:y, :x].

    Channels last, so that one box corner is one contiguous row of C sums (a fast gather). int32
    while the sums fit (any image up to 8.4 megapixels), int64 beyond.
    """
    images = np.asarray(images)
    b, h, w, c = images.shape
    dtype = np.int32 if h * w * 255 < 2**31 else np.int64
    sat = np.zeros((b, h + 1, w + 1, c), dtype=dtype)
    inner = sat[:, 1:, 1:]
    np.cumsum(images, axis=1, dtype=dtype, out=inner)
    np.cumsum(inner, axis=2, out=inner)
    return torch.from_numpy(sat)


def resample_whole(sat: torch.Tensor, size: tuple[int, int], scale: float = 1.0, shift: float = 0.0
                   ) -> torch.Tensor:
    """Area-resample whole images, given their summed-area tables (B, H+1, W+1, C), to
    (B, C, size_h, size_w) float32 (channels-last memory): `interpolate(mode="area") * scale + shift`
    per image (the affine map lets MTCNN's input normalisation ride along, in place).

    Separable: the sums over the cells' rows, then over their columns (numpy `take` of whole rows,
    then columns, is several times faster than a gather of every cell's four corners).
    """
    table = sat.numpy()
    _, h1, w1, _ = table.shape
    zero = torch.zeros(1, dtype=torch.int64)
    ys, ye = (v[0].numpy() for v in _area_weights(zero, torch.full((1,), h1 - 1), size[0]))
    xs, xe = (v[0].numpy() for v in _area_weights(zero, torch.full((1,), w1 - 1), size[1]))
    rows = np.take(table, ye, axis=1) - np.take(table, ys, axis=1)  # (B, sh, W+1, C): row-cell sums
    out = (np.take(rows, xe, axis=2) - np.take(rows, xs, axis=2)).astype(np.float32)  # (B, sh, sw, C) cell sums
    out *= (scale / ((ye - ys)[:, None] * (xe - xs)[None, :])).astype(np.float32)[..., None]  # / cell area
    if shift:
        out += np.float32(shift)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def crop_resample(sat: torch.Tensor, image_inds: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray,
                  x1: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """Area-resample boxes [y0:y1, x0:x1] of images `image_inds`, given their summed-area tables
    (B, H+1, W+1, C), to (N, C, size_h, size_w) (channels-last memory).

    Equivalent to `interpolate(image[:, y0:y1, x0:x1][None], (size_h, size_w), mode="area")` per box.
    """
    sh, sw = (size, size) if isinstance(size, int) else size
    _, h1, w1, c = sat.shape
    ys, ye = _area_weights(torch.as_tensor(y0, dtype=torch.int64), torch.as_tensor(y1, dtype=torch.int64), sh)
    xs, xe = _area_weights(torch.as_tensor(x0, dtype=torch.int64), torch.as_tensor(x1, dtype=torch.int64), sw)
    base = torch.as_tensor(image_inds, dtype=torch.int64).view(-1, 1, 1) * (h1 * w1)  # (N, 1, 1)
    rows = torch.stack([ye, ys, ye, ys])[:, :, :, None] * w1  # (4, N, sh, 1): corners D, B, C, A
    cols = torch.stack([xe, xe, xs, xs])[:, :, None, :]  # (4, N, 1, sw)
    idx = (base + rows + cols).reshape(-1)  # (4 * N * sh * sw,)
    corners = sat.view(-1, c).index_select(0, idx).view(4, len(ys), sh, sw, c)
    total = corners[0] - corners[1] - corners[2] + corners[3]  # (N, sh, sw, C)
    area = ((ye - ys)[:, :, None] * (xe - xs)[:, None, :]).to(torch.float32)  # (N, sh, sw)
    return (total.to(torch.float32) / area[..., None]).permute(0, 3, 1, 2)  # (N, C, sh, sw), channels-last


def _run(net: torch.nn.Module, x: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, ...]:
    """Forward in chunks (bounded memory), channels-last."""
    outs = [net(x[i : i + batch].contiguous(memory_format=torch.channels_last)) for i in range(0, len(x), batch)]
    return tuple(torch.cat(v, dim=0) for v in zip(*outs))


def _crops(sat: torch.Tensor, boxes: torch.Tensor, image_inds: torch.Tensor, w: int, h: int, size: int
           ) -> tuple[torch.Tensor, np.ndarray]:
    """Every box cut and resampled as facenet-pytorch does (its 1-based `pad` clipping); (N, 3, s, s)."""
    y, ey, x, ex = pad(boxes, w, h)
    keep = (ey > (y - 1)) & (ex > (x - 1))  # facenet skips empty boxes
    inds = image_inds.cpu().numpy()
    return crop_resample(sat, inds[keep], y[keep] - 1, ey[keep], x[keep] - 1, ex[keep], size), keep


@torch.inference_mode()
def detect_faces(
    imgs: np.ndarray,
    pnet: torch.nn.Module,
    rnet: torch.nn.Module,
    onet: torch.nn.Module,
    min_size: float,
    thresholds: Sequence[float],
    factor: float,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """MTCNN on a batch of equal-sized (B, H, W, 3) uint8 RGB images (CPU).

    Returns per image (boxes (N, 5): x1, y1, x2, y2, prob; points (N, 5, 2)), like facenet-pytorch's
    `detect_face`.
    """
    bsz, h, w, _ = imgs.shape
    # One summed-area table per image serves the whole pyramid and the R-/O-net crops.
    sat = summed_area_table(imgs)  # (B, H+1, W+1, 3)
    scales = pyramid_scales(h, w, min_size, factor)

    # Stage 1: P-net over the pyramid (as facenet-pytorch).
    boxes_l, inds_l, picks, offset = [], [], [], 0
    for s in scales:
        # = (imresample(...) - 127.5) * 0.0078125, as facenet-pytorch normalises the P-net input
        im = resample_whole(sat, (int(h * s + 1), int(w * s + 1)), scale=0.0078125, shift=-127.5 * 0.0078125)
        reg, probs = pnet(im)  # channels-last input
        bs, ind = generateBoundingBox(reg, probs[:, 1], s, thresholds[0])
        boxes_l.append(bs)
        inds_l.append(ind)
        picks.append(batched_nms(bs[:, :4], bs[:, 4], ind, 0.5) + offset)
        offset += bs.shape[0]
    boxes = torch.cat(boxes_l)[torch.cat(picks)]
    image_inds = torch.cat(inds_l)[torch.cat(picks)]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                         boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]], dim=1)
    boxes = rerec(boxes)

    # Stage 2: R-net on 24x24 crops.
    if len(boxes) > 0:
        data, keep = _crops(sat, boxes, image_inds, w, h, 24)
        boxes, image_inds = boxes[torch.from_numpy(keep)], image_inds[torch.from_numpy(keep)]
        reg, prob = _run(rnet, (data - 127.5) * 0.0078125)
        score = prob[:, 1]
        ok = score > thresholds[1]
        boxes = torch.cat((boxes[ok, :4], score[ok].unsqueeze(1)), dim=1)
        image_inds, mv = image_inds[ok], reg[ok]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds, mv = boxes[pick], image_inds[pick], mv[pick]
        boxes = rerec(bbreg(boxes, mv))

    # Stage 3: O-net on 48x48 crops: final boxes, probabilities and landmarks.
    points = torch.zeros(0, 5, 2)
    if len(boxes) > 0:
        data, keep = _crops(sat, boxes, image_inds, w, h, 48)
        boxes, image_inds = boxes[torch.from_numpy(keep)], image_inds[torch.from_numpy(keep)]
        reg, pts, prob = _run(onet, (data - 127.5) * 0.0078125)
        score = prob[:, 1]
        ok = score > thresholds[2]
        pts = pts[ok].T  # (10, N)
        boxes = torch.cat((boxes[ok, :4], score[ok].unsqueeze(1)), dim=1)
        image_inds, mv = image_inds[ok], reg[ok]
        w_i = boxes[:, 2] - boxes[:, 0] + 1
        h_i = boxes[:, 3] - boxes[:, 1] + 1
        px = w_i.repeat(5, 1) * pts[:5] + boxes[:, 0].repeat(5, 1) - 1
        py = h_i.repeat(5, 1) * pts[5:10] + boxes[:, 1].repeat(5, 1) - 1
        points = torch.stack((px, py)).permute(2, 1, 0)  # (N, 5, 2)
        boxes = bbreg(boxes, mv)
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
        boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]

    boxes_np, points_np, inds_np = boxes.numpy(), points.numpy(), image_inds.numpy()
    return [(boxes_np[inds_np == b].copy(), points_np[inds_np == b].copy()) for b in range(bsz)]
