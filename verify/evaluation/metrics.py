"""Verification and attribute metrics on numpy arrays (no sklearn).

Conventions used throughout:
- `scores` are similarities (higher = more likely the same person) and a pair is accepted when
  `score >= threshold`. Pass `distances=True` for distances: the pair is accepted when
  `distance <= threshold`, and every returned threshold is in distance units.
- `labels` are 1/True for genuine (same person) pairs and 0/False for impostor pairs.
- FAR = accepted impostors / impostors, TAR = accepted genuines / genuines.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

log = logging.getLogger(__name__)


def _prepare(scores: ArrayLike, labels: ArrayLike, distances: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 similarity scores (negated distances) and bool labels."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1 or len(s) != len(y):
        raise ValueError(f"scores and labels must be 1-D of equal length, got shapes {s.shape} and {y.shape}")
    if len(s) == 0:
        raise ValueError("no pairs: scores and labels are empty")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores contain {int(np.sum(~np.isfinite(s)))} non-finite values (NaN/inf)")
    if y.dtype != bool:
        if not np.all(np.isin(y, (0, 1))):
            raise ValueError("labels must be boolean or 0/1 (1 = same person)")
        y = y.astype(bool)
    return (-s if distances else s), y


def _out_threshold(t: float, distances: bool) -> float:
    return float(-t if distances else t)


def _roc_points(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FAR, TAR at every distinct threshold, from +inf (accept nothing) down to min (accept all)."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # Last index of each run of equal scores: the operating point after accepting the whole run.
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s_sorted) - 1]
    tp = np.cumsum(y_sorted)[last]
    fp = np.cumsum(~y_sorted)[last]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tar = np.r_[0.0, tp / n_pos] if n_pos else np.full(len(last) + 1, np.nan)
    far = np.r_[0.0, fp / n_neg] if n_neg else np.full(len(last) + 1, np.nan)
    thresholds = np.r_[np.inf, s_sorted[last]]
    return far, tar, thresholds


def roc_curve(scores: ArrayLike, labels: ArrayLike, distances: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points (far, tar, thresholds), FAR non-decreasing; the first point accepts nothing
    (threshold +inf, or -inf for distances)."""
    s, y = _prepare(scores, labels, distances)
    if y.all() or not y.any():
        raise ValueError("roc_curve needs both genuine and impostor pairs")
    far, tar, thr = _roc_points(s, y)
    return far, tar, (-thr if distances else thr)


def auc(far: ArrayLike, tar: ArrayLike) -> float:
    """Area under the ROC curve by the trapezoid rule (far must be sorted ascending)."""
    far, tar = np.asarray(far, dtype=np.float64), np.asarray(tar, dtype=np.float64)
    if far.shape != tar.shape or far.ndim != 1 or len(far) < 2:
        raise ValueError(f"auc needs two 1-D arrays of equal length >= 2, got {far.shape} and {tar.shape}")
    if np.any(np.diff(far) < 0):
        raise ValueError("auc: far must be sorted ascending (as returned by roc_curve)")
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


def eer(scores: ArrayLike, labels: ArrayLike, distances: bool = False) -> tuple[float, float]:
    """Equal error rate and a threshold near it.

    The EER is interpolated linearly between the two ROC points where FAR - FRR changes sign. The
    threshold is that of the real operating point closest to the crossing (smallest |FAR - FRR|, ties
    to the stricter threshold).
    """
    s, y = _prepare(scores, labels, distances)
    if y.all() or not y.any():
        raise ValueError("eer needs both genuine and impostor pairs")
    far, tar, thr = _roc_points(s, y)
    frr = 1.0 - tar
    diff = far - frr  # -1 at the first point, +1 at the last: a crossing exists
    i = int(np.argmax(diff >= 0))
    d0, d1 = diff[i - 1], diff[i]
    w = d0 / (d0 - d1) if d1 != d0 else 0.0
    value = far[i - 1] + w * (far[i] - far[i - 1])
    j = 1 + int(np.argmin(np.abs(diff[1:])))  # skip the accept-nothing point (+inf threshold)
    return float(value), _out_threshold(thr[j], distances)


