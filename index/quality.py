"""Face quality: measured signals of one detected face and the score `people` gates on (numpy only).

A face that groups wrongly is most often not a person's odd photo but a poor face: a half face cut off
at the photo's border, a small or blurred one, a profile. The signals, all from what a scan has at
hand (box, detector probability, 5 landmarks, the photo's size, the aligned crop's pixels):

- prob:      the detector's probability (MTCNN's output net)
- size_px:   the face box's shorter side in original pixels
- outside:   share of the face's core that lies outside the photo (0 = all inside): the core is the
             square the 5 landmarks span (CORE_SIDE x the larger of the eye distance and the eyes-to-mouth
             height, centred on the landmarks' mean). Not the detector's box: a tight portrait crop
             (UTKFace's 200 px chips) has its box 30% past the border with the whole face inside, where a
             half face cut off at the border has its landmarks at the edge
- yaw:       |horizontal offset of the nose from the eyes' midpoint| / eye distance (0 = frontal; a
             profile reaches 0.5 and more)
- roll_deg:  |angle of the eye line| in degrees
- pitch:     |(nose height - eye height) / (mouth height - eye height) - PITCH_FRONTAL| (nodding)
- blur:      variance of the Laplacian of the aligned crop's grey centre (low = blurred or tiny)

`quality_score` combines them into one number in (0, 1): the logistic model in QUALITY_WEIGHTS,
fitted by bench/bench_groups.py (--fit-quality) to predict that a face's nearest neighbour is another
person (the mark of a face that groups wrongly) on the selection sets (CelebA partition 1, LFW
DevTrain), score = 1 - P(wrong). A signal that is unknown (a face indexed before the score existed
has no crop, so no blur; a face without the photo's size has no `outside`) takes the selection set's
median, so it neither helps nor hurts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

DEFAULT_MIN_QUALITY = 0.1  # `faceverify people --min-quality`: faces below it form no group (chosen: docs/people.md)
SIGNALS = ("prob", "size_px", "outside", "yaw", "roll_deg", "pitch", "blur")
PITCH_FRONTAL = 0.45  # (nose - eyes) / (mouth - eyes) height of a frontal face (CelebA's aligned median)

# Fitted by `bench/bench_groups.py --fit-quality` (2026-12-06); see docs/people.md. Features are
# FEATURES(signals) below, standardised by (mean, scale); intercept first.
QUALITY_FEATURES = ("logit_prob", "log_size", "outside", "yaw", "roll", "pitch", "log_blur")
QUALITY_MEAN = (9.8335, 4.4855, 0.0146, 0.1215, 0.0439, 0.1186, 6.745)
QUALITY_SCALE = (2.5329, 0.1464, 0.0864, 0.1119, 0.0648, 0.0787, 0.7231)
QUALITY_WEIGHTS = (-1.2775, 0.0, -0.3183, 2.0999, 0.1743, 0.6262, 0.0, -0.6181)  # intercept, then one per feature
# What an unknown signal is taken to be: the median over the faces bench_groups.py caches (CelebA
# partitions 1-2, LFW)
SIGNAL_MEDIANS = {"prob": 0.9999, "size_px": 87.7, "outside": 0.0, "yaw": 0.093, "roll_deg": 1.42,
                  "pitch": 0.117, "blur": 1044.0}


@dataclass
class FaceSignals:
    """The measured signals of one face; None = not known (see the module docstring)."""

    prob: float | None = None
    size_px: float | None = None
    outside: float | None = None
    yaw: float | None = None
    roll_deg: float | None = None
    pitch: float | None = None
    blur: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


# chosen on LFW's faces (the box's AUC for a wrongly grouped face 0.620; the core's 0.583 / 0.596 /
# 0.608 / 0.622 at 1.2 / 1.5 / 1.8 / 2.2) against UTKFace's chips (share of chips with any core
# outside: 3% / 14% / 49% / 93%; the box: 98% over 0.1): the side that keeps whole faces inside
CORE_SIDE = 1.5


def core_box(landmarks: np.ndarray) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) of the face's core from MTCNN's 5 landmarks (see the module docstring)."""
    p = np.asarray(landmarks, np.float64).reshape(5, 2)
    eye_dist = float(np.hypot(*(p[1] - p[0])))
    eyes_to_mouth = float(np.hypot(*((p[3] + p[4]) / 2 - (p[0] + p[1]) / 2)))
    half = CORE_SIDE * max(eye_dist, eyes_to_mouth) / 2
    cx, cy = p.mean(axis=0)
    return float(cx - half), float(cy - half), float(cx + half), float(cy + half)


