"""Gallery search speed: FAISS flat and IVF (through index.Gallery) vs numpy brute force.

    .venv/bin/python bench/bench_search.py [--sizes 1e5 1e6] [--dim 128] [--queries 1000] [--k 10]

Numpy brute force = blocked matrix product + argpartition + sort of the top k. IVF recall@1 is the
fraction of queries whose IVF top-1 id equals the exact top-1 id. Data: `clustered` (default) mimics
face embeddings (identities = centres + noise, queries = noisy copies of gallery vectors); `random` is
isotropic Gaussian, the worst case for IVF. Prints a table; nothing is written outside a temp folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from index import Gallery  # noqa: E402

NUMPY_BLOCK = 128  # queries per matrix product: 128 x 1e6 float32 scores = 512 MB


def make_data(n: int, dim: int, n_queries: int, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm gallery (n, dim) and queries (Q, dim), float32."""
    if kind == "random":
        x = rng.standard_normal((n, dim), dtype=np.float32)
        q = rng.standard_normal((n_queries, dim), dtype=np.float32)
    else:
        n_ids = max(1, n // 20)  # ~20 vectors per identity
        centres = rng.standard_normal((n_ids, dim), dtype=np.float32)
        x = centres[rng.integers(0, n_ids, n)]
        x += 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
        q = x[rng.integers(0, n, n_queries)] + 0.6 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def numpy_search(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row indices (Q, k) by inner product, best first."""
    out = np.empty((len(q), k), np.int64)
    for start in range(0, len(q), NUMPY_BLOCK):
        sims = q[start : start + NUMPY_BLOCK] @ x.T  # (B, N)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (B, k), unordered
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[start : start + NUMPY_BLOCK] = np.take_along_axis(top, order, axis=1)
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nlist", type=int, default=None, help="IVF cells (default: the Gallery default, 1024)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--data", choices=["clustered", "random"], default="clustered")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    print(f"dim {args.dim}, {args.queries} queries, k {args.k}, data {args.data}, "
          f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), numpy {np.__version__}")
    header = (f"{'vectors':>9} {'method':<25} {'build s':>8} {'search s':>9} {'queries/s':>10} "
              f"{'vs numpy':>9} {'recall@1':>9}")
    print(header)
    print("-" * len(header))

    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            n = int(size)
            x, q = make_data(n, args.dim, args.queries, args.data, rng)

            def row(method, build, search, recall=None, base=None):
                speed = "" if base is None else f"{base / search:8.1f}x"
                rec = "" if recall is None else f"{recall:9.3f}"
                b = "" if build is None else f"{build:8.2f}"
                print(f"{n:>9,} {method:<25} {b:>8} {search:9.3f} {len(q) / search:10.0f} {speed:>9} {rec:>9}",
                      flush=True)

            numpy_search(x, q[:8], args.k)  # warm-up
            exact_rows, t_numpy = timed(lambda: numpy_search(x, q, args.k))
            row("numpy brute force", None, t_numpy)

            flat, t_build = timed(lambda: Gallery.create(Path(tmp) / f"flat{n}", args.dim, "bench"))
            ids, t_add = timed(lambda: flat.add(x, "bench"))
            flat.search(q[:8], args.k)
            res, t_flat = timed(lambda: flat.search(q, args.k))
            exact_ids = ids[exact_rows[:, 0]]
            row("faiss flat (exact)", t_build + t_add, t_flat, float((res.ids[:, 0] == exact_ids).mean()), t_numpy)
            del flat, res

            ivf = Gallery.create(Path(tmp) / f"ivf{n}", args.dim, "bench", kind="ivf", nlist=args.nlist)
            nlist = ivf.info()["nlist"]
            ivf_ids, t_add = timed(lambda: ivf.add(x, "bench"))  # trains when 39 * nlist vectors are in
            if not ivf.trained:
                print(f"{n:>9,} faiss IVF skipped: needs {39 * nlist:,} vectors for nlist {nlist}")
                continue
            for nprobe in args.nprobe:
                if nprobe > nlist:
                    continue
                ivf.search(q[:8], args.k, nprobe=nprobe)
                res, t_ivf = timed(lambda: ivf.search(q, args.k, nprobe=nprobe))
                recall = float((res.ids[:, 0] == ivf_ids[exact_rows[:, 0]]).mean())
                row(f"faiss IVF{nlist} nprobe {nprobe}", t_add, t_ivf, recall, t_numpy)
                t_add = None  # the build time belongs to the first IVF row only
            del ivf, x, q


if __name__ == "__main__":
    main()