def _threshold_at_far(imp: np.ndarray, far: float) -> float:
    """Smallest threshold t (similarities) with #(imp >= t) <= floor(far * n): see threshold_at_far."""
    n = len(imp)
    budget = int(np.floor(far * n + 1e-9))  # false accepts allowed; epsilon for 0.01 * 1000 rounding
    if budget >= n:
        return float(imp.min())
    desc = np.sort(imp)[::-1]
    v = desc[budget]  # the (budget+1)-th largest impostor: it must be rejected, so must its ties
    above = desc[desc > v]
    return float(above.min()) if len(above) else float(np.nextafter(v, np.inf))


def threshold_at_far(impostor_scores: ArrayLike, far: float, distances: bool = False) -> float:
    """Threshold whose FAR on these impostors is <= `far`, accepting as many impostors as allowed.

    Allowed false accepts k = floor(far * n). Ties policy: impostors tied at the boundary are all
    rejected, so with ties the FAR may fall below the target, never above it. The threshold is an
    actual impostor score (the lowest one still accepted), or just above the highest impostor when
    k = 0. With k = 0 (far < 1/n) the estimate rests on the single highest impostor: unreliable.
    """
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    imp = np.asarray(impostor_scores, dtype=np.float64)
    if imp.ndim != 1 or len(imp) == 0:
        raise ValueError(f"impostor_scores must be a non-empty 1-D array, got shape {imp.shape}")
    if not np.all(np.isfinite(imp)):
        raise ValueError("impostor_scores contain non-finite values (NaN/inf)")
    if far * len(imp) < 1:
        log.debug("target FAR %g is below 1/%d impostors: threshold sits above every impostor", far, len(imp))
    t = _threshold_at_far(-imp if distances else imp, far)
    return _out_threshold(t, distances)


def tar_at_far(scores: ArrayLike, labels: ArrayLike, far: float, distances: bool = False) -> tuple[float, float]:
    """(TAR, threshold) at the threshold from `threshold_at_far` on the impostor pairs."""
    s, y = _prepare(scores, labels, distances)
    if y.all() or not y.any():
        raise ValueError("tar_at_far needs both genuine and impostor pairs")
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    t = _threshold_at_far(s[~y], far)
    return float(np.mean(s[y] >= t)), _out_threshold(t, distances)


def accuracy_at(scores: ArrayLike, labels: ArrayLike, threshold: float, distances: bool = False) -> float:
    """Fraction of pairs decided correctly at `threshold`."""
    s, y = _prepare(scores, labels, distances)
    t = -threshold if distances else threshold
    return float(np.mean((s >= t) == y))


