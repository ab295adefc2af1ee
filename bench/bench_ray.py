"""The scan's Ray engine against the local engine, on the same photos, side by side in one run.

    .venv/bin/python bench/bench_ray.py [--images 1000] [--repeats 1] [--model PATH]

Photos: as bench_scan.py (LFW deep-funneled, one enrolled person's other photos plus the first LFW
photos in sorted order, copied to a temporary folder). Each row is one command in a subprocess, a
fresh library index each time (every photo decoded, detected, aligned, embedded, matched):

  local    faceverify scan F --index NEW --workers 2 --runtime onnx
  ray x2   faceverify scan F --index NEW --workers 2 --runtime onnx --engine ray     (a local Ray instance)
  ray x1   faceverify scan F --index NEW --workers 1 --runtime onnx --engine ray

images/s = photos / wall seconds of the whole command (start-up included). "Ray start-up" is the
engine's own line: starting the local instance (ray.init), from the scan's --stats summary; the actor
pool's start (each actor imports ONNX Runtime and loads the model) is inside the wall time. The goals
(issue 19): ray x2 >= 0.8x local; ray x2 >= 1.6x ray x1. Memory: the largest process's peak and the
sampled sum over the command's process tree (Ray's GCS, raylet, agents and actors included). A second
table gives the CPU seconds of each kind of process in that tree (where Ray's overhead goes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import pick_photos  # noqa: E402
from common import FACEVERIFY, LFW, REPO, print_table, resolve_model, run_measured  # noqa: E402



def summary_of(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no --stats line in the scan's output:\n{stdout[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--enroll-photos", type=int, default=5)
    ap.add_argument("--person", default=None)
    ap.add_argument("--model", default=None, help="model file (default: the shipped model)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per row (the median is shown)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp_s:
        tmp = Path(tmp_s)
        model, model_label = resolve_model(args.model, tmp)
        person, enroll, scan = pick_photos(LFW, args.images, args.person, args.enroll_photos)
        folder = tmp / "photos"
        folder.mkdir()
        for p in scan:
            shutil.copy(p, folder / f"{p.parent.name}__{p.name}")
        gallery = tmp / "gallery"
        r = run_measured([str(FACEVERIFY), "enroll", person, *map(str, enroll), "--gallery", str(gallery),
                          "--model", str(model), "--runtime", "onnx"])
        if r.returncode != 0:
            raise SystemExit(f"enroll failed:\n{r.stderr[-2000:]}")

        rows_spec = [("local engine, 2 workers", ["--workers", "2"]),
                     ("ray engine, 2 actors", ["--workers", "2", "--engine", "ray"]),
                     ("ray engine, 1 actor", ["--workers", "1", "--engine", "ray"])]
        results: dict[str, list] = {label: [] for label, _ in rows_spec}
        for rep in range(args.repeats):
            for label, extra in rows_spec:  # interleaved: a load change hits every row alike
                db = tmp / f"lib-{rep}-{len(results[label])}-{label.split()[0]}-{extra[1]}.db"
                cmd = [str(FACEVERIFY), "scan", str(folder), "--gallery", str(gallery), "--model", str(model),
                       "--runtime", "onnx", "--index", str(db), "--out", str(tmp / "report.csv"), "--stats", *extra]
                m = run_measured(cmd, env={**os.environ, "TQDM_DISABLE": "1"}, cpu=True)
                if m.returncode not in (0, 1):
                    raise SystemExit(f"{label} failed ({m.returncode}):\n{m.stderr[-3000:]}")
                s = summary_of(m.stdout)
                results[label].append((m, s))
                print(f"# {label}: {m.seconds:.1f} s, {len(scan) / m.seconds:.1f} images/s", file=sys.stderr)

        def med(label: str) -> tuple:
            runs = sorted(results[label], key=lambda ms: ms[0].seconds)
            return runs[len(runs) // 2]

        local_s = med("local engine, 2 workers")[0].seconds
        ray1_s = med("ray engine, 1 actor")[0].seconds
        table = []
        for label, _ in rows_spec:
            m, s = med(label)
            eng = s.get("engine") or {}
            table.append([label, f"{m.seconds:.1f}", f"{len(scan) / m.seconds:.1f}", f"{local_s / m.seconds:.2f}x",
                          f"{ray1_s / m.seconds:.2f}x" if eng else "",
                          f"{eng['startup_s']:.1f}" if eng else "", str(len(eng.get("nodes", {}))) if eng else "",
                          f"{m.max_rss_mb:.0f}", f"{m.tree_peak_mb:.0f}", f"{s['faces']}", f"{s['matches']}"])
        print(f"\n{len(scan)} LFW photos, {person} enrolled from {len(enroll)} photos, model {model_label}, "
              f"{os.cpu_count()} CPUs, median of {args.repeats}\n")
        print_table(["engine", "wall s", "images/s", "vs local", "vs 1 actor", "Ray start-up s", "nodes",
                     "largest MB", "tree MB", "faces", "matches"], table)
        # Where the CPU went: each row's process tree, sampled every 0.2 s (the same runs as above)
        labels: list[str] = []
        for label, _ in rows_spec:
            labels += [k for k in med(label)[0].cpu_by_label if k not in labels]
        cpu_rows = []
        for k in labels:
            cells = [med(label)[0].cpu_by_label.get(k, 0.0) for label, _ in rows_spec]
            if max(cells) >= 0.1:
                cpu_rows.append([k, *(f"{c:.1f}" for c in cells)])
        cpu_rows.append(["all", *(f"{sum(med(label)[0].cpu_by_label.values()):.1f}" for label, _ in rows_spec)])
        print("\nCPU seconds by process (sampled every 0.2 s; a process that ends loses at most one sample)\n")
        print_table(["process", *(label for label, _ in rows_spec)], cpu_rows)


if __name__ == "__main__":
    main()
