"""Search at scale (index.facesearch): exact flat vs IVF-Flat vs IVF-PQ (OPQ, 16 and 8 bytes/face), 1e6-1e7 faces.

    .venv/bin/python bench/bench_search_scale.py [--sizes 1e6 1e7] [--people 100] [--per-person 10] [--k 10]
        [--persons 5] [--person-queries 100] [--bound 0.5] [--rescore 100] [--no-sweep]
        [--json OUT.json] [--prior EARLIER.json ...] [--extrapolate 1e8]

The question: which FAISS index `FaceSearch.build(kind="auto")` should pick for a library of 1e6-1e8
faces (IVF_MIN_FACES, IVFPQ_MIN_FACES), what IVF-PQ costs in recall, and what it saves in memory.
Per N (synthetic unit-norm 128-d faces, drawn clustered like faces by bench_facesearch.synthetic_faces:
identities = centre + noise, 20 faces per identity on average) and method:

- build s: flat = copying the vectors in; IVF-PQ M16 = the product path (k-means on 39 x nlist sampled
  faces, OPQ + PQ on a sample, assignment + encoding in chunks, nprobe calibration). IVF-Flat and
  IVF-PQ M8 are built on the *same* coarse quantiser (`build(..., centroids=, assignment=)`, which
  skips k-means and the assignment pass), so the 1e7 run fits in ~20 minutes on 2 cores; their
  "build s" = their own seconds + the shared k-means + assignment seconds of the M16 build (what a
  build from scratch would cost), and "own s" is what they took here.
- code+id B/face: bytes kept in RAM per face: the vector itself (float32: 512; PQ: M bytes) + the
  8-byte int64 id every IVF list and IDMap keeps. index B/face, index GB: size of the saved index
  file / N and in all (per-face parts + the fixed ones: centroids nlist x D x 4 B, OPQ matrix, PQ
  codebooks, list sizes, header); `load` allocates each list at its exact size, so this is also what
  the loaded index holds in RAM.
- load s: `FaceSearch.load` of that file (page cache warm: it was just written).
- nprobe: calibrated (IVF-Flat: range recall 0.99 at similarity 0.5; IVF-PQ: 0.99 of those pairs in
  the probed cells, see index/facesearch/calibration.py).
- recall@10: of `--people` x `--per-person` fresh faces of library identities (a gallery of 100 people
  x 10 vectors), the fraction of the exact 10 nearest (flat search) found in the returned 10.
  rescored@10: the same after re-scoring the index's top `--rescore` exactly (what a caller gets that
  re-reads those candidates' float32 embeddings, e.g. from the catalogue's SQLite; what
  `FaceSearch.search(q, k, rescore=ids -> vectors)` does; here they are read from RAM, so the
  re-score time is a lower bound).
- gallery s: that batch of 1,000 queries (k=10) against the N library faces, median of 3.
  gallery+rescore s: the same batch with k = `--rescore` (median of 3) + the exact re-score.
- find s / range recall / own recall / precision: a `find` = range search of one person's
  `--person-queries` pooled vectors (fresh faces of one library identity) at similarity >= `--bound`,
  median time over `--persons` people; range recall = found / exact pairs; own recall = the same
  over the person's own library faces only (what `find` is for); precision = returned pairs whose
  exact similarity is >= the bound (IVF-PQ compares estimated similarities with the bound).
- peak RSS GB: the largest resident memory of this process while building and saving the index (it
  includes the N x 512-byte input vectors, which the catalogue hands over).

The table is printed after every N (so a long run that is stopped still shows its finished sizes), and
`--json` writes the measured rows after every N; `--prior` reads such files back so that sizes
measured in earlier runs join the table (marked "earlier run") and the extrapolation; `--sizes` with
no value and `--prior FILE` only prints the tables of FILE (measuring nothing). A last block
states the issue's goal (recall@10 >= 0.95 with <= 16 B/face in RAM) per IVF-PQ variant at the largest
measured N.

The 1e8 rows are not built (51 GB of float32 input does not fit in 24 GB): they are EXTRAPOLATED from
the two largest measured sizes (1e6 and 1e7 by default) and say so in their "faces" cell. Memory from its parts: codes or vectors + 8-byte ids per face, centroids for
nlist(1e8), the fixed tables as measured. Build s from its parts: k-means ~ nlist^2 (its sample is
39 x nlist), assignment ~ N x nlist, OPQ + PQ training fixed, encoding and calibration ~ N. Search
times: exact flat's linearly in N (it scans every vector; one measurement under a busy CPU would
otherwise bend the line), the others by the power law through the two measured points (exponent
clamped to [0, 1]). Recall is not
extrapolated ("?"), nor load time; "peak RSS GB" shows the input alone. A sweep table shows what
recall@10 costs at the largest N: IVF-PQ M16 and M8 over nprobe (calibrated, 1/2, 1/4) and re-score
shortlist (10 = none, 50, 100, 200), with the gallery's search + re-score seconds. Nothing is written outside a temp folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_facesearch import face_stats, synthetic_faces  # noqa: E402
from common import REPO, TreeMemorySampler, print_table  # noqa: E402

sys.path.insert(0, str(REPO))
from index import facesearch  # noqa: E402
from index.facesearch import FaceSearch  # noqa: E402

ID_BASE, ID_STEP = 1_000_003, 7  # catalogue ids: arbitrary, but cheap to map back to rows


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    mem = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                mem[key] = int(value.split()[0]) / 1024**2  # GB
    except OSError:
        pass
    avail = f", {mem['MemAvailable']:.1f} of {mem['MemTotal']:.1f} GB RAM available" if mem else ""
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores{avail}"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median_time(fn, repeats: int = 3):
    """(result, median seconds); one untimed warm-up unless a single call already takes > 5 s."""
    out, first = timed(fn)
    if first > 5 or repeats <= 1:
        return out, first
    times = []
    for _ in range(repeats):
        out, t = timed(fn)
        times.append(t)
    return out, float(np.median(times))


def knn_recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k (10-recall@10)."""
    return float(np.mean([len(np.intersect1d(f, e)) / e.shape[0] for f, e in zip(found, exact)]))


