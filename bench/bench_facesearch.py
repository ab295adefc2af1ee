"""Library face search (index.facesearch): FAISS flat and IVF vs numpy brute force, range and k-NN.

    .venv/bin/python bench/bench_facesearch.py [--sizes 1e4 1e5 1e6] [--dim 128] [--persons 5]
        [--person-queries 100] [--bound 0.5] [--knn-queries 1000] [--k 10] [--sweep]

The question: which index `FaceSearch.build(kind="auto")` should pick for a library of N faces
(IVF_MIN_FACES), and which nprobe IVF needs. Per N and method:

- build s: flat = copying the vectors in; IVF = k-means + assignment + nprobe calibration; numpy = 0.
- bytes/vec: size of the saved file / N (numpy: the float32 rows + int64 ids it would need).
- load s: `FaceSearch.load` of that file (page cache warm: it was just written).
- find s: one `find`, i.e. a range search of one enrolled person's pooled vectors (`--person-queries`
  fresh draws of a library identity, as new photos of them would be) at similarity >= `--bound`;
  median over `--persons` people. recall: found / exact pairs (exact = numpy, every pair >= bound);
  own recall: the same over the pairs of the person's own library faces only (what `find` is for).
- build+find s: the cost when the index must be (re)built for the query (no index kept, or the
  library changed since); "find s" alone is the cost on a prebuilt index loaded from disk.
- k-NN: `--knn-queries` fresh faces of random identities, top `--k`: seconds, queries/s,
  recall@k (fraction of the exact top k found).

Data (`synthetic_faces`): N/`--per-identity` identities; identity centres drawn from a Gaussian with a
decaying spectrum so that faces of different people have cosine ~0 +- `--inter-sd` (0.18: the README's
0.001 +- 0.181 for random pairs of CelebA faces under the centred teacher); each identity's faces are
its centre + isotropic noise scaled so two faces of it have cosine `--intra` (uniform per identity in
0.6-0.8). The header line prints the measured statistics. Nothing is written outside a temp folder.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, print_table, ratio  # noqa: E402

sys.path.insert(0, str(REPO))
from index import facesearch  # noqa: E402
from index.facesearch import FaceSearch  # noqa: E402

NUMPY_BLOCK = 65_536  # library rows per matrix product: 100 queries x 65,536 float32 = 26 MB
KNN_BLOCK = 128  # queries per matrix product for k-NN: 128 x 1e6 float32 = 512 MB


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _spectrum(dim: int, sd: float) -> np.ndarray:
    """Per-axis variances (sum 1) decaying as exp(-i/tau), tau chosen so that two random vectors
    drawn with them have cosine sd ~ sqrt(sum var^2) = sd (isotropic is the smallest: 1/sqrt(dim))."""
    sd = max(sd, 1.0 / math.sqrt(dim) + 1e-6)
    lo, hi = 1e-3, 1e6
    for _ in range(100):
        tau = math.sqrt(lo * hi)
        v = np.exp(-np.arange(dim) / tau)
        v /= v.sum()
        if math.sqrt(float((v**2).sum())) > sd:
            lo = tau  # too concentrated: spread it
        else:
            hi = tau
    return v


class SyntheticFaces:
    """Face-like unit vectors: identities = centres on the sphere, faces = centre + noise."""

    def __init__(self, n_ids: int, dim: int, rng: np.random.Generator, intra: tuple[float, float] = (0.6, 0.8),
                 inter_sd: float = 0.18) -> None:
        self.dim, self.rng = dim, rng
        self.intra = rng.uniform(*intra, n_ids)  # (I,) cosine of two faces of the identity
        # Faces of different people: cos(face_a, face_b) ~ intra * cos(centre_a, centre_b), so the
        # centres get a wider spread to give the faces `inter_sd`.
        spectrum = _spectrum(dim, inter_sd / float(np.mean(intra)))
        c = rng.standard_normal((n_ids, dim), dtype=np.float32) * np.sqrt(spectrum).astype(np.float32)
        self.centres = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)  # (I, D)
        # |c + s z|^2 ~ 1 + s^2 D and E[(c + s z_a).(c + s z_b)] = 1, so cos ~ 1 / (1 + s^2 D).
        self.sigma = np.sqrt((1.0 / self.intra - 1.0) / dim).astype(np.float32)  # (I,)

    def faces(self, labels: np.ndarray) -> np.ndarray:
        """(len(labels), D) unit faces of the given identities, made in blocks to bound memory."""
        out = np.empty((len(labels), self.dim), np.float32)
        for s in range(0, len(labels), 262_144):
            lab = labels[s : s + 262_144]
            x = self.centres[lab] + self.sigma[lab, None] * self.rng.standard_normal((len(lab), self.dim),
                                                                                     dtype=np.float32)
            out[s : s + len(lab)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def synthetic_faces(n: int, dim: int, rng: np.random.Generator, per_identity: int = 20,
                    intra: tuple[float, float] = (0.6, 0.8), inter_sd: float = 0.18
                    ) -> tuple[np.ndarray, np.ndarray, SyntheticFaces]:
    """A library of n unit faces of n/per_identity identities: (vectors (N, D), labels (N,), generator)."""
    gen = SyntheticFaces(max(1, n // per_identity), dim, rng, intra, inter_sd)
    labels = rng.integers(0, len(gen.centres), n)  # (N,)
    return gen.faces(labels), labels, gen


def face_stats(x: np.ndarray, labels: np.ndarray, rng: np.random.Generator, pairs: int = 20_000) -> str:
    """Measured cosine of same-identity and different-identity face pairs."""
    a, b = rng.integers(0, len(x), pairs), rng.integers(0, len(x), pairs)
    inter = np.einsum("ij,ij->i", x[a], x[b])[labels[a] != labels[b]]
    order = np.argsort(labels, kind="stable")
    same = np.flatnonzero(labels[order][1:] == labels[order][:-1])[:pairs]
    intra = np.einsum("ij,ij->i", x[order[same]], x[order[same + 1]])
    return (f"intra-identity cosine {intra.mean():.3f} +- {intra.std():.3f}, "
            f"inter {inter.mean():.3f} +- {inter.std():.3f} (P(inter >= 0.5) = {(inter >= 0.5).mean():.1e})")


# --------------------------------------------------------------------------------------------
# Numpy brute force (the baseline) and scoring
# --------------------------------------------------------------------------------------------


def numpy_range(x: np.ndarray, ids: np.ndarray, q: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact range search: (lims (Q+1,), ids (M,)), grouped by query."""
    qs, rows = [], []
    for start in range(0, len(x), NUMPY_BLOCK):
        sims = q @ x[start : start + NUMPY_BLOCK].T  # (Q, B)
        qi, r = np.nonzero(sims >= np.float32(bound))
        qs.append(qi)
        rows.append(r + start)
    qi, r = np.concatenate(qs), np.concatenate(rows)
    order = np.argsort(qi, kind="stable")
    lims = np.concatenate([[0], np.cumsum(np.bincount(qi, minlength=len(q)))])
    return lims, ids[r[order]]


