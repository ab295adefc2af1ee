"""Grouping quality: unknown faces grouped into candidate people (`index.groups`), BCubed on LFW.

    .venv/bin/python bench/bench_groups.py [--fr-env /tmp/frenv] [--dlib-model /tmp/dlib.pt] [--select-draws 3]
                                           [--grid 0.10:1.40:0.02] [--repeats 3] [--refresh] [--embed-only]

Report set: the LFW deep-funneled photos of the people with 2 or more photos (name = folder name),
one face per photo (the largest). Models: the shipped one and dlib's network imported into faceverify
(`faceverify model import-dlib --no-calibrate`, made when missing), both behind faceverify's pipeline
(MTCNN, `verify.identity.enroll.face_pipeline(embedder, min_face=40)`). Rows, all scored on the same photos (a
photo where a pipeline finds no face is an ungrouped item, its own singleton, in that row):

- baseline, face_recognition's way: `dlib.chinese_whispers_clustering(descriptors, 0.5)` on
  face_recognition's own vectors (HOG, 5-point landmarks, 1 jitter; scripts/peer_embeddings.py in the
  face_recognition venv, see bench/README.md), run in that venv; its time is the clustering call only.
- per model: `index.groups.group_faces(method="auto")` at the max_distance chosen on the selection set,
  then the other methods (hdbscan / whispers / graph, and dbscan with min_faces 3: with 2 it is graph),
  each at its own chosen max_distance, so the choice of "auto" is measured; for dlib's network also
  auto at DEFAULT_MAX_DISTANCE (what a caller gets without tuning for that model).
- face_recognition's vectors (normalised to unit length) grouped by index.groups auto: the same
  vectors as the baseline, another grouping.

Columns: BCubed precision, recall and F (index.groups.bcubed), the groups of >= 2 members, the
max_distance used, the selection set's mean F there, the seconds to group (median of --repeats).
min_faces is 2 unless the row says otherwise.

Selection set (max_distance is chosen there, never on the reported people): the CelebA identities of
partitions 1 and 2 (`celeba` + `celeba_wild`, labels from Anno/identity_CelebA.txt; never seen in the
shipped model's training), drawn as photo libraries: `--select-draws` draws (seeded), in each every
identity keeps a random 2..8 of its photos; a (model, method)'s score at a max_distance is its mean
BCubed F over the draws, over the grid `--grid lo:hi:step` (the walk stops once F has fallen 0.1
below its best; the smallest max_distance with the best F wins). Only the drawn photos are embedded
(at most `--select-max-photos`). Embeddings are cached in `--cache` (npz, keyed by model fingerprint,
photo list and min face); `--refresh` recomputes them, `--embed-only` fills the cache and stops.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, print_table  # noqa: E402

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
# Embeddings (cached)
# --------------------------------------------------------------------------------------------


def model_vectors(model: Path | None, paths: list[Path], min_face: int, cache: Path, refresh: bool,
                  tag: str) -> tuple[np.ndarray, str, float]:
    """((N, D) float32 unit vectors of the largest face per photo, NaN rows where none, the model's
    fingerprint, seconds spent embedding (0 when cached))."""
    from verify.model.file import Embedder, read_model_file

    fp = read_model_file(model or REPO / "verify" / "model" / "shipped" / "default.pt")["fingerprint"]
    out = cache / f"{tag}-{fp}-{list_key(paths, min_face)}.npz"
    if out.is_file() and not refresh:
        return np.load(out)["vectors"], fp, 0.0
    import torch

    from verify.identity.enroll import face_pipeline

    torch.set_num_threads(2)
    embedder = Embedder.load(model)
    pipe = face_pipeline(embedder, min_face=min_face)
    vecs = np.full((len(paths), embedder.dim), np.nan, np.float32)  # (N, D)
    t0 = time.perf_counter()
    for i, res in enumerate(pipe.iter_process([str(p) for p in paths])):
        if res.ok and res.faces:
            vecs[i] = res.embeddings[0]  # faces come largest first
        if (i + 1) % 500 == 0:
            log.info("%s: %d / %d photos, %.0f s", tag, i + 1, len(paths), time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(out, vectors=vecs, paths=np.array([str(p) for p in paths]))
    return vecs, fp, seconds


def peer_vectors(paths: list[Path], fr_env: Path, cache: Path, refresh: bool, tag: str) -> tuple[np.ndarray | None, str]:
    """face_recognition's (N, 128) vectors (NaN rows: no face) via scripts/peer_embeddings.py in its
    own venv, or None and why."""
    out = cache / f"{tag}-face_recognition-{list_key(paths)}.npz"
    if not (out.is_file() and not refresh):
        python = fr_env / "bin" / "python"
        if not python.is_file():
            return None, f"face_recognition: not installed in {fr_env} (see bench/README.md)"
        cache.mkdir(parents=True, exist_ok=True)
        listing = cache / f"{tag}-{list_key(paths)}.txt"
        listing.write_text("".join(f"{p}\n" for p in paths))
        subprocess.run([str(python), str(REPO / "scripts" / "peer_embeddings.py"), str(listing), str(out),
                        "--processes", "2"], check=True, stdout=subprocess.DEVNULL)
    got = np.load(out)
    if list(got["paths"]) != [str(p) for p in paths]:
        raise SystemExit(f"{out}: photo list differs; rerun with --refresh")
    return got["vectors"], "face_recognition 1.3.0 (HOG, 5-point landmarks, 1 jitter)"


# --------------------------------------------------------------------------------------------
# Grouping and scoring
# --------------------------------------------------------------------------------------------

# face_recognition's way, run in its own venv: dlib's chinese whispers on the finite rows
BASELINE_CODE = """
import sys, time, numpy as np, dlib
v = np.load(sys.argv[1])["vectors"]
ok = np.flatnonzero(np.isfinite(v[:, 0]))
descriptors = [dlib.vector(row.astype(float).tolist()) for row in v[ok]]
t0 = time.perf_counter()
raw = dlib.chinese_whispers_clustering(descriptors, float(sys.argv[3]))
seconds = time.perf_counter() - t0
labels = np.full(len(v), -1, np.int64)
labels[ok] = raw
np.savez(sys.argv[2], labels=labels, seconds=seconds, dlib=dlib.__version__)
"""


def group_rows(vectors: np.ndarray, max_distance: float, min_faces: int, method: str) -> tuple[np.ndarray, float]:
    """((N,) labels with -1 for the photos without a face, seconds of group_faces)."""
    from index.groups import group_faces

    ok = np.flatnonzero(np.isfinite(vectors[:, 0]))
    labels = np.full(len(vectors), -1, np.int64)
    t0 = time.perf_counter()
    labels[ok] = group_faces(vectors[ok], max_distance=max_distance, min_faces=min_faces, method=method)
    return labels, time.perf_counter() - t0


def tune(vectors: np.ndarray, ids: np.ndarray, draws: list[np.ndarray], method: str, min_faces: int,
         grid: np.ndarray, give_up: float = 0.1) -> tuple[float, float]:
    """(max_distance, mean BCubed F over the draws) of the best grid value on the selection set. Past
    the peak the grouping only gets slower (denser graphs), so the walk up the grid stops once the mean F
    is `give_up` below the best so far (F is unimodal in max_distance here)."""
    from index.groups import bcubed

    best_d, best_f = float(grid[0]), -1.0
    for d in grid:
        f = float(np.mean([bcubed(ids[idx], group_rows(vectors[idx], float(d), min_faces, method)[0])[2]
                           for idx in draws]))
        log.debug("%s d=%.3f F=%.4f", method, d, f)
        if f > best_f:
            best_d, best_f = float(d), f
        elif f < best_f - give_up:
            break
    return best_d, best_f


def parse_grid(text: str) -> np.ndarray:
    lo, hi, step = (float(v) for v in text.split(":"))
    return np.round(np.arange(lo, hi + step / 2, step), 6)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--dlib-model", default="/tmp/dlib.pt",
                    help="faceverify model import-dlib --out FILE --no-calibrate (made when missing)")
    ap.add_argument("--fr-env", default="/tmp/frenv", help="venv holding the face_recognition package")
    ap.add_argument("--min-face", type=int, default=40)
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--refresh", action="store_true", help="recompute the cached embeddings")
    ap.add_argument("--select-draws", type=int, default=3,
                    help="photo-library-like draws of the selection set (each identity: 2..8 photos)")
    ap.add_argument("--select-max-photos", type=int, default=2500, help="cap on the selection photos embedded")
    ap.add_argument("--seed", type=int, default=0, help="seed of the selection draws")
    ap.add_argument("--grid", default="0.10:1.40:0.02", help="max_distance grid lo:hi:step, searched on the selection set")
    ap.add_argument("--repeats", type=int, default=3, help="timed groupings per row on LFW (median)")
    ap.add_argument("--baseline-threshold", type=float, default=0.5,
                    help="dlib.chinese_whispers_clustering threshold (face_recognition's 0.5)")
    ap.add_argument("--embed-only", action="store_true", help="fill the cache and stop")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data, cache = Path(args.data), Path(args.cache)
    lfw, lfw_y, _ = lfw_photos(data / "lfw" / "lfw-deepfunneled")
    sel_all, sel_all_y = celeba_selection(data)
    draws = selection_draws(sel_all_y, args.select_draws, seed=args.seed)
    used = np.unique(np.concatenate(draws))  # only the drawn photos are embedded
    if len(used) > args.select_max_photos:
        raise SystemExit(f"the {args.select_draws} draws use {len(used)} selection photos "
                         f"(> --select-max-photos {args.select_max_photos}); use fewer draws")
    sel, sel_y = [sel_all[i] for i in used], sel_all_y[used]
    draws = [np.searchsorted(used, d) for d in draws]  # positions in `sel`
    log.info("LFW: %d photos of %d people; selection: %d draws of %s photos from %d CelebA photos "
             "(%d embedded) of %d identities", len(lfw), lfw_y.max() + 1, len(draws),
             "/".join(str(len(d)) for d in draws), len(sel_all), len(sel), len(np.unique(sel_all_y)))
    dlib_model = Path(args.dlib_model)
    if not dlib_model.is_file():
        subprocess.run([str(REPO / ".venv" / "bin" / "faceverify"), "model", "import-dlib", "--out", str(dlib_model),
                        "--no-calibrate"], check=True)
    vecs: dict[tuple[str, str], np.ndarray] = {}
    fps: dict[str, str] = {}
    for model, tag in ((None, "shipped"), (dlib_model, "dlib")):
        for paths, where in ((lfw, "lfw"), (sel, "celeba")):
            v, fp, s = model_vectors(model, paths, args.min_face, cache, args.refresh, f"{where}-{tag}")
            log.info("%s %s (%s): faces in %d / %d photos, %.0f s", where, tag, fp, np.isfinite(v[:, 0]).sum(), len(v), s)
            vecs[tag, where], fps[tag] = v, fp
    peer_note = ""
    for paths, where in ((lfw, "lfw"), (sel, "celeba")):
        v, peer_note = peer_vectors(paths, Path(args.fr_env), cache, args.refresh, where)
        log.info("%s %s: %s", where, peer_note, "-" if v is None else f"faces in {np.isfinite(v[:, 0]).sum()} / {len(v)}")
        if v is not None:
            vecs["face_recognition", where] = v  # raw: dlib's vectors, norm ~1.4, as the baseline uses them
            vecs["face_recognition-unit", where] = v / np.linalg.norm(v, axis=1, keepdims=True)  # NaN rows stay NaN
    if args.embed_only:
        return
    score(args, vecs, fps, lfw_y, sel_y, draws, peer_note, cache)


def score(args: argparse.Namespace, vecs: dict[tuple[str, str], np.ndarray], fps: dict[str, str],
          lfw_y: np.ndarray, sel_y: np.ndarray, draws: list[np.ndarray], peer_note: str, cache: Path) -> None:
    """Tune each (model, method) on the selection draws, then group LFW with the chosen max_distance."""
    import os
    import platform

    from index.groups import AUTO_METHOD, DEFAULT_MAX_DISTANCE, bcubed

    logging.getLogger("index.groups").setLevel(logging.WARNING)  # one line per grouping is too many here

    grid = parse_grid(args.grid)
    rows = []

    def lfw_row(name: str, tag: str, method: str, min_faces: int, tuned: tuple[float, float] | None,
                labels: np.ndarray | None = None, seconds: float | None = None) -> list[object]:
        if labels is None:
            assert tuned is not None
            runs = [group_rows(vecs[tag, "lfw"], tuned[0], min_faces, method) for _ in range(max(1, args.repeats))]
            labels, seconds = runs[0][0], float(np.median([r[1] for r in runs]))
        p, r, f = bcubed(lfw_y, labels)
        n_groups = int((np.bincount(labels[labels >= 0]) >= 2).sum()) if (labels >= 0).any() else 0
        md = "-" if tuned is None else f"{tuned[0]:.2f}"
        sel_f = "-" if tuned is None or not np.isfinite(tuned[1]) else f"{tuned[1]:.3f}"
        log.info("%s: P %.4f R %.4f F %.4f, %d groups, max_distance %s, %.3f s", name, p, r, f, n_groups, md, seconds)
        return [name, f"{p:.3f}", f"{r:.3f}", f"**{f:.3f}**", n_groups, md, sel_f, f"{seconds:.3f}"]

    # baseline: face_recognition's vectors, dlib's chinese whispers, in the face_recognition venv
    base_f = None
    if ("face_recognition", "lfw") in vecs:
        python = Path(args.fr_env) / "bin" / "python"
        src, out = cache / "baseline-vectors.npz", cache / "baseline-labels.npz"
        np.savez(src, vectors=vecs["face_recognition", "lfw"])
        subprocess.run([str(python), "-c", BASELINE_CODE, str(src), str(out), str(args.baseline_threshold)], check=True)
        got = np.load(out)
        row = lfw_row(f"face_recognition + dlib chinese_whispers {args.baseline_threshold} (baseline)",
                      "face_recognition", "", 1, None, got["labels"], float(got["seconds"]))
        base_f = float(row[3].strip("*"))
        rows.append(row)
    else:
        log.warning("%s: no baseline row", peer_note)

    # (label, model tag, method, min_faces); auto first per model, then the alternatives measured for it
    plan = []
    for tag, title in (("dlib", "dlib imported"), ("shipped", "shipped")):
        plan += [(f"{title}, auto ({AUTO_METHOD})", tag, "auto", 2)]
        plan += [(f"{title}, {m}", tag, m, 2) for m in ("hdbscan", "whispers", "graph") if m != AUTO_METHOD]
        plan += [(f"{title}, dbscan min_samples 3", tag, "dbscan", 3)]
    if ("face_recognition", "celeba") in vecs:
        plan += [("face_recognition's vectors (unit), index.groups auto", "face_recognition-unit", "auto", 2)]
    for name, tag, method, min_faces in plan:
        t0 = time.perf_counter()
        tuned = tune(vecs[tag, "celeba"], sel_y, draws, method, min_faces, grid)
        log.info("%s: selection chose max_distance %.2f (F %.4f) in %.0f s", name, *tuned, time.perf_counter() - t0)
        rows.append(lfw_row(name, tag, method, min_faces, tuned))
        if tag == "dlib" and method == "auto":  # what a caller gets without tuning for this model
            rows.append(lfw_row("dlib imported, auto at DEFAULT_MAX_DISTANCE", tag, method, min_faces,
                                (DEFAULT_MAX_DISTANCE, float("nan"))))

    n_faces = {tag: int(np.isfinite(vecs[tag, "lfw"][:, 0]).sum()) for tag in ("shipped", "dlib", "face_recognition")
               if (tag, "lfw") in vecs}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() \
        else platform.processor()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs; python {platform.python_version()}; grouping in one process")
    print(f"report set: LFW deep-funneled, {len(lfw_y)} photos of {lfw_y.max() + 1} people with >= 2 photos; "
          f"faces found: " + ", ".join(f"{k} {v}" for k, v in n_faces.items()) + " (no face = a singleton)")
    print(f"selection set: {len(draws)} draws of CelebA partitions 1+2 ({'/'.join(str(len(d)) for d in draws)} photos, "
          f"{len(np.unique(sel_y))} identities, 2..8 photos each), max_distance grid {args.grid}, min_faces 2 "
          "unless named; the selection F is the mean over the draws")
    print(f"models: shipped {fps['shipped']}, dlib imported {fps['dlib']} (MTCNN, min face {args.min_face} px); "
          f"baseline: {peer_note}")
    print()
    print_table(["grouping", "BCubed P", "BCubed R", "BCubed F", "groups (>= 2)", "max_distance", "selection F",
                 "time to group (s)"], rows)
    if base_f is not None:
        dlib_f = next(float(r[3].strip("*")) for r in rows if str(r[0]).startswith("dlib imported, auto"))
        verdict = "met" if dlib_f > base_f else "MISSED"
        print(f"\ngoal (dlib imported, auto, F above the baseline's {base_f:.3f}): {verdict} ({dlib_f:.3f})")


if __name__ == "__main__":
    main()
