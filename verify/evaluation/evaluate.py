"""Verification on LFW-format pair files, and the impostor cohort shipped in a model file.

Images go through the same pipeline as `faceverify verify` (load -> MTCNN -> `align` to the model's
crop geometry), or, for already aligned sets such as CelebA (`aligned=True`), through `fixed_crop`.
The score of a pair is the cosine similarity of the two embeddings.

Choices, stated once:
- Which face: LFW pair images are centred on their subject, and another, larger face sometimes shares
  the frame (measured: in 3 of 96 DevTest images the largest face is not the centred one). We take the
  face whose box centre is nearest the image centre among faces with at least half the largest face's
  area (`face_choice="central"`); `"largest"` is what `verify` does with a single photo.
- An image with no detected face falls back to a centre crop of the same scale (`no_face="centre"`):
  the median landmarks of the faces found in same-sized images of this run (LFW: all 250x250), or,
  when there are none, the median MTCNN landmarks of LFW deep-funneled images scaled to the image. The
  image still gets an embedding; it is counted in `failed_images` / `no_face_images`.
- An image that cannot be read has no embedding (a NaN row). Its pairs score FAILED_SCORE, below every
  cosine similarity: a genuine pair counts as a false reject, an impostor pair as a reject. It is
  counted in `failed_images` / `unreadable_images`, its pairs in `failed_pairs`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, MutableMapping, Sequence

import numpy as np

from verify.faces import (
    AlignedFace, DetectorConfig, FaceDetector, FacePipeline, ImageLoadError, align, fixed_crop, load_image,
)
from verify.atomic import atomic_path
from verify.evaluation.metrics import ORACLE_NOTE, auc, best_accuracy_threshold, roc_curve, summarise_verification
from verify.model.file import Embedder
from verify.model.cohort import CohortSources, read_cohort_vectors, write_cohort_sources
from verify.model.write import attach_cohort
from verify.data.pairs import lfw_image_path, read_lfw_pairs
from verify.model.device import resolve_device

log = logging.getLogger(__name__)

FAILED_SCORE = -2.0  # below every cosine similarity: the score of a pair with an unreadable image

# Median MTCNN landmarks (x, y) of 96 LFW deep-funneled DevTest images (250x250), measured once with
# FaceDetector defaults; the no-face fallback when no same-sized image of the run had a face.
LFW_FRAME = 250
LFW_LANDMARKS = np.array(
    [[105.0, 114.0], [146.6, 112.5], [126.5, 137.2], [108.4, 159.4], [144.7, 158.4]], dtype=np.float64
)

OVERLAP_NOTE = (
    "CelebA celebrities and LFW people overlap in part: LFW figures of a model trained on CelebA are optimistic"
)

EmbeddingCache = MutableMapping[tuple, np.ndarray]


# --------------------------------------------------------------------------------------------------
# Embedding images


def choose_face(faces: Sequence[AlignedFace], image_size: tuple[int, int], min_area_ratio: float = 0.5) -> int:
    """Index of the face whose box centre is nearest the image centre, among faces whose area is at
    least `min_area_ratio` of the largest one's (`faces` as FacePipeline gives them: largest first)."""
    if not faces:
        raise ValueError("choose_face needs at least one face")
    w, h = image_size
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0  # pixel-centre coordinates
    largest = max(f.face.area for f in faces)
    best, best_d = 0, np.inf
    for i, f in enumerate(faces):
        if f.face.area < min_area_ratio * largest:
            continue
        x1, y1, x2, y2 = f.face.box
        d = float(np.hypot((x1 + x2) / 2.0 - cx, (y1 + y2) / 2.0 - cy))
        if d < best_d:
            best, best_d = i, d
    return best


def fallback_landmarks(image_size: tuple[int, int]) -> np.ndarray:
    """LFW's median landmarks, scaled by min(w, h) / 250 about the image centre: (5, 2)."""
    w, h = image_size
    s = min(w, h) / LFW_FRAME
    centre_lfw = (LFW_FRAME - 1) / 2.0
    pts = (LFW_LANDMARKS - centre_lfw) * s
    pts[:, 0] += (w - 1) / 2.0
    pts[:, 1] += (h - 1) / 2.0
    return pts


def _cache_key(embedder: Embedder, path: Path, aligned: bool, face_choice: str) -> tuple:
    return (embedder.fingerprint, str(path), bool(aligned), face_choice)