def outside_share(box: Sequence[float], image_size: tuple[int, int]) -> float:
    """Share (0..1) of the box's area outside the photo of `image_size` (width, height) pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = image_size
    area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    if area <= 0:
        return 1.0
    inside = max(min(x2, w) - max(x1, 0.0), 0.0) * max(min(y2, h) - max(y1, 0.0), 0.0)
    return float(1.0 - inside / area)


def pose_from_landmarks(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, roll in degrees, pitch) proxies from MTCNN's 5 landmarks (left eye, right eye, nose,
    mouth left, mouth right), each >= 0 with 0 = frontal (see the module docstring)."""
    p = np.asarray(landmarks, np.float64).reshape(5, 2)
    eye_l, eye_r, nose = p[0], p[1], p[2]
    mouth = (p[3] + p[4]) / 2
    axis = eye_r - eye_l
    eye_dist = float(np.hypot(*axis))
    if eye_dist < 1e-6:
        return 1.0, 90.0, 1.0  # degenerate: both eyes on one point, as far from frontal as it gets
    roll = math.atan2(axis[1], axis[0])
    c, s = math.cos(-roll), math.sin(-roll)
    rot = np.array([[c, -s], [s, c]])
    mid = (eye_l + eye_r) / 2
    nose_r, mouth_r = rot @ (nose - mid), rot @ (mouth - mid)  # eye line horizontal, eyes' midpoint at 0
    yaw = abs(nose_r[0]) / eye_dist
    pitch = abs(nose_r[1] / mouth_r[1] - PITCH_FRONTAL) if mouth_r[1] > 1e-6 else 1.0
    return float(yaw), float(abs(math.degrees(roll))), float(pitch)


def blur_of_crop(crop: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the central half of an aligned (S, S, 3) or (S, S)
    uint8 crop, in grey levels^2, after resampling to 64 x 64 so that every model's crop reads alike."""
    g = np.asarray(crop, np.float32)
    if g.ndim == 3:
        g = g.mean(axis=2)  # (S, S)
    s = g.shape[0]
    idx = (np.arange(64) * s / 64 + s / 128).astype(np.int64).clip(0, s - 1)
    g = g[np.ix_(idx, idx)]  # (64, 64) nearest-neighbour resample: keeps the pixels' own sharpness
    c = g[16:48, 16:48]
    lap = 4 * c[1:-1, 1:-1] - c[:-2, 1:-1] - c[2:, 1:-1] - c[1:-1, :-2] - c[1:-1, 2:]  # (30, 30)
    return float(lap.var())


def face_signals(box: Sequence[float], landmarks: np.ndarray, prob: float | None = None,
                 image_size: tuple[int, int] | None = None, crop: np.ndarray | None = None) -> FaceSignals:
    """The signals of one face from what is at hand: box and landmarks in original pixels, the
    detector's probability, the photo's (width, height) and the aligned crop (either may be None)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    yaw, roll, pitch = pose_from_landmarks(landmarks)
    return FaceSignals(prob=None if prob is None or not math.isfinite(prob) else float(prob),
                       size_px=max(min(x2 - x1, y2 - y1), 0.0),
                       outside=None if image_size is None else outside_share(core_box(landmarks), image_size),
                       yaw=yaw, roll_deg=roll, pitch=pitch,
                       blur=None if crop is None else blur_of_crop(crop))


def quality_features(signals: Sequence[FaceSignals]) -> np.ndarray:
    """(N, len(QUALITY_FEATURES)) float64 features, unknown signals at SIGNAL_MEDIANS, unstandardised."""
    def get(s: FaceSignals, name: str) -> float:
        v = getattr(s, name)
        return SIGNAL_MEDIANS[name] if v is None or not math.isfinite(v) else float(v)

    rows = []
    for s in signals:
        prob = min(max(get(s, "prob"), 1e-6), 1 - 1e-6)
        rows.append((math.log(prob / (1 - prob)), math.log(max(get(s, "size_px"), 1.0)), get(s, "outside"),
                     min(get(s, "yaw"), 2.0), math.radians(get(s, "roll_deg")), min(get(s, "pitch"), 2.0),
                     math.log1p(max(get(s, "blur"), 0.0))))
    return np.asarray(rows, np.float64).reshape(len(rows), len(QUALITY_FEATURES))


def quality_scores(signals: Sequence[FaceSignals], weights: Sequence[float] = QUALITY_WEIGHTS,
                   mean: Sequence[float] = QUALITY_MEAN, scale: Sequence[float] = QUALITY_SCALE) -> np.ndarray:
    """(N,) float64 quality in (0, 1) of each face: 1 - P(its nearest neighbour is another person)."""
    x = (quality_features(signals) - np.asarray(mean)) / np.asarray(scale)  # (N, F)
    w = np.asarray(weights, np.float64)
    logit_wrong = w[0] + x @ w[1:]
    return 1.0 / (1.0 + np.exp(logit_wrong))


def quality_score(signals: FaceSignals) -> float:
    """quality_scores of one face."""
    return float(quality_scores([signals])[0])