def _best_threshold(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Best-accuracy threshold on similarities, placed midway between adjacent distinct scores."""
    far, tar, _ = _roc_points(s, y)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tp = np.nan_to_num(tar) * n_pos
    tn = n_neg - np.nan_to_num(far) * n_neg
    acc = (tp + tn) / len(s)  # per operating point, accept-nothing first
    distinct = np.unique(s)[::-1]  # descending
    # Operating point i accepts distinct[:i]; the matching cut lies between distinct[i-1] and distinct[i].
    mid = (distinct[:-1] + distinct[1:]) / 2.0
    mid = np.where(mid > distinct[1:], mid, distinct[:-1])  # adjacent floats: the midpoint may round down
    cuts = np.r_[np.nextafter(distinct[0], np.inf), mid, distinct[-1]]
    best = np.flatnonzero(acc >= acc.max() - 1e-12)
    # Ties: the middle of the tied candidates, so the threshold sits inside a best plateau, not on its edge.
    i = int(best[len(best) // 2])
    return float(cuts[i]), float(acc[i])


def best_accuracy_threshold(scores: ArrayLike, labels: ArrayLike, distances: bool = False) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy on these pairs.

    The threshold is placed midway between two adjacent distinct scores (same accuracy here, better
    on new pairs than sitting on a training score). Ties between equally good thresholds go to the
    middle one of the tied candidates.
    """
    s, y = _prepare(scores, labels, distances)
    t, acc = _best_threshold(s, y)
    return _out_threshold(t, distances), acc


def default_folds(labels: ArrayLike, n_folds: int = 10) -> np.ndarray:
    """Deterministic stratified folds: within each class, pair i (in input order) goes to fold i % n_folds."""
    y = np.asarray(labels).astype(bool)
    folds = np.empty(len(y), dtype=np.int64)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        folds[idx] = np.arange(len(idx)) % n_folds
    return folds


def kfold_accuracy(
    scores: ArrayLike,
    labels: ArrayLike,
    folds: np.ndarray | None = None,
    n_folds: int = 10,
    distances: bool = False,
) -> tuple[float, float, np.ndarray]:
    """LFW-protocol accuracy: for each fold, pick the best-accuracy threshold on the other folds and
    measure accuracy on the held-out fold. Returns (mean, std (population, as in the LFW code),
    per-fold thresholds). `folds` gives a fold id per pair (e.g. from pairs.txt); otherwise
    `default_folds(labels, n_folds)` is used.
    """
    s, y = _prepare(scores, labels, distances)
    if folds is None:
        if n_folds < 2:
            raise ValueError(f"n_folds must be >= 2, got {n_folds}")
        folds = default_folds(y, n_folds)
    folds = np.asarray(folds)
    if folds.shape != s.shape:
        raise ValueError(f"folds must give one fold id per pair: shape {folds.shape} vs {s.shape}")
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError(f"need at least 2 folds, got fold ids {fold_ids.tolist()}")
    accs, thresholds = [], []
    for f in fold_ids:
        test = folds == f
        t, _ = _best_threshold(s[~test], y[~test])
        accs.append(float(np.mean((s[test] >= t) == y[test])))
        thresholds.append(_out_threshold(t, distances))
    return float(np.mean(accs)), float(np.std(accs)), np.asarray(thresholds)


ORACLE_NOTE = "optimistic: best threshold chosen on these same pairs"


def far_key(far: float) -> str:
    """The one spelling of a FAR as a `tar_at_far` key: 1e-2 -> "1e-02"; a FAR that is not a power of
    ten as %g (0.25 -> "0.25")."""
    key = f"{far:.0e}"
    return key if float(key) == far else f"{far:g}"


def summarise_verification(
    scores: ArrayLike,
    labels: ArrayLike,
    *,
    fars: Sequence[float] = (1e-2, 1e-3),
    folds: np.ndarray | None = None,
    n_folds: int = 10,
    threshold: float | None = None,
    distances: bool = False,
    accuracy: bool = True,
) -> dict:
    """The verification summary of one scored pair set, plain python values (JSON-ready).

    `accuracy`: at `threshold` when one is given (`accuracy_std` None: one threshold, no spread), else
    k-fold (`folds`, or `default_folds(labels, n_folds)`), with `threshold` the mean of the folds'
    thresholds and `fold_thresholds` each. `accuracy_oracle`: at the best threshold for these very
    pairs (optimistic). `tar_at_far[far_key(f)]` is None where the impostors are too few to measure
    that FAR (f * impostors < 1); `auc` / `eer` are None without both genuine and impostor pairs.
    Thresholds are in the units of `scores` (distances with `distances=True`). `accuracy=False` leaves
    out the accuracy keys (their threshold searches cost ~6x the ROC figures on millions of pairs).
    """
    s, y = _prepare(scores, labels, distances)
    out: dict = {}
    if accuracy:
        if threshold is None:
            acc, acc_std, fold_thr = kfold_accuracy(s, y, folds=folds, n_folds=n_folds)
            fold_thr = [_out_threshold(t, distances) for t in fold_thr]
            out.update(accuracy=acc, accuracy_std=acc_std, threshold=float(np.mean(fold_thr)),
                       fold_thresholds=fold_thr)
        else:
            t = -threshold if distances else threshold
            out.update(accuracy=float(np.mean((s >= t) == y)), accuracy_std=None, threshold=float(threshold))
        oracle_t, oracle_acc = _best_threshold(s, y)
        out.update(accuracy_oracle=oracle_acc, accuracy_oracle_threshold=_out_threshold(oracle_t, distances),
                   accuracy_oracle_note=ORACLE_NOTE)
    both = bool(y.any() and (~y).any())
    if both:
        far, tar, _ = _roc_points(s, y)
        eer_value, eer_t = eer(s, y)
        out.update(auc=auc(far, tar), eer=eer_value, eer_threshold=_out_threshold(eer_t, distances))
    else:
        out.update(auc=None, eer=None, eer_threshold=None)
    n_imp = int((~y).sum())
    tars: dict[str, float | None] = {}
    for f in fars:
        if both and f * n_imp >= 1:
            tars[far_key(f)] = tar_at_far(s, y, f)[0]
        else:
            log.debug("TAR@FAR=%g not reported: only %d impostor pairs", f, n_imp)
            tars[far_key(f)] = None
    out.update(tar_at_far=tars, pairs=int(len(s)), genuine=int(y.sum()), impostor=n_imp)
    return out


# ---- attributes ----------------------------------------------------------------------------------


def _binary_targets(targets: ArrayLike) -> np.ndarray:
    t = np.asarray(targets)
    if t.ndim != 2:
        raise ValueError(f"attribute targets must be (N, A), got shape {t.shape}")
    if not np.all(np.isin(t, (-1, 0, 1))):
        raise ValueError("attribute targets must be 0/1 or -1/1 (CelebA style)")
    return t > 0


def attribute_accuracy(logits_or_probs: ArrayLike, targets: ArrayLike, kind: str = "logits") -> tuple[np.ndarray, float]:
    """Per-attribute accuracy (A,) and its mean.

    kind: "logits" (positive when > 0) or "probs" (positive when > 0.5); stated by the caller since
    the two cannot be told apart reliably from the values. Targets may be 0/1 or -1/1.
    """
    x = np.asarray(logits_or_probs, dtype=np.float64)
    t = _binary_targets(targets)
    if x.shape != t.shape:
        raise ValueError(f"predictions {x.shape} and targets {t.shape} differ in shape")
    if kind == "logits":
        pred = x > 0
    elif kind == "probs":
        if x.min(initial=0.0) < 0 or x.max(initial=1.0) > 1:
            raise ValueError("kind='probs' but values lie outside [0, 1]: pass kind='logits'")
        pred = x > 0.5
    else:
        raise ValueError(f"kind must be 'logits' or 'probs', got {kind!r}")
    per = np.mean(pred == t, axis=0)
    return per, float(per.mean())


def majority_baseline(
    targets_eval: ArrayLike, targets_reference: ArrayLike | None = None
) -> tuple[np.ndarray, float]:
    """Per-attribute accuracy (A,) and mean of always predicting each attribute's majority class.

    The majority is taken on `targets_reference` (the training set) when given, else on the eval set
    itself (an optimistic baseline). A 50/50 tie predicts the negative class.
    """
    ev = _binary_targets(targets_eval)
    ref = ev if targets_reference is None else _binary_targets(targets_reference)
    if ref.shape[1] != ev.shape[1]:
        raise ValueError(f"reference has {ref.shape[1]} attributes, eval has {ev.shape[1]}")
    majority = ref.mean(axis=0) > 0.5  # (A,)
    per = np.mean(ev == majority[None, :], axis=0)
    return per, float(per.mean())