def _from_cache(entry: tuple, path: Path, no_face: str, dim: int) -> tuple | None:
    """A cached (vec, error, status) as this call's `no_face` policy wants it; None: embed again."""
    vec, err, status = entry
    if status == "centre_crop" and no_face == "fail":
        return np.full(dim, np.nan, dtype=np.float32), f"{path}: no face found", "no_face"
    if status == "no_face" and no_face == "centre":
        return None  # the centre crop was never made
    return entry


def embed_images(
    paths: Sequence[Path],
    embedder: Embedder,
    *,
    aligned: bool = False,
    detector_config: DetectorConfig | None = None,
    batch_size: int = 64,
    progress: bool = True,
    face_choice: str = "central",
    no_face: str = "centre",
    cache: EmbeddingCache | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """Embed each image: (N, D) float32 unit rows and one error per image (None when a face was found).

    Detect path (`aligned=False`): load -> MTCNN -> the face chosen by `face_choice` ("central" or
    "largest", see the module docstring) -> `align` to `embedder.geometry`. An image with no face gets
    a centre crop (`no_face="centre"`, its error says so) or a NaN row (`no_face="fail"`).
    Aligned path: load -> `fixed_crop`. Unreadable images always get a NaN row and their one-line error.
    Repeated paths are embedded once. `cache` (any dict) keeps embeddings across calls.
    """
    emb, errors, _ = _embed_status(paths, embedder, aligned=aligned, detector_config=detector_config,
                                   batch_size=batch_size, progress=progress, face_choice=face_choice,
                                   no_face=no_face, cache=cache)
    return emb, errors


# Per-image outcome: a face was found ("ok"), none and a centre crop was used ("centre_crop"), none and
# no embedding ("no_face", with no_face="fail"), or the file could not be read ("unreadable").
STATUSES = ("ok", "centre_crop", "no_face", "unreadable")


def _embed_status(
    paths: Sequence[Path],
    embedder: Embedder,
    *,
    aligned: bool,
    detector_config: DetectorConfig | None,
    batch_size: int,
    progress: bool,
    face_choice: str,
    no_face: str,
    cache: EmbeddingCache | None,
) -> tuple[np.ndarray, list[str | None], list[str]]:
    if face_choice not in ("central", "largest"):
        raise ValueError(f"face_choice must be 'central' or 'largest', got {face_choice!r}")
    if no_face not in ("centre", "fail"):
        raise ValueError(f"no_face must be 'centre' or 'fail', got {no_face!r}")
    paths = [Path(p) for p in paths]
    unique = list(dict.fromkeys(paths))  # first-appearance order
    key = lambda p: _cache_key(embedder, p, aligned, face_choice)  # noqa: E731
    known: dict[Path, tuple[np.ndarray, str | None, str]] = {}
    if cache is not None:
        for p in unique:
            hit = _from_cache(cache[key(p)], p, no_face, embedder.dim) if key(p) in cache else None
            if hit is not None:
                known[p] = hit
    todo = [p for p in unique if p not in known]
    if todo:
        run = _embed_aligned if aligned else _embed_detected
        new = run(todo, embedder, detector_config=detector_config, batch_size=batch_size, progress=progress,
                  face_choice=face_choice, no_face=no_face)
        known.update(new)
        if cache is not None:
            for p in todo:
                cache[key(p)] = new[p]
    emb = np.full((len(paths), embedder.dim), np.nan, dtype=np.float32)  # (N, D)
    errors: list[str | None] = []
    statuses: list[str] = []
    for i, p in enumerate(paths):
        vec, err, status = known[p]
        emb[i] = vec
        errors.append(err)
        statuses.append(status)
    return emb, errors, statuses


class _CropBatcher:
    """Collects (S, S, 3) crops and embeds them `batch_size` at a time (bounded memory)."""

    def __init__(self, embedder: Embedder, batch_size: int, out: dict) -> None:
        self.embedder, self.batch_size, self.out = embedder, batch_size, out
        self.crops: list[np.ndarray] = []
        self.items: list[tuple[Path, str | None, str]] = []

    def add(self, path: Path, crop: np.ndarray, error: str | None, status: str) -> None:
        self.crops.append(crop)
        self.items.append((path, error, status))
        if len(self.crops) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.crops:
            return
        vecs = self.embedder.embed(np.stack(self.crops), batch_size=self.batch_size)  # (B, D)
        for (path, error, status), vec in zip(self.items, vecs):
            self.out[path] = (vec, error, status)
        self.crops, self.items = [], []


def _nan_row(embedder: Embedder) -> np.ndarray:
    return np.full(embedder.dim, np.nan, dtype=np.float32)


def _progress_bar(total: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)


def _embed_aligned(paths, embedder, *, batch_size, progress, **_) -> dict:
    out: dict[Path, tuple[np.ndarray, str | None, str]] = {}
    batcher = _CropBatcher(embedder, batch_size, out)
    geometry = embedder.geometry
    with _progress_bar(len(paths), progress, "embedding (aligned)") as bar:
        for p in paths:
            try:
                batcher.add(p, fixed_crop(load_image(p), geometry), None, "ok")
            except ImageLoadError as exc:
                log.info("%s", exc)
                out[p] = (_nan_row(embedder), str(exc), "unreadable")
            bar.update(1)
    batcher.flush()
    return out


def _embed_detected(paths, embedder, *, detector_config, batch_size, progress, face_choice, no_face) -> dict:
    config = detector_config or DetectorConfig(device=embedder.device.type)
    pipeline = FacePipeline(FaceDetector(config), embedder=embedder)
    out: dict[Path, tuple[np.ndarray, str | None, str]] = {}
    batcher = _CropBatcher(embedder, batch_size, out)
    found_landmarks: dict[tuple[int, int], list[np.ndarray]] = {}  # image size -> chosen faces' landmarks
    faceless: list[tuple[Path, tuple[int, int]]] = []
    with _progress_bar(len(paths), progress, "detecting + embedding") as bar:
        for p, res in zip(paths, pipeline.iter_process(paths, chunk_size=config.batch_size)):
            bar.update(1)
            if not res.ok:
                out[p] = (_nan_row(embedder), res.error, "unreadable")
            elif not res.faces:
                faceless.append((p, res.image_size))
            else:
                i = choose_face(res.faces, res.image_size) if face_choice == "central" else 0
                found_landmarks.setdefault(res.image_size, []).append(res.faces[i].face.landmarks)
                out[p] = (res.embeddings[i], None, "ok")
    for p, size in faceless:
        if no_face == "fail":
            out[p] = (_nan_row(embedder), f"{p}: no face found", "no_face")
            continue
        same_size = found_landmarks.get(size)
        if same_size:
            landmarks = np.median(np.stack(same_size), axis=0)  # (5, 2)
            how = f"median landmarks of {len(same_size)} faces in {size[0]}x{size[1]} images"
        else:
            landmarks = fallback_landmarks(size)
            how = "LFW median landmarks scaled to the image"
        try:
            crop = align(load_image(p), landmarks, embedder.geometry)
        except ImageLoadError as exc:  # changed on disk since detection
            out[p] = (_nan_row(embedder), str(exc), "unreadable")
            continue
        log.info("%s: no face found; centre crop (%s)", p, how)
        batcher.add(p, crop, f"{p}: no face found; used a centre crop ({how})", "centre_crop")
    batcher.flush()
    return out


def pair_scores(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows, (N,) float64; FAILED_SCORE where either row is NaN."""
    a = np.asarray(emb1, dtype=np.float64)
    b = np.asarray(emb2, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"pair_scores needs two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    bad = ~(np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1))
    a, b = np.nan_to_num(a), np.nan_to_num(b)
    na = np.linalg.norm(a, axis=1).clip(1e-12)
    nb = np.linalg.norm(b, axis=1).clip(1e-12)
    s = np.clip(np.einsum("ij,ij->i", a, b) / (na * nb), -1.0, 1.0)
    s[bad] = FAILED_SCORE
    return s


# --------------------------------------------------------------------------------------------------
# Pair-file evaluation


def _pair_paths(pairs, images_root: Path) -> tuple[list[Path], list[Path]]:
    p1 = [lfw_image_path(images_root, n, i) for n, i in zip(pairs["name1"], pairs["idx1"])]
    p2 = [lfw_image_path(images_root, n, i) for n, i in zip(pairs["name2"], pairs["idx2"])]
    return p1, p2


def evaluate_pairs(
    pairs_file: Path,
    images_root: Path,
    embedder: Embedder,
    *,
    aligned: bool = False,
    threshold_from: Path | None = None,
    fars: Sequence[float] = (1e-2, 1e-3),
    progress: bool = True,
    detector_config: DetectorConfig | None = None,
    face_choice: str = "central",
    no_face: str = "centre",
    batch_size: int = 64,
    plot: Path | None = None,
    keep_scores: bool = False,
    cache: EmbeddingCache | None = None,
) -> dict:
    """Verification accuracy, AUC, EER and TAR@FAR of `embedder` on an LFW-format pair file.

    Images are `images_root/NAME/NAME_0001.jpg`. The accuracy threshold (`accuracy_protocol` says which):
    k-fold cross-validation when the file has folds (View 2 `pairs.txt`); else the best-accuracy
    threshold on `threshold_from` (e.g. pairsDevTrain.txt when evaluating pairsDevTest.txt); else the
    model file's threshold. Returns plain python values (JSON-ready); with `keep_scores` also numpy
    `scores` and `labels` (file order). `plot` writes the ROC curve there.
    """
    pairs_file, images_root = Path(pairs_file), Path(images_root)
    if not images_root.is_dir():
        raise FileNotFoundError(f"{images_root}: images folder not found")
    pairs = read_lfw_pairs(pairs_file)
    labels = pairs["same"].to_numpy(dtype=bool)
    fold_ids = pairs["fold"].to_numpy()
    has_folds = bool((fold_ids >= 0).all() and len(np.unique(fold_ids)) >= 2)

    ref = _reference_pairs(pairs_file, fold_ids, has_folds, threshold_from)
    all_paths = _all_pair_paths(images_root, pairs, ref)
    emb, errors, statuses = _embed_status(all_paths, embedder, aligned=aligned, detector_config=detector_config,
                                          batch_size=batch_size, progress=progress, face_choice=face_choice,
                                          no_face=no_face, cache=cache)
    n = len(pairs)
    scores = pair_scores(emb[:n], emb[n : 2 * n])  # (n,)

    # Image counts: this file's unique images only (not those of threshold_from).
    counts = _image_counts(pairs_file, images_root, all_paths[: 2 * n], statuses[: 2 * n], errors[: 2 * n])
    n_images = len(set(all_paths[: 2 * n]))

    if has_folds:
        k = len(np.unique(fold_ids))
        protocol = f"{k}-fold: each fold's threshold chosen on the other {k - 1} folds of {pairs_file.name}"
        summary = summarise_verification(scores, labels, folds=fold_ids, fars=fars)
    elif ref is not None:
        ref_scores = pair_scores(emb[2 * n : 2 * n + len(ref)], emb[2 * n + len(ref) :])
        thr, _ = best_accuracy_threshold(ref_scores, ref["same"].to_numpy(dtype=bool))
        protocol = f"threshold chosen on {Path(threshold_from).name} ({len(ref)} pairs, best accuracy)"
        summary = summarise_verification(scores, labels, threshold=thr, fars=fars)
    else:
        protocol = _model_threshold_protocol(embedder)
        summary = summarise_verification(scores, labels, threshold=embedder.similarity_threshold, fars=fars)

    caveats = [f"accuracy_oracle is {ORACLE_NOTE}"]
    if not aligned:
        caveats.append(OVERLAP_NOTE)
    result: dict[str, Any] = {
        "pairs_file": str(pairs_file),
        "images_root": str(images_root),
        "model": embedder.fingerprint,
        "aligned": bool(aligned),
        "accuracy_protocol": protocol,
        **summary,
        **_failure_fields(counts, n_images, scores, no_face),
        "caveats": caveats,
    }
    if plot is not None:
        roc_plot((scores, labels), plot, title=f"{pairs_file.name} ({embedder.fingerprint})")
    if keep_scores:
        result["scores"] = scores
        result["labels"] = labels
    log.info("%s: accuracy %.4f (%s), AUC %.4f, %d/%d images without a usable face", pairs_file.name,
             result["accuracy"], protocol, result["auc"] if result["auc"] is not None else float("nan"),
             result["failed_images"], result["images"])
    return result



def _reference_pairs(pairs_file: Path, fold_ids: np.ndarray, has_folds: bool,
                     threshold_from: Path | None) -> Any:
    """The pairs (a DataFrame) the accuracy threshold is chosen on (`threshold_from`); None without one
    or when `pairs_file` has folds (then its own folds choose it)."""
    if threshold_from is None:
        return None
    if has_folds:
        log.warning("%s has folds: accuracy is %d-fold, --threshold-from %s is ignored",
                    pairs_file, len(np.unique(fold_ids)), threshold_from)
        return None
    return read_lfw_pairs(threshold_from)



def _all_pair_paths(images_root: Path, pairs: Any, ref: Any) -> list[Path]:
    """The images of every pair, in order: this file's first images, its second images, then the same
    for the reference pairs (`ref`, when the threshold is chosen on them)."""
    p1, p2 = _pair_paths(pairs, images_root)
    if ref is None:
        return p1 + p2
    r1, r2 = _pair_paths(ref, images_root)
    return p1 + p2 + r1 + r2

def _image_counts(pairs_file: Path, images_root: Path, paths: Sequence[Path], statuses: Sequence[str],
                  errors: Sequence[str | None]) -> dict[str, int]:
    """Unique images per status (STATUSES); ValueError when none could be read, the first few
    unreadable ones logged."""
    per_image: dict[Path, tuple[str, str | None]] = {}
    for p, status, err in zip(paths, statuses, errors):
        per_image[p] = (status, err)
    counts = {k: sum(1 for st, _ in per_image.values() if st == k) for k in STATUSES}
    unreadable = [e for st, e in per_image.values() if st == "unreadable"]
    if len(unreadable) == len(per_image):
        raise ValueError(
            f"{pairs_file}: none of its {len(per_image)} images could be read under {images_root} "
            f"(is that the folder holding the NAME/ folders?); first error: {unreadable[0]}"
        )
    for e in unreadable[:5]:
        log.warning("unreadable: %s", e)
    return counts



def _failure_fields(counts: dict[str, int], n_images: int, scores: np.ndarray, no_face: str) -> dict[str, Any]:
    """The result's image and pair failure counts, and the policy that scored them."""
    return {
        "images": n_images,
        "failed_images": n_images - counts["ok"],  # no usable face, whatever the reason
        "unreadable_images": counts["unreadable"],
        "no_face_images": counts["centre_crop"] + counts["no_face"],
        "centre_crop_images": counts["centre_crop"],
        "failed_pairs": int(np.sum(scores == FAILED_SCORE)),
        "failure_policy": (
            "no face: centre crop of the same scale (still scored); unreadable: pair scored below every "
            "other" if no_face == "centre" else "no face or unreadable: pair scored below every other"
        ),
    }

def _model_threshold_protocol(embedder: Embedder) -> str:
    """How the model file's own threshold was set, as the accuracy protocol says it."""
    cal = embedder.meta.get("calibration") or {}
    where = cal.get("data", "data not recorded in the model file")
    at = f" at FAR {float(cal['target_far']):g}" if "target_far" in cal else ""
    return f"threshold from the model file (calibrated on {where}{at})"

def roc_plot(result_or_scores: Mapping | tuple, path: Path, title: str | None = None) -> None:
    """ROC curve (TAR against FAR, log FAR axis) as a PNG at `path`, written atomically.

    Takes an `evaluate_pairs(..., keep_scores=True)` result or a (scores, labels) pair.
    """
    if isinstance(result_or_scores, Mapping):
        if "scores" not in result_or_scores or "labels" not in result_or_scores:
            raise ValueError("roc_plot needs scores: pass evaluate_pairs(..., keep_scores=True) or (scores, labels)")
        scores, labels = result_or_scores["scores"], result_or_scores["labels"]
    else:
        scores, labels = result_or_scores
    far, tar, _ = roc_curve(scores, labels)
    area = auc(far, tar)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_imp = int(np.sum(~np.asarray(labels).astype(bool)))
    keep = far > 0  # log axis: FAR 0 cannot be drawn; the lowest measurable FAR is 1 / impostors
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.semilogx(far[keep], tar[keep], "-", lw=1.5, label=f"ROC (AUC {area:.4f})")
    ax.set_xlim(max(1.0 / max(n_imp, 1), 1e-5), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel(f"false accept rate ({n_imp} impostor pairs)")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Impostor cohort


def lfw_people_images(pairs_file: Path, images_root: Path) -> list[Path]:
    """The unique images of a pair file, sorted by (name, number)."""
    pairs = read_lfw_pairs(pairs_file)
    keys = set(zip(pairs["name1"], pairs["idx1"])) | set(zip(pairs["name2"], pairs["idx2"]))
    return [lfw_image_path(images_root, name, int(idx)) for name, idx in sorted(keys)]


def build_cohort(
    image_paths: Sequence[Path],
    embedder: Embedder,
    *,
    identities: Sequence[str] | None = None,
    max_per_identity: int | None = 1,
    aligned: bool = False,
    detector_config: DetectorConfig | None = None,
    batch_size: int = 64,
    progress: bool = True,
    cache: EmbeddingCache | None = None,
    row_identities: list[str] | None = None,
) -> np.ndarray:
    """(C, D) float32 unit embeddings of many people's faces, for per-identity thresholds at a FAR.
    `row_identities`, when given a list, receives each row's person (for the cohort's labels).

    `identities` names each image's person (default: its folder, as in LFW's NAME/NAME_0001.jpg).
    At most `max_per_identity` faces per person (default 1: cohort scores are then independent
    impostors, one per person); an image without a face is replaced by that person's next image.
    Images with no face are skipped, never centre-cropped: a cohort row must be a real face.
    """
    paths = [Path(p) for p in image_paths]
    if identities is None:
        identities = [p.parent.name for p in paths]
    if len(identities) != len(paths):
        raise ValueError(f"{len(identities)} identities for {len(paths)} images")
    if max_per_identity is not None and max_per_identity < 1:
        raise ValueError(f"max_per_identity must be >= 1 or None, got {max_per_identity}")
    groups: dict[str, list[Path]] = {}
    for p, ident in zip(paths, identities):
        groups.setdefault(str(ident), []).append(p)
    want = {k: (len(v) if max_per_identity is None else min(max_per_identity, len(v))) for k, v in groups.items()}
    rows: dict[str, list[np.ndarray]] = {k: [] for k in groups}
    next_i = dict.fromkeys(groups, 0)
    skipped = 0
    while True:  # each round asks only for the faces still missing
        batch: list[tuple[str, Path]] = []
        for ident, ps in groups.items():
            need = want[ident] - len(rows[ident])
            take = ps[next_i[ident] : next_i[ident] + need] if need > 0 else []
            next_i[ident] += len(take)
            batch += [(ident, p) for p in take]
        if not batch:
            break
        emb, errors = embed_images([p for _, p in batch], embedder, aligned=aligned, detector_config=detector_config,
                                   batch_size=batch_size, progress=progress, no_face="fail", cache=cache)
        for (ident, _), vec, err in zip(batch, emb, errors):
            if np.isfinite(vec).all():
                rows[ident].append(vec)
            else:
                skipped += 1
                log.debug("cohort: skipped %s", err)
    cohort = [v for ident in groups for v in rows[ident]]
    if row_identities is not None:
        row_identities[:] = [ident for ident in groups for _ in rows[ident]]
    people = sum(1 for ident in groups if rows[ident])
    if not cohort:
        raise ValueError(f"no usable face in the {len(paths)} cohort images ({skipped} failed)")
    log.info("cohort: %d faces of %d people (%d of %d people without a usable face, %d images skipped)",
             len(cohort), people, len(groups) - people, len(groups), skipped)
    return np.stack(cohort).astype(np.float32)  # (C, D)


def cohort_sources(pairs_file: Path | None = None, images_root: Path | None = None, celeba_roots: Sequence[Path] = (),
                   face_dirs: Sequence[Path] = (), celeba_partitions: Sequence[int] = (1, 2)
                   ) -> tuple[list[Path], list[str], list[str]]:
    """The cohort's candidate images, one person key per image, and a description per source (see
    `calibrate_model`)."""
    if (pairs_file is None) != (images_root is None):
        raise ValueError("give the LFW pair file and its images root together")
    images: list[Path] = []
    identities: list[str] = []  # "<source>:<person>": cohort_labels() reads the source back
    parts: list[str] = []
    if pairs_file is not None:
        lfw = lfw_people_images(Path(pairs_file), Path(images_root))
        images += lfw
        identities += [f"lfw:{p.parent.name}" for p in lfw]
        parts.append(f"LFW people of {Path(pairs_file).name}")
    if celeba_roots:
        from verify.data.celeba import load_celeba

        table = load_celeba([Path(r) for r in celeba_roots], need_attributes=False).table
        if not celeba_partitions or not set(celeba_partitions) <= {1, 2}:
            raise ValueError(f"cohort CelebA partitions must be 1 and/or 2 (0 trains), got {list(celeba_partitions)}")
        held = table[table["partition"].isin(list(celeba_partitions))]
        images += [Path(p) for p in held["path"]]
        identities += [f"celeba:{int(i)}" for i in held["identity"]]
        parts.append(f"CelebA partition {'-'.join(map(str, sorted(celeba_partitions)))} of "
                     f"{', '.join(str(r) for r in celeba_roots)}")
    for d in face_dirs:
        found = sorted(p for p in Path(d).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not found:
            raise ValueError(f"{d}: no images for the cohort")
        images += found
        identities += [f"face-{Path(d).parent.name.lower() or 'faces'}:{p}" for p in found]
        parts.append(f"every face under {d}")
    if not images:
        raise ValueError("no cohort source: give --pairs/--images, --celeba or --faces")
    return images, identities, parts


def cohort_labels(row_identities: Sequence[str]) -> CohortSources:
    """Per-row source labels (verify.model.cohort) from `build_cohort`'s row persons: the source is the
    key's prefix (lfw, celeba, face-<set>: an unlabelled folder's parent, as prepared sets keep their
    held-out faces in SET/cohort/), the person its full key; unlabelled faces are each their own (-1)."""
    names = list(dict.fromkeys(k.split(":", 1)[0] for k in row_identities))
    person_ids: dict[str, int] = {}
    codes, persons = [], []
    for k in row_identities:
        src = k.split(":", 1)[0]
        codes.append(names.index(src))
        persons.append(-1 if src.startswith("face") else person_ids.setdefault(k, len(person_ids)))
    return CohortSources(np.array(codes, dtype=np.uint8), tuple(names), np.array(persons, dtype=np.int32))


def calibrate_model(
    model_path: Path,
    pairs_file: Path | None = None,
    images_root: Path | None = None,
    *,
    celeba_roots: Sequence[Path] = (),
    face_dirs: Sequence[Path] = (),
    celeba_partitions: Sequence[int] = (1, 2),
    max_per_identity: int | None = 1,
    max_faces: int | None = None,
    seed: int = 0,
    device: str = "auto",
    detector_config: DetectorConfig | None = None,
    progress: bool = True,
    embedder_loader: Callable[..., Embedder] = Embedder.load,
) -> dict:
    """Build the impostor cohort and attach it to the model file. Its people must be disjoint from
    the people the model is evaluated or used on, and from its training identities:

    - `pairs_file` + `images_root`: the people of an LFW pair file (use pairsDevTrain.txt: disjoint from
      pairsDevTest.txt's, so a DevTest evaluation stays clean);
    - `celeba_roots`: the CelebA `celeba_partitions` (1 and 2 by default) photos of these roots (labels
      from their Anno/; partition 0 holds the training identities);
    - `face_dirs`: every image below these folders, each its own person (unlabelled sets, filtered
      against LFW when they were prepared).

    `max_per_identity` faces per labelled person; `max_faces` caps the cohort (a seeded sample of the
    images, drawn before embedding)."""
    model_path = Path(model_path)
    images, identities, parts = cohort_sources(pairs_file, images_root, celeba_roots, face_dirs, celeba_partitions)
    if max_faces is not None and len(images) > max_faces:
        keep = np.sort(np.random.default_rng(seed).choice(len(images), max_faces, replace=False))
        images, identities = [images[i] for i in keep], [identities[i] for i in keep]
    embedder = embedder_loader(model_path, device=resolve_device(device))  # "auto" -> cuda or cpu
    row_identities: list[str] = []
    cohort = build_cohort(images, embedder, identities=identities, max_per_identity=max_per_identity,
                          detector_config=detector_config, progress=progress, row_identities=row_identities)
    people = len(set(identities))
    per = "all" if max_per_identity is None else str(max_per_identity)
    source = f"{' + '.join(parts)}: {len(cohort)} faces, at most {per} per labelled person, of {people} people"
    attach_cohort(model_path, cohort, source)
    # the labels beside the model, tied to the cohort as stored (float16): per-source calibration
    stored, _ = read_cohort_vectors(model_path)  # (C, D) float16, as attach_cohort wrote it
    write_cohort_sources(model_path, stored, cohort_labels(row_identities))
    return {"model": str(model_path), "fingerprint": embedder.fingerprint, "cohort_size": int(len(cohort)),
            "people": people, "images": len(images), "source": source}


__all__ = [
    "FAILED_SCORE", "build_cohort", "calibrate_model", "cohort_labels", "cohort_sources", "choose_face", "embed_images",
    "evaluate_pairs", "fallback_landmarks", "lfw_people_images", "pair_scores", "roc_plot",
]