def numpy_knn(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids (Q, k), best first."""
    out = np.empty((len(q), k), np.int64)
    for start in range(0, len(q), KNN_BLOCK):
        sims = q[start : start + KNN_BLOCK] @ x.T  # (B, N)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (B, k) unordered
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[start : start + KNN_BLOCK] = ids[np.take_along_axis(top, order, axis=1)]
    return out


def range_recall(lims: np.ndarray, found: np.ndarray, ex_lims: np.ndarray, exact: np.ndarray,
                 keep=None) -> float:
    """Fraction of exact (query, id) pairs that were found; `keep(ids) -> bool mask` restricts the pairs."""
    hits = total = 0
    for i in range(len(lims) - 1):
        e = exact[ex_lims[i] : ex_lims[i + 1]]
        if keep is not None:
            e = e[keep(e)]
        hits += int(np.isin(e, found[lims[i] : lims[i + 1]]).sum())
        total += len(e)
    return hits / total if total else 1.0


def knn_recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, e)) / len(e) for f, e in zip(found, exact)]))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median_time(fn, repeats: int) -> tuple[object, float]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        out, t = timed(fn)
        times.append(t)
    return out, float(np.median(times))


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


class OneSize:
    """One library size N: the synthetic library, the people searched, the exact (numpy) answers, and
    a table row per method."""

    def __init__(self, args: argparse.Namespace, n: int, rng: np.random.Generator, tmp: Path, rows: list,
                 sweep_rows: list) -> None:
        self.args, self.n, self.tmp, self.rows, self.sweep_rows = args, n, tmp, rows, sweep_rows
        (x, labels, gen), t_data = timed(lambda: synthetic_faces(n, args.dim, rng, args.per_identity,
                                                                 tuple(args.intra), args.inter_sd))
        self.x = x  # (N, D)
        self.ids = rng.choice(np.int64(1) << 40, n, replace=False).astype(np.int64)  # catalogue ids: arbitrary
        print(f"N {n:,}: {face_stats(x, labels, rng)}; made in {t_data:.1f} s", flush=True)
        # Enrolled people: identities with library faces; their pooled vectors are fresh faces of them.
        counts = np.bincount(labels, minlength=len(gen.centres))
        self.people = rng.choice(np.flatnonzero(counts >= 1), args.persons, replace=False)
        self.person_q = [gen.faces(np.full(args.person_queries, p)) for p in self.people]  # P x (Qp, D)
        self.knn_q = gen.faces(rng.integers(0, len(gen.centres), args.knn_queries))  # (Qk, D)
        self.label_of = dict(zip(self.ids.tolist(), labels.tolist()))

    def numpy_baseline(self) -> None:
        """Baseline: numpy, exact. Its answers are the reference for every recall."""
        args, x, ids = self.args, self.x, self.ids
        self.exact_range, t_np_find = [], []
        for q in self.person_q:
            lims_ids, t = median_time(lambda: numpy_range(x, ids, q, args.bound), args.repeats)
            self.exact_range.append(lims_ids)
            t_np_find.append(t)
        self.np_find = np_find = float(np.median(t_np_find))
        self.exact_knn, self.np_knn = median_time(lambda: numpy_knn(x, ids, self.knn_q, args.k), args.repeats)
        results_per_query = np.mean([e[0][-1] / args.person_queries for e in self.exact_range])
        self.rows.append([f"{self.n:,}", "numpy brute force", "0", f"{x.itemsize * args.dim + 8}", "-",
                          f"{np_find:.4f}", "1.00x", f"{np_find:.4f}", "1.00x", "1.000", "1.000",
                          f"{self.np_knn:.3f}", f"{args.knn_queries / self.np_knn:,.0f}", "1.00x", "1.000"])
        print(f"  numpy: find {np_find:.4f} s ({results_per_query:.0f} results/query), k-NN {self.np_knn:.3f} s",
              flush=True)

    def measure(self, kind: str, **build_kw) -> FaceSearch:
        """Build, save and load a `kind` index, then its table row."""
        n = self.n
        fs, t_build = timed(lambda: FaceSearch.build(self.x, self.ids, kind, key=f"bench:{n}", **build_kw))
        path = self.tmp / f"{kind}-{n}.fsidx"
        fs.save(path)
        bytes_per = path.stat().st_size / n
        fs, t_load = timed(lambda: FaceSearch.load(path))
        path.unlink()
        name = f"faiss {kind}" if kind == "flat" else f"faiss IVF{fs.nlist} nprobe {fs.nprobe}"
        self.search_row(name, fs, t_build, f"{bytes_per:.0f}", f"{t_load:.2f}", None)
        return fs

    def search_row(self, name: str, fs: FaceSearch, t_build: float | None, bytes_per: str, t_load: str,
                   nprobe: int | None) -> tuple[float, float, float]:
        """(find s, find recall, recall@k) of `fs` at `nprobe`; a table row unless t_build is None (sweep)."""
        args, n, np_find, np_knn = self.args, self.n, self.np_find, self.np_knn
        finds, recalls, own = [], [], []
        for p, q, (ex_lims, ex_ids) in zip(self.people, self.person_q, self.exact_range):
            (lims, found, _), t = median_time(lambda: fs.range_search(q, args.bound, nprobe=nprobe),
                                              args.repeats)
            finds.append(t)
            recalls.append(range_recall(lims, found, ex_lims, ex_ids))
            own.append(range_recall(lims, found, ex_lims, ex_ids,
                                    keep=lambda e: np.array([self.label_of[i] == p for i in e.tolist()], bool)))
        find = float(np.median(finds))
        (sims, got), t_knn = median_time(lambda: fs.search(self.knn_q, args.k, nprobe=nprobe), args.repeats)
        rec_knn = knn_recall(got, self.exact_knn)
        # Recall pooled over people: sum of hits / sum of pairs would weigh busy people more;
        # the mean over people is what a user sees on average.
        rec, rec_own = float(np.mean(recalls)), float(np.mean(own))
        if t_build is not None:
            self.rows.append([f"{n:,}", name, f"{t_build:.2f}", bytes_per, t_load, f"{find:.4f}",
                              ratio(np_find, find), f"{t_build + find:.3f}", ratio(np_find, t_build + find),
                              f"{rec:.3f}", f"{rec_own:.3f}", f"{t_knn:.3f}", f"{args.knn_queries / t_knn:,.0f}",
                              ratio(np_knn, t_knn), f"{rec_knn:.3f}"])
            print(f"  {name}: build {t_build:.2f} s, find {find:.4f} s recall {rec:.3f}/{rec_own:.3f}, "
                  f"k-NN {t_knn:.3f} s recall {rec_knn:.3f}", flush=True)
        return find, rec, rec_knn

    def sweep(self, ivf: FaceSearch) -> None:
        """IVF recall and speed over nprobe (powers of two and the calibrated one), until recall is ~1."""
        probes = sorted({p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, ivf.nprobe) if p <= ivf.nlist})
        for p in probes:
            find, rec, rec_knn = self.search_row("", ivf, None, "", "", p)
            calibrated = " (calibrated)" if p == ivf.nprobe else ""
            self.sweep_rows.append([f"{self.n:,}", f"{ivf.nlist}", f"{p}{calibrated}", f"{find:.4f}",
                                    ratio(self.np_find, find), f"{rec:.3f}", f"{rec_knn:.3f}"])
            if rec >= 0.9999 and rec_knn >= 0.999 and p > ivf.nprobe:
                break


def measure_size(args: argparse.Namespace, n: int, rng: np.random.Generator, tmp: Path, rows: list,
                 sweep_rows: list) -> None:
    """The rows of one N: numpy (exact), then each FAISS kind (IVF only where N can train it)."""
    size = OneSize(args, n, rng, tmp, rows, sweep_rows)
    size.numpy_baseline()
    for kind, build_kw in (("flat", {}), ("ivf", {"train_per_list": args.train_per_list})):
        if kind == "ivf" and n < 2 * facesearch.MIN_TRAIN_PER_LIST:
            print(f"  IVF skipped: {n} vectors", flush=True)
            break
        fs = size.measure(kind, **build_kw)
        if kind == "ivf":
            print(f"  IVF calibration: {fs.header.calibration}", flush=True)
            if args.sweep:
                size.sweep(fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--per-identity", type=int, default=20, help="library faces per identity (mean)")
    ap.add_argument("--intra", type=float, nargs=2, default=[0.6, 0.8], help="intra-identity cosine range")
    ap.add_argument("--inter-sd", type=float, default=0.18, help="sd of the cosine of faces of different people")
    ap.add_argument("--persons", type=int, default=5, help="enrolled people searched (median time)")
    ap.add_argument("--person-queries", type=int, default=100, help="pooled vectors per enrolled person")
    ap.add_argument("--bound", type=float, default=0.5, help="range search: similarity >= bound")
    ap.add_argument("--knn-queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each search (median)")
    ap.add_argument("--train-per-list", type=int, default=facesearch.DEFAULT_TRAIN_PER_LIST)
    ap.add_argument("--sweep", action="store_true", help="also print IVF recall and speed over a range of nprobe")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    print(f"dim {args.dim}, {args.per_identity} faces/identity, find = {args.person_queries} pooled vectors at "
          f"similarity >= {args.bound} (median of {args.persons} people), k-NN {args.knn_queries} queries k "
          f"{args.k}; faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), numpy {np.__version__}; "
          f"IVF: nlist ~4 sqrt(N), k-means on {args.train_per_list} x nlist, nprobe calibrated to range recall "
          f"{facesearch.DEFAULT_TARGET_RECALL} at {facesearch.DEFAULT_CALIBRATE_SIMILARITY}", flush=True)

    rows, sweep_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            measure_size(args, int(size), rng, Path(tmp), rows, sweep_rows)

    print()
    print_table(["faces", "method", "build s", "bytes/vec", "load s", "find s", "vs numpy", "build+find s",
                 "vs numpy", "find recall", "own recall", "k-NN s", "k-NN q/s", "vs numpy", "recall@k"], rows,
                right=[False, False] + [True] * 13)
    if sweep_rows:
        print()
        print_table(["faces", "nlist", "nprobe", "find s", "vs numpy", "find recall", "recall@k"], sweep_rows)

if __name__ == "__main__":
    main()
