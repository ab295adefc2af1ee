"""What the per-source decision (issue 28) costs: `faceverify verify` of one photo (wall, peak memory)
and `faceverify scan` images/s, this checkout against a baseline checkout of the code (default: the
commit before issue 28), run alternately in the same command on the same photos and model.

    .venv/bin/python bench/bench_decision.py [--baseline-rev 810a8a7] [--repeats 5] [--scan-images 120]

The baseline's code is exported (`git archive`) to a temp folder and run with the same interpreter
(PYTHONPATH decides whose `verify` runs). Each side enrolls the same person (LFW deep-funneled, one
photo, `enroll`'s default views) in its own gallery: the new code stores per-source thresholds, the
old one its pooled threshold. Rows (median over `--repeats` alternating runs):
- `verify PHOTO --as NAME` (onnx runtime): wall seconds and peak resident memory;
- `scan FOLDER --workers 2 --no-index` on `--scan-images` LFW photos: images/s from the scan's
  `--stats` line (this run's images over its seconds).
Nothing is written into the repository: a temp folder, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import export_code, LFW, REPO, print_table, ratio, run_measured  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-rev", default="810a8a7")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scan-images", type=int, default=120)
    ap.add_argument("--person", default="Jennifer_Lopez")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-decision-"))
    try:
        base = export_code(args.baseline_rev, tmp / "baseline")
        # the same model files for both sides (the archive's copies are the same bytes or LFS pointers)
        shutil.rmtree(base / "verify" / "model" / "shipped")
        shutil.copytree(REPO / "verify" / "model" / "shipped", base / "verify" / "model" / "shipped",
                        ignore=shutil.ignore_patterns("*.cohort-sources.npz"))
        sides = {"baseline": base, "this checkout": REPO}
        photos = sorted((LFW / args.person).glob("*.jpg"))
        folder = tmp / "scan"
        folder.mkdir()
        for p in sorted(LFW.rglob("*.jpg"))[: args.scan_images]:
            shutil.copy(p, folder / p.name)
        py = sys.executable
        envs = {}
        for name, code in sides.items():
            envs[name] = {**os.environ, "PYTHONPATH": str(code), "FACEVERIFY_HOME": str(tmp / f"home-{name[:4]}")}
            g = ["--gallery", str(tmp / f"gallery-{name[:4]}")]
            run_measured([py, "-m", "verify", "enroll", "me", str(photos[0]), *g], env=envs[name]).check(f"enroll ({name})")
        wall = {n: [] for n in sides}
        peak = {n: [] for n in sides}
        rate = {n: [] for n in sides}
        for _ in range(args.repeats):
            for name in sides:
                g = ["--gallery", str(tmp / f"gallery-{name[:4]}")]
                m = run_measured([py, "-m", "verify", "verify", str(photos[1]), "--as", "me", "--runtime", "onnx", *g],
                                 env=envs[name])
                if m.returncode not in (0, 1):  # 1: no match (a verdict), 2: an error
                    m.check(f"verify ({name})")
                wall[name].append(m.seconds)
                peak[name].append(m.max_rss_mb)
        for k in range(max(1, args.repeats // 2)):
            for name in sides:
                g = ["--gallery", str(tmp / f"gallery-{name[:4]}")]
                out = tmp / f"r-{name[:4]}-{k}.csv"  # a new report each run (an existing one is refused)
                m = run_measured([py, "-m", "verify", "scan", str(folder), "--workers", "2", "--no-index", "--stats",
                                  "--out", str(out), *g], env=envs[name])
                stats = [json.loads(x) for x in m.stdout.splitlines() if x.startswith("{")]
                if not stats:
                    raise SystemExit(f"scan ({name}) printed no --stats line: {m.stderr[-400:]}")
                rate[name].append(float(stats[-1]["images_per_s"]))
        b = "baseline"
        print(f"baseline {args.baseline_rev} vs this checkout; {os.cpu_count()} CPUs; verify x{args.repeats}, "
              f"scan of {args.scan_images} LFW photos x{max(1, args.repeats // 2)} (medians)\n")
        rows = []
        for name in sides:
            w, p, r = statistics.median(wall[name]), max(peak[name]), statistics.median(rate[name])
            rows.append([name, f"{w:.2f}", ratio(w, statistics.median(wall[b])), f"{p:.0f}",
                         f"{r:.1f}", ratio(r, statistics.median(rate[b]))])
        print_table(["code", "verify wall s", "x baseline", "verify peak MB", "scan images/s", "x baseline"], rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