def rows_of(ids: np.ndarray) -> np.ndarray:
    return (ids - ID_BASE) // ID_STEP


def rescore(x: np.ndarray, q: np.ndarray, cand_ids: np.ndarray, k: int) -> np.ndarray:
    """Exact re-ranking of candidate ids (Q, K') by the float32 vectors: the best k ids (Q, k)."""
    valid = cand_ids >= 0
    rows = rows_of(np.where(valid, cand_ids, ID_BASE))  # (Q, K')
    sims = np.einsum("qd,qkd->qk", q, x[rows])  # (Q, K')
    sims[~valid] = -np.inf
    top = np.argsort(-sims, axis=1)[:, :k]
    return np.take_along_axis(cand_ids, top, 1)


def fmt_gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


class OneSize:
    """Everything measured at one library size N: the data, the exact answers, and each method's row."""

    def __init__(self, args: argparse.Namespace, n: int, rng: np.random.Generator, tmp: Path,
                 sweep_rows: list[list[str]]) -> None:
        self.args, self.n, self.tmp, self.sweep_rows = args, n, tmp, sweep_rows
        (x, labels, gen), t_data = timed(lambda: synthetic_faces(n, args.dim, rng, args.per_identity))
        self.x, self.labels, self.gen = x, labels, gen  # (N, D), (N,)
        self.ids = ID_BASE + ID_STEP * np.arange(n, dtype=np.int64)  # (N,)
        print(f"  data: {face_stats(x, labels, rng)}; made in {t_data:.1f} s", flush=True)
        counts = np.bincount(labels, minlength=len(gen.centres))
        present = np.flatnonzero(counts >= 1)
        people = rng.choice(present, args.people, replace=False)
        self.gallery = gen.faces(np.repeat(people, args.per_person))  # (P*V, D)
        self.finders = people[: args.persons]
        self.person_q = [gen.faces(np.full(args.person_queries, p)) for p in self.finders]  # persons x (Qp, D)
        self.results: dict[str, dict] = {}
        # The coarse quantiser of the IVF-PQ M16 build, shared by the methods after it (None: their own).
        self.centroids: np.ndarray | None = None
        self.assignment: np.ndarray | None = None
        self.shared_s = 0.0  # its k-means + assignment seconds

    def build(self, name: str, fn, shared_s: float = 0.0) -> FaceSearch:
        n, results = self.n, self.results
        sampler = TreeMemorySampler(os.getpid()).start()
        fs, t_build = timed(fn)
        path = self.tmp / f"{name.replace(' ', '_')}-{n}.fsidx"
        fs.save(path)
        sampler.stop()
        size_b = path.stat().st_size
        fs = None  # not two copies in memory while loading
        fs, t_load = timed(lambda: FaceSearch.load(path))
        path.unlink()
        results[name] = {"build": t_build + shared_s, "own": t_build, "bytes": size_b, "load": t_load,
                         "rss": sampler.peak_kb * 1024, "fs": fs, "nprobe": fs.nprobe,
                         "seconds": dict(fs.header.calibration.get("seconds", {}))}
        print(f"  {name}: built in {t_build:.1f} s (+ shared {shared_s:.1f} s), {size_b / n:.1f} B/face, "
              f"load {t_load:.2f} s, peak RSS {sampler.peak_mb / 1024:.2f} GB; {fs!r}", flush=True)
        cal = fs.header.calibration
        if cal:
            print(f"    calibration: {cal}", flush=True)
        return fs

    def exact(self) -> None:
        """The exact flat index: the ground truth (k-NN of the gallery, range results per person)."""
        args = self.args
        flat = self.build("exact flat", lambda: FaceSearch.build(self.x, self.ids, "flat"))
        (_, self.ex_ids), t_exact = median_time(lambda: flat.search(self.gallery, args.k), 1)
        self.ex_range = []
        t_find = []
        for q in self.person_q:
            res, t = median_time(lambda: flat.range_search(q, args.bound), 1)
            self.ex_range.append(res)
            t_find.append(t)
        self.results["exact flat"].update(gallery_s=t_exact, recall=1.0, find_s=float(np.median(t_find)),
                                          range_recall=1.0, own_recall=1.0, precision=1.0)
        print(f"  exact: gallery {t_exact:.2f} s, find {np.median(t_find):.2f} s, "
              f"{np.mean([r[0][-1] for r in self.ex_range]) / args.person_queries:.0f} results per pooled vector",
              flush=True)
        self.results["exact flat"]["fs"] = None

    def measure(self, name: str) -> None:
        args, x, gallery, labels, ex_ids = self.args, self.x, self.gallery, self.labels, self.ex_ids
        r = self.results[name]
        fs: FaceSearch = r["fs"]
        (_, got), t_gal = median_time(lambda: fs.search(gallery, args.k))
        r.update(gallery_s=t_gal, recall=knn_recall(got, ex_ids))
        if fs.kind == "ivfpq":
            (_, cand), t_short = median_time(lambda: fs.search(gallery, args.rescore))
            best, t_rs = timed(lambda: rescore(x, gallery, cand, args.k))
            r.update(rescored=knn_recall(best, ex_ids), rescore_s=t_rs, shortlist_s=t_short,
                     gallery_rescored_s=t_short + t_rs)
        finds, recalls, own, prec = [], [], [], []
        for p, q, (ex_lims, ex_found, _) in zip(self.finders, self.person_q, self.ex_range):
            (lims, found, _), t = median_time(lambda: fs.range_search(q, args.bound))
            finds.append(t)
            hit = tot = own_hit = own_tot = true_ret = 0
            for i in range(len(q)):
                e = ex_found[ex_lims[i] : ex_lims[i + 1]]
                f = found[lims[i] : lims[i + 1]]
                ok = np.isin(e, f)
                mine = labels[rows_of(e)] == p
                hit, tot = hit + int(ok.sum()), tot + len(e)
                own_hit, own_tot = own_hit + int(ok[mine].sum()), own_tot + int(mine.sum())
                true_ret += int(np.isin(f, e).sum())
            recalls.append(hit / max(1, tot))
            own.append(own_hit / max(1, own_tot))
            prec.append(true_ret / max(1, lims[-1]))
        r.update(find_s=float(np.median(finds)), range_recall=float(np.mean(recalls)),
                 own_recall=float(np.mean(own)), precision=float(np.mean(prec)))
        extra = (f", rescored@{args.k} from {args.rescore}: {r['rescored']:.3f} (gallery top-{args.rescore} "
                 f"{r['shortlist_s']:.3f} s + rescore {r['rescore_s']:.3f} s)"
                 if "rescored" in r else "")
        print(f"    {name}: recall@{args.k} {r['recall']:.3f}{extra}, gallery {t_gal:.3f} s; find "
              f"{r['find_s']:.3f} s, range recall {r['range_recall']:.3f}, own {r['own_recall']:.3f}, "
              f"precision {r['precision']:.3f}", flush=True)

    def sweep(self, name: str, fs: FaceSearch) -> None:
        """recall@k over nprobe x re-scored shortlist, at the largest N only."""
        args, n = self.args, self.n
        if args.no_sweep or n != int(max(args.sizes)):
            return
        base = fs.nprobe
        probes = sorted({max(1, base // 4), max(1, base // 2), base})
        for p in probes:
            for shortlist in args.shortlists:
                (_, cand), t_s = median_time(lambda: fs.search(self.gallery, shortlist, nprobe=p), 1)
                best, t_r = timed(lambda: rescore(self.x, self.gallery, cand, args.k))
                self.sweep_rows.append([f"{n:,}", name, f"{p}" + (" (calibrated)" if p == base else ""),
                                        f"{shortlist}" + (" (none)" if shortlist == args.k else ""),
                                        f"{knn_recall(best, self.ex_ids):.3f}", f"{t_s:.3f}", f"{t_r:.3f}",
                                        f"{t_s + t_r:.3f}"])
                print(f"    sweep {name} nprobe {p} shortlist {shortlist}: {self.sweep_rows[-1][4]}", flush=True)

    def share_quantiser(self, fs: FaceSearch) -> None:
        """Keep `fs`'s centroids and every face's cell for the builds after it (no k-means, no assignment)."""
        sec = fs.header.calibration["seconds"]
        self.shared_s = sec["kmeans"] + sec["assign"]
        self.centroids = fs.centroids()
        cell_ids, cells = fs.cells()
        self.assignment = np.empty(self.n, np.int64)
        self.assignment[rows_of(cell_ids)] = cells

    def seconds(self) -> dict:
        """The build parts of the IVF-PQ build that did its own k-means (M16, else M8), for the extrapolation."""
        for name in ("IVF-PQ M16", "IVF-PQ M8"):
            if name in self.results:
                return self.results[name]["seconds"]
        return {}


# The methods besides exact flat, in order: (name, --methods key, build, sweep it, shares its coarse quantiser).
# IVF-PQ M16 is the product path (k-means and assignment included); the others reuse its quantiser when it
# ran (`build(..., centroids=, assignment=)`), else run their own k-means.
METHODS = (
    ("IVF-PQ M16", "M16", lambda r: FaceSearch.build(r.x, r.ids, "ivfpq", key=f"bench:{r.n}"), True, True),
    ("IVF-Flat", "ivf", lambda r: FaceSearch.build(r.x, r.ids, "ivf", centroids=r.centroids,
                                                  assignment=r.assignment), False, False),
    ("IVF-PQ M8", "M8", lambda r: FaceSearch.build(r.x, r.ids, "ivfpq", pq_m=8, centroids=r.centroids,
                                                   assignment=r.assignment), True, False),
)


def measure_size(args: argparse.Namespace, n: int, rng: np.random.Generator, tmp: Path,
                 sweep_rows: list[list[str]]) -> dict:
    """The measured rows of every method at N faces (what --json keeps)."""
    run = OneSize(args, n, rng, tmp, sweep_rows)
    run.exact()
    for name, key, make, sweep, shares in METHODS:
        if key not in args.methods:
            continue
        fs = run.build(name, lambda: make(run), run.shared_s)
        run.measure(name)
        if shares:
            run.share_quantiser(fs)
        if sweep:
            run.sweep(name, fs)
        run.results[name]["fs"] = fs = None
    out = {name: {k: v for k, v in r.items() if k != "fs"} for name, r in run.results.items()}
    out["seconds"] = run.seconds()
    out["nlist"] = facesearch.ivf_nlist(n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="*", default=[1e6, 1e7],
                    help="faces to measure; none (--sizes with --prior) = print the tables of earlier runs")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--per-identity", type=int, default=20, help="library faces per identity (mean)")
    ap.add_argument("--people", type=int, default=100, help="gallery people (k-NN queries)")
    ap.add_argument("--per-person", type=int, default=10, help="gallery vectors per person")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--persons", type=int, default=5, help="people searched with `find` (range)")
    ap.add_argument("--person-queries", type=int, default=100, help="pooled vectors per `find` person")
    ap.add_argument("--bound", type=float, default=0.5, help="find: similarity >= bound")
    ap.add_argument("--rescore", type=int, default=100, help="IVF-PQ candidates re-scored exactly")
    ap.add_argument("--no-sweep", action="store_true", help="skip the nprobe x shortlist sweep")
    ap.add_argument("--shortlists", type=int, nargs="+", default=[10, 50, 100, 200],
                    help="sweep: IVF-PQ candidates re-scored (k = none)")
    ap.add_argument("--methods", nargs="+", choices=["M16", "ivf", "M8"], default=["M16", "ivf", "M8"],
                    help="indexes besides exact flat; without M16, IVF-Flat and M8 run their own k-means")
    ap.add_argument("--extrapolate", type=float, default=1e8)
    ap.add_argument("--json", type=Path, help="write the measured rows (per N) here, after every N")
    ap.add_argument("--prior", type=Path, nargs="*", default=[],
                    help="--json files of earlier runs: their sizes join the extrapolation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t_start = time.perf_counter()
    print(f"start: {load_line()}")
    print(f"dim {args.dim}, {args.per_identity} faces/identity; gallery {args.people} people x {args.per_person} "
          f"vectors, k {args.k}; find = {args.person_queries} pooled vectors at similarity >= {args.bound} "
          f"({args.persons} people); faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), numpy "
          f"{np.__version__}; IVF_MIN_FACES {facesearch.IVF_MIN_FACES:,}, IVFPQ_MIN_FACES "
          f"{facesearch.IVFPQ_MIN_FACES:,}", flush=True)

    rng = np.random.default_rng(args.seed)
    sweep_rows, measured = [], {}
    prior = {n: m for n, m in load_prior(args.prior).items() if n not in {int(v) for v in args.sizes}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            n = int(size)
            print(f"\nN {n:,}: {load_line()}", flush=True)
            measured[n] = measure_size(args, n, rng, Path(tmp), sweep_rows)
            print(f"  done N {n:,} at {time.perf_counter() - t_start:.0f} s; {load_line()}", flush=True)
            if args.json:
                args.json.write_text(json.dumps({str(k): v for k, v in measured.items()}, indent=1))
            print(f"\nmeasured so far (N {n:,} done):\n", flush=True)
            print_main_table(args, measured, prior, [])
            sys.stdout.flush()
    report(args, t_start, measured, prior, sweep_rows)


def report(args: argparse.Namespace, t_start: float, measured: dict, prior: dict, sweep_rows: list[list[str]]) -> None:
    """The final tables: measured + earlier + extrapolated rows, the sweep, the issue's goal."""
    extrapolated = extrapolate(args, {**prior, **measured})
    print()
    print(f"end: {load_line()}; total {time.perf_counter() - t_start:.0f} s; process peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.1f} GB")
    print()
    print_main_table(args, measured, prior, extrapolated)
    if extrapolated:
        print(f"\nRows marked EXTRAPOLATED were NOT measured: computed from the two largest measured sizes "
              f"({', '.join(f'{m:,}' for m in sorted({**prior, **measured})[-2:])}) as the module doc says; "
              f"recall is not extrapolated ('?').")
    if sweep_rows:
        print()
        print(f"IVF-PQ at the largest N: recall@{args.k} over nprobe and the re-scored shortlist "
              f"(shortlist {args.k} = the index's own top {args.k}, no re-scoring); the gallery = "
              f"{args.people} people x {args.per_person} vectors")
        print()
        print_table(["faces", "method", "nprobe", "shortlist", f"recall@{args.k}", "search s", "rescore s",
                     "gallery s (search + rescore)"], sweep_rows, right=[False, False] + [True] * 6)
    print_goal(args, {**prior, **measured})


CODE_B = {"exact flat": 512, "IVF-Flat": 512, "IVF-PQ M16": 16, "IVF-PQ M8": 8}
ID_B = 8  # the int64 id IndexIDMap and every IVF list keep per face
HEADERS = ["faces", "method", "build s", "own s", "code+id B/face", "index B/face", "index GB", "load s",
           "nlist/nprobe", "recall@{k}", "rescored@{k}", "gallery s", "gallery+rescore s", "find s",
           "range recall", "own recall", "precision", "peak RSS GB"]


def measured_rows(n: int, m: dict, label: str) -> list[list[str]]:
    rows = []
    for name in (name for name in CODE_B if name in m):
        r = m[name]
        rows.append([label, name, f"{r['build']:.1f}", f"{r['own']:.1f}", f"{CODE_B[name]}+{ID_B}",
                     f"{r['bytes'] / n:.1f}", fmt_gb(r["bytes"]), f"{r['load']:.2f}",
                     "-" if name == "exact flat" else f"{m['nlist']}/{r.get('nprobe', '')}",
                     f"{r['recall']:.3f}", f"{r['rescored']:.3f}" if "rescored" in r else "-",
                     f"{r['gallery_s']:.3f}",
                     f"{r['gallery_rescored_s']:.3f}" if "gallery_rescored_s" in r else "-",
                     f"{r['find_s']:.3f}", f"{r['range_recall']:.3f}", f"{r['own_recall']:.3f}",
                     f"{r['precision']:.3f}", f"{r['rss'] / 1e9:.1f}"])
    return rows


def print_main_table(args, measured: dict, prior: dict, extrapolated: list[list[str]]) -> None:
    rows = []
    for n in sorted({**prior, **measured}):
        if n in measured:
            rows += measured_rows(n, measured[n], f"{n:,}")
        else:
            rows += measured_rows(n, prior[n], f"{n:,} (earlier run)" if args.sizes else f"{n:,}")
    rows += extrapolated
    print_table([h.format(k=args.k) for h in HEADERS], rows, right=[False, False] + [True] * (len(HEADERS) - 2))


def extrapolate(args, measured: dict) -> list[list[str]]:
    """Rows at --extrapolate faces from the two largest measured sizes (see the module doc); [] if < 2."""
    sizes = sorted(measured)
    n3 = int(args.extrapolate)
    if len(sizes) < 2 or n3 <= sizes[-1]:
        return []
    n1, n2 = sizes[-2], sizes[-1]
    nl3 = facesearch.ivf_nlist(n3)
    nl2 = measured[n2]["nlist"]
    dim = args.dim

    def linear(b: float) -> float:
        return b * n3 / n2

    def power(a: float, b: float) -> float:
        """Value at n3 on the line through (n1, a), (n2, b) in log-log, the exponent clamped to [0, 1]:
        no search here costs more than linear in N (flat scans N vectors; IVF scans nprobe/nlist of N
        codes, the calibrated fraction not growing with N; range results grow at most ~N), and a
        measured decrease is noise."""
        if a <= 0 or b <= 0:
            return float("nan")
        return b * (n3 / n2) ** min(1.0, max(0.0, math.log(b / a) / math.log(n2 / n1)))

    sec2 = measured[n2]["seconds"]  # the M16 build's parts (k-means and assignment shared by the others)
    input_gb = n3 * dim * 4 / 1e9
    rows = []
    for name, code in CODE_B.items():
        if name not in measured[n1] or name not in measured[n2]:
            continue
        r1, r2 = measured[n1][name], measured[n2][name]
        per_face = code + ID_B
        if name == "exact flat":
            total = n3 * per_face + max(0, r2["bytes"] - n2 * per_face)
            build = f"{r2['own'] * n3 / n2:,.0f}"  # copying the vectors: ~N
        else:
            # Fixed parts measured at n2 (file size - per-face parts - centroids), centroids at nlist(n3).
            fixed2 = r2["bytes"] - n2 * per_face - nl2 * dim * 4
            total = n3 * per_face + nl3 * dim * 4 + max(0, fixed2)
            # From scratch: k-means ~ sample x nlist ~ nlist^2 and assignment ~ N x nlist (both
            # measured in the M16 build), OPQ + PQ training fixed (a capped sample), adding the
            # faces (encoding / copying, the assignment taken out) and calibration ~ N.
            own = r2["seconds"]
            kmeans = sec2.get("kmeans", float("nan")) * (nl3 / nl2) ** 2
            assign = sec2.get("assign", float("nan")) * (n3 * nl3) / (n2 * nl2)
            fixed = own.get("opq", 0.0) + own.get("pq", 0.0)
            per_n = (own.get("add", 0.0) - own.get("assign", 0.0) + own.get("calibrate", 0.0)) * n3 / n2
            build = f"{kmeans + assign + fixed + per_n:,.0f}"
        g_rs = (f"{power(r1['gallery_rescored_s'], r2['gallery_rescored_s']):.2f}"
                if "gallery_rescored_s" in r1 and "gallery_rescored_s" in r2 else "-")
        rows.append([f"{n3:,} EXTRAPOLATED", name, build, "-", f"{code}+{ID_B}", f"{total / n3:.1f}",
                     fmt_gb(total), "-", "-" if name == "exact flat" else f"{nl3}/?", "?",
                     "?" if code < 512 else "-",
                     f"{(linear(r2['gallery_s']) if name == 'exact flat' else power(r1['gallery_s'], r2['gallery_s'])):.2f}",
                     g_rs,
                     f"{(linear(r2['find_s']) if name == 'exact flat' else power(r1['find_s'], r2['find_s'])):.2f}",
                     "?", "?", "?",
                     f"> {input_gb:.0f} (input)"])
    return rows


def print_goal(args, measured: dict) -> None:
    """The issue's goal at the largest measured N: recall@k >= 0.95 with <= 16 bytes per face in RAM."""
    n = max(measured)
    m = measured[n]
    print()
    print(f"Goal (issue 19): recall@{args.k} >= 0.95 with <= 16 B/face in RAM, at the largest measured N = {n:,}:")
    for name in (name for name in ("IVF-PQ M16", "IVF-PQ M8") if name in m):
        r = m[name]
        per_face = CODE_B[name] + ID_B
        total = r["bytes"] / n
        raw_ok, rs_ok = r["recall"] >= 0.95, r.get("rescored", 0.0) >= 0.95
        print(f"  {name}: {CODE_B[name]} B code + {ID_B} B id = {per_face} B/face "
              f"({'<=' if per_face <= 16 else '>'} 16), {total:.2f} B/face with the fixed tables (centroids "
              f"{m['nlist']} x {args.dim} x 4 B, OPQ, PQ codebooks: {(r['bytes'] - n * per_face) / 1e6:.1f} MB); "
              f"recall@{args.k} {r['recall']:.3f} raw ({'>=' if raw_ok else '<'} 0.95), {r.get('rescored', 0):.3f} "
              f"after re-scoring the top {args.rescore} exactly ({'>=' if rs_ok else '<'} 0.95) from the float32 "
              f"embeddings (kept on disk in the catalogue, not in RAM); gallery of {args.people} people x "
              f"{args.per_person} vectors: {r['gallery_s']:.3f} s raw, {r.get('gallery_rescored_s', float('nan')):.3f} s "
              f"with the re-score (vectors read from RAM here: a lower bound)")


def load_prior(paths: list[Path]) -> dict:
    prior: dict = {}
    for path in paths:
        for k, v in json.loads(path.read_text()).items():
            prior[int(k)] = v
    return prior


if __name__ == "__main__":
    main()
