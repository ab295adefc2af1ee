"""What the library check (issue 28, item 2) costs: `faceverify find NAME` over a synthetic library of N
faces, this checkout (which checks each named person against the library: `--library-threshold check`,
the default, and `stricter`) against a baseline checkout without the check (default: fc10ed1, the
commit before it), alternately in the same command on the same index and gallery; and the check alone
(`verify.queries.library_check.library_checks`, in this process) at each N.

    .venv/bin/python bench/bench_library_check.py [--sizes 1e5 1e6] [--repeats 3] [--baseline-rev fc10ed1] [--work DIR]

Data: bench/bench_library_scale.py's synthetic library (128-d faces of N/20 identities, 2 faces per
file, written through `Library.record`), "alice" = identity 0 enrolled from 20 fresh draws and
calibrated (verify.identity.scoring.calibrate_identity) on 20,000 faces of other identities, so her
calibration holds the cohort curve the check reads. The first `find` of each N builds the search index
(IVF from 1e6 faces) and is not timed. With `--work DIR` the indexes are kept and reused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_library_scale import FINGERPRINT, Layout, build_index, make_gallery  # noqa: E402
from bench_facesearch import synthetic_faces  # noqa: E402
from common import export_code, REPO, print_table, ratio, run_measured  # noqa: E402

from index import Gallery  # noqa: E402
from index.library import Library  # noqa: E402
from verify.identity.galleries import build_matcher  # noqa: E402
from verify.queries.library_check import library_checks  # noqa: E402

ALICE = 0


def prepare(work: Path, n: int, seed: int) -> tuple[Path, Path]:
    """(index, gallery) of N synthetic faces under `work/N`, built once."""
    from verify.identity.scoring import calibrate_identity, pool_photos

    folder = work / str(n)
    db, gallery = folder / "library.db", folder / "gallery"
    if (folder / "done").exists():
        return db, gallery
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    x, labels, gen = synthetic_faces(n, 128, rng)
    build_index(db, x, Layout(n, 2), 5000, seed)
    gen.rng = np.random.default_rng(seed + 2)
    alice = gen.faces(np.full(20, ALICE))  # (20, D)
    make_gallery(gallery, alice, 0.5)
    others = np.random.default_rng(seed + 3).integers(1, len(gen.centres), 20_000)
    cohort = gen.faces(others)  # (20000, D)
    g = Gallery.open(gallery)
    try:
        vecs, meta = g.vectors("alice")
        _, pooled = pool_photos(vecs, meta["sha256"].to_numpy())
        cal = calibrate_identity(pooled, cohort, target_far=1e-3)
        g.set_identity_info("alice", {**cal.to_dict(), "calibrated": True, "photos": len(pooled)})
        g.save()
    finally:
        g.close()
    (folder / "done").touch()
    return db, gallery


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1e5", "1e6"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-rev", default="fc10ed1")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-library-check-"))
    work = args.work or tmp
    try:
        base = export_code(args.baseline_rev, tmp / "baseline")
        sides = {"baseline": (base, []), "check (default)": (REPO, []),
                 "stricter": (REPO, ["--library-threshold", "stricter"])}
        rows = []
        for size in args.sizes:
            n = int(float(size))
            t0 = time.perf_counter()
            db, gallery = prepare(work, n, args.seed)
            print(f"# {n:,} faces ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            runs: dict[str, list] = {s: [] for s in sides}
            for rep in range(args.repeats + 1):
                for side, (code, extra) in sides.items():
                    env = {**os.environ, "PYTHONPATH": str(code)}
                    out = tmp / f"{side}.csv"
                    m = run_measured([sys.executable, "-m", "verify", "find", "alice", "--gallery", str(gallery),
                                      "--index", str(db), "--out", str(out), *extra], env=env)
                    if m.returncode not in (0, 1):
                        raise SystemExit(f"{side}: find failed ({m.returncode}): {m.stderr.strip()[-300:]}")
                    if rep:  # the first round builds / loads the search index cache
                        runs[side].append(m)
            with Library.open(db, readonly=True) as lib:
                g = Gallery.open(gallery)
                matcher = build_matcher(g)
                t1 = time.perf_counter()
                (check,) = library_checks(lib, FINGERPRINT, matcher, ["alice"])
                alone = time.perf_counter() - t1
                g.close()
            b = statistics.median(m.seconds for m in runs["baseline"])
            bm = statistics.median(m.max_rss_mb for m in runs["baseline"])
            for side in sides:
                s = statistics.median(m.seconds for m in runs[side])
                mem = statistics.median(m.max_rss_mb for m in runs[side])
                rows.append([f"{n:,}", side, f"{s:.2f}", ratio(s, b), f"{mem:,.0f}", ratio(mem, bm),
                             f"{alone:.2f}" if side == "check (default)" else "",
                             (check.describe()[:80] if side == "check (default)" else "")])
        print(f"\n`faceverify find alice --out` (median of {args.repeats}, after one untimed run), "
              f"baseline {args.baseline_rev} vs this checkout; load {os.getloadavg()[0]:.2f}\n")
        print_table(["faces", "find", "seconds", "vs baseline", "peak RSS MB", "vs baseline", "check alone s", "check"],
                    rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
