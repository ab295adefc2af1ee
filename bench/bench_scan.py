"""Folder scan speed: `faceverify scan` vs the face_recognition package's CLI, on the same photos.

    .venv/bin/python bench/bench_scan.py [--images 300] [--workers 2] [--fr-env /tmp/frenv]
                                         [--model PATH] [--breakdown auto|in-process|none]
                                         [--photo-size 4032x3024] [--html --repeats 3]
                                         [--runtimes onnx torch]

Photos: LFW deep-funneled (../shared/data/lfw/lfw-deepfunneled, 250x250 JPEGs, one or more faces
each), copied into a temporary folder (never into the repository). One person (default: the LFW
person with the most photos here) is enrolled from `--enroll-photos` of their photos with
`faceverify enroll NAME PHOTOS --gallery G`; the scan folder holds that person's other photos plus the
first LFW photos in sorted order, `--images` in all. Then, each as one command in a subprocess:
  faceverify scan FOLDER --gallery G --out R.csv --workers N --runtime R --index FRESH.db   (per --runtimes)
  face_recognition KNOWN_DIR FOLDER --cpus N     (KNOWN_DIR: the same enrollment photos)
images/s = photos / wall seconds of the whole command (process start, model loading, known-face
encoding of face_recognition included; enrollment of faceverify is timed separately). Peak memory:
"largest process" is wait4's ru_maxrss (what /usr/bin/time -v reports), "tree" the sampled sum over
the command and its worker processes. The per-stage breakdown comes from the scan's summary when the
CLI prints `stage_seconds` (JSON), else from `verify.scan.run_scan` run in-process on the same folder
(--breakdown in-process forces that, none skips it). Without the face_recognition venv (see
bench/README.md) only faceverify is measured.

`--photo-size WxH` turns each scanned photo into a phone-sized one (bench_decode.py's: the LFW photo
upscaled into a WxH frame with grain, JPEG q92; the enrollment photos stay as they are): what a
folder of camera photos costs, where decoding and detection work on far more pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACEVERIFY, LFW, REPO, SHARED_DATA, parse_size, print_table, resolve_model, run_measured  # noqa: E402

STAGE_ORDER = ("walk", "start", "decode", "decode_wait", "detect", "align", "embed", "thumbs", "match", "write",
               "report", "html")
FR_NOT_INSTALLED = "face_recognition: not installed (see bench/README.md)"


def pick_photos(lfw: Path, n_images: int, person: str | None, n_enroll: int) -> tuple[str, list[Path], list[Path]]:
    """(person, enrollment photos, scan photos)."""
    if not lfw.is_dir():
        raise SystemExit(f"{lfw}: LFW folder not found (see ../shared/data/README.md)")
    people = {d.name: sorted(d.glob("*.jpg")) for d in sorted(lfw.iterdir()) if d.is_dir()}
    if person is None:
        person = max(people, key=lambda p: (len(people[p]), -sorted(people).index(p)))  # most photos, then A-Z
    if person not in people:
        raise SystemExit(f"{lfw}: no folder for {person!r}")
    own = people[person]
    if len(own) < 2 or n_enroll >= len(own):
        raise SystemExit(f"{person} has {len(own)} photos: need more than --enroll-photos {n_enroll}")
    enroll, rest = own[:n_enroll], own[n_enroll:]
    others = [p for name in sorted(people) if name != person for p in people[name]]
    scan = (rest + others)[:n_images]
    return person, enroll, scan


def copy_into(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, folder / f.name)


def parse_stage_seconds(text: str) -> dict[str, float] | None:
    """The scan summary's stage_seconds, if the CLI printed it as JSON (a whole JSON line, or a JSON
    object after `stage_seconds`)."""
    for line in text.splitlines():
        line = line.strip()
        if "stage_seconds" not in line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                if isinstance(obj.get("stage_seconds"), dict):
                    return {k: float(v) for k, v in obj["stage_seconds"].items()}
            except (ValueError, TypeError, AttributeError):
                pass
        m = re.search(r"stage_seconds\W*(\{[^{}]*\})", line)
        if m:
            try:
                return {k: float(v) for k, v in json.loads(m.group(1)).items()}
            except (ValueError, TypeError):
                pass
    return None


def parse_face_workers(text: str) -> int:
    """How many workers also detected and embedded, from the summary JSON line (0 if not printed)."""
    m = re.search(r'"face_workers":\s*(\d+)', text)
    return int(m.group(1)) if m else 0


def in_process_breakdown(folder: Path, gallery: Path, model: Path, workers: int, out: Path):
    """The ScanSummary of verify.scan.run_scan on `folder`, matcher built as the CLI
    builds it (verify.identity.enroll.build_matcher), DetectorConfig defaults."""
    from verify.model.file import Embedder
    from verify.identity.galleries import build_matcher, open_gallery
    from verify.scan import run_scan

    embedder = Embedder.load(model)
    g = open_gallery(gallery, embedder)
    summary = run_scan([folder], embedder=embedder, matcher=build_matcher(g, embedder), out=out, workers=workers,
                       progress=False)
    return summary


def fr_result(stdout: str, person: str) -> str:
    """Summary of face_recognition's output: one `path,name` line per (face, matching known photo),
    `path,unknown_person` per unmatched face, `path,no_persons_found` per photo without a face."""
    pairs = [ln.rsplit(",", 1) for ln in stdout.splitlines() if "," in ln]
    no_face = {p for p, name in pairs if name == "no_persons_found"}
    matched = {p for p, name in pairs if name.startswith(person)}
    return f"{len(matched)} photos matched {person}, {len(no_face)} without a face"


def scan_result(report: Path, person: str) -> str:
    """The same summary from a CSV scan report."""
    import csv

    with open(report, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    matched = {r["path"] for r in rows if r["match"] == "True"}
    no_face = sum(r["status"] == "no-face" for r in rows)
    return f"{len(matched)} photos matched {person}, {no_face} without a face ({sum(r['status'] == 'face' for r in rows)} faces)"


def html_costs(scan_argv: list[str], report: Path, tmp: Path, env: dict, repeats: int, n: int,
               first_plain: float) -> Callable[[], None]:
    """`scan` vs `scan --html` on the same folder, alternating; returns what prints the medians and
    the page's cost in %."""
    import statistics

    def swap_out(out: Path) -> list[str]:
        return [a if a != str(report) else str(out) for a in scan_argv]

    plain, html = [first_plain], []
    for i in range(repeats):
        page = tmp / f"page-{i}" / "report.html"
        html.append(run_measured(swap_out(tmp / f"report-html-{i}.csv") + ["--html", str(page)], env=env)
                    .check("faceverify scan --html").seconds)
        if i < repeats - 1:
            plain.append(run_measured(swap_out(tmp / f"report-plain-{i}.csv"), env=env).check("faceverify scan").seconds)
    p, h = statistics.median(plain), statistics.median(html)

    def show() -> None:
        print(f"\nscan --html against the plain scan, {n} photos, alternating ({len(plain)} + {len(html)} runs, "
              "medians)\n")
        print_table(("command", "wall s (runs)", "median s", "images/s", "vs plain scan"),
                    [("faceverify scan", " / ".join(f"{x:.1f}" for x in plain), f"{p:.1f}", f"{n / p:.1f}", "1.00x"),
                     ("faceverify scan --html", " / ".join(f"{x:.1f}" for x in html), f"{h:.1f}", f"{n / h:.1f}",
                      f"{h / p:.3f}x time ({100 * (h - p) / p:+.1f}%)")],
                    right=(False, True, True, True, True))

    return show


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=300, help="photos in the scanned folder")
    ap.add_argument("--workers", type=int, default=2, help="scan --workers and face_recognition --cpus")
    ap.add_argument("--fr-env", default="/tmp/frenv", help="venv holding the face_recognition package")
    ap.add_argument("--model", default=None, help="model file (default: the shipped one, else a random-init stand-in)")
    ap.add_argument("--person", default=None, help="LFW person to enroll (default: the one with the most photos)")
    ap.add_argument("--enroll-photos", type=int, default=4)
    ap.add_argument("--min-face", type=int, default=None,
                    help="scan --min-face (default: the scan's own, 20 px); 40 matches face_recognition's reach "
                         "(dlib HOG, 80 px window, one upsampling)")
    ap.add_argument("--runtimes", nargs="+", default=["onnx", "torch"], choices=("onnx", "torch"),
                    help="one faceverify row per runtime (scan --runtime); the first also gives the stage breakdown")
    ap.add_argument("--breakdown", choices=("auto", "in-process", "none"), default="auto")
    ap.add_argument("--lfw", default=str(LFW))
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    ap.add_argument("--photo-size", default=None, help="WxH: scan phone-sized versions of the photos")
    ap.add_argument("--html", action="store_true",
                    help="also time `scan --html` (the HTML page and its thumbnails) against the plain scan, "
                         "alternating, --repeats times each")
    ap.add_argument("--repeats", type=int, default=3, help="with --html: runs of each, alternating")
    args = ap.parse_args(argv)

    person, enroll_photos, scan_photos = pick_photos(Path(args.lfw), args.images, args.person, args.enroll_photos)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    try:
        known, folder, gallery = tmp / "known", tmp / "photos", tmp / "gallery"
        copy_into(enroll_photos, known)
        what = make_scan_folder(scan_photos, folder, args.photo_size)
        model, model_note = resolve_model(args.model, tmp)
        env = {**os.environ, "FACEVERIFY_HOME": str(tmp / "home")}  # never touch the user's gallery
        if not FACEVERIFY.exists():
            raise SystemExit(f"{FACEVERIFY} not found: install the project (pip install -e .) into .venv")
        enrolled = run_measured([str(FACEVERIFY), "enroll", person, *map(str, enroll_photos), "--gallery", str(gallery),
                                 "--model", str(model)], env=env).check("faceverify enroll")

        # The commands, each a row: faceverify scan per runtime, then face_recognition's CLI.
        rows, scans = faceverify_scans(args, folder, gallery, model, tmp, env, person)
        ours, scan_argv = scans[0] if scans else (None, None)
        show_html_costs = None
        if args.html and ours is not None:
            show_html_costs = html_costs(scan_argv, tmp / "report.csv", tmp, env, args.repeats, len(scan_photos),
                                         first_plain=ours.seconds)
        fr_row, notes = face_recognition_scan(args, known, folder, person)
        rows += [fr_row] if fr_row else []

        stages, stage_src, face_workers, in_process_row = stage_breakdown(args, ours, folder, gallery, model, tmp,
                                                                          person)
        if in_process_row:
            rows.insert(1 if ours else 0, in_process_row)

        n = len(scan_photos)
        print(f"\n{n} {what} in {folder}; enrolled {person} from {len(enroll_photos)} photos "
              f"in {enrolled.seconds:.1f} s; --workers/--cpus {args.workers}; {os.cpu_count()} cpus")
        print(model_note + ("" if args.min_face is None else f"; scan --min-face {args.min_face}"))
        for note in notes:
            print(note)
        print()
        print_scan_table(rows, n)
        if stages:
            print_stages(stages, stage_src, face_workers, args.workers, n)
        if show_html_costs is not None:
            show_html_costs()
    finally:
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


Row = tuple  # (command, wall s, peak MB largest process | None, peak MB tree | None, result)


def make_scan_folder(scan_photos: list[Path], folder: Path, photo_size: str | None) -> str:
    """Copy (or, with --photo-size, upscale) the photos to scan into `folder`; says what they are."""
    if not photo_size:
        copy_into(scan_photos, folder)
        return "LFW photos (250x250 JPEG)"
    import numpy as np
    from bench_decode import upscale_photo

    size = parse_size(photo_size)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in scan_photos:
        upscale_photo(f, folder / f.name, size, rng)
    return f"LFW photos upscaled to {size[0]}x{size[1]} JPEG (+ grain)"


def faceverify_scans(args: argparse.Namespace, folder: Path, gallery: Path, model: Path, tmp: Path, env: dict,
                     person: str) -> tuple[list[Row], list[tuple]]:
    """One `faceverify scan` per --runtimes, each on its own fresh library index (nothing reused between
    rows): (rows, [(the run, its argv)])."""
    report = tmp / "report.csv"
    rows, scans = [], []
    for runtime in args.runtimes:
        argv = [str(FACEVERIFY), "scan", str(folder), "--gallery", str(gallery), "--out", str(report), "--stats",
                "--workers", str(args.workers), "--runtime", runtime, "--index", str(tmp / f"library-{runtime}.db"),
                "--model", str(model)]
        if args.min_face is not None:
            argv += ["--min-face", str(args.min_face)]
        run = run_measured(argv, env=env).check(f"faceverify scan --runtime {runtime}")
        rows.append((f"faceverify scan --runtime {runtime}", run.seconds, run.max_rss_mb, run.tree_peak_mb,
                     scan_result(report, person)))
        scans.append((run, argv))
    return rows, scans


def face_recognition_scan(args: argparse.Namespace, known: Path, folder: Path,
                          person: str) -> tuple[Row | None, list[str]]:
    """(face_recognition's CLI row, notes): no row, and a note, where its venv is not installed."""
    fr_cli = Path(args.fr_env) / "bin" / "face_recognition"
    if not fr_cli.exists():
        return None, [FR_NOT_INSTALLED + f" [looked for {fr_cli}]"]
    fr = run_measured([str(fr_cli), str(known), str(folder), "--cpus", str(args.workers)])
    fr.check("face_recognition")
    if not fr.stdout.strip():  # e.g. a setuptools without pkg_resources: it exits 0, silently
        raise SystemExit(f"face_recognition printed nothing (stderr: {fr.stderr.strip()[-300:]!r}); "
                         "see bench/README.md")
    return ("face_recognition CLI", fr.seconds, fr.max_rss_mb, fr.tree_peak_mb, fr_result(fr.stdout, person)), []


def stage_breakdown(args: argparse.Namespace, ours, folder: Path, gallery: Path, model: Path, tmp: Path,
                    person: str) -> tuple[dict | None, str, int, Row | None]:
    """(seconds per stage, where they come from, face workers, the in-process row if run_scan was run)."""
    stages, stage_src, face_workers = None, "", 0
    if args.breakdown == "auto":
        stages = parse_stage_seconds(ours.stdout + "\n" + ours.stderr) if ours else None
        face_workers = parse_face_workers(ours.stdout) if ours else 0
        stage_src = "printed by faceverify scan"
    if stages is not None or args.breakdown == "none":
        return stages, stage_src, face_workers, None
    summary = in_process_breakdown(folder, gallery, model, args.workers, tmp / "report-in-process.csv")
    row = ("run_scan in-process (model preloaded)", summary.seconds, None, None, scan_result(summary.report, person))
    return summary.stage_seconds, "verify.scan.run_scan in-process on the same folder", summary.face_workers, row


def print_scan_table(rows: list[Row], n: int) -> None:
    base = rows[-1][1] if rows and rows[-1][0].startswith("face_recognition") else None
    mb = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    print_table(
        ("command", "wall s", "images/s", "vs face_recognition", "peak MB (largest process)", "peak MB (tree)",
         "result"),
        [(name, f"{sec:.1f}", f"{n / sec:.1f}", f"{base / sec:.2f}x" if base else "-", mb(big), mb(tree), result)
         for name, sec, big, tree, result in rows],
        right=(False, True, True, True, True, True, False),
    )


def print_stages(stages: dict, stage_src: str, face_workers: int, workers: int, n: int) -> None:
    in_workers = {"decode"} | ({"detect", "align", "embed"} if face_workers else set())
    where = f"{workers} workers, summed" if workers > 0 else "main process"
    print(f"\nfaceverify per stage ({stage_src}); "
          + (f"detection, alignment and embedding ran in the {face_workers} worker processes (one "
             "thread each); " if face_workers else "detection, alignment and embedding ran in the main "
             "process; ")
          + "start = until the first worker was ready, decode_wait = time the main process waited for "
          "the workers after that\n")
    keys = [k for k in STAGE_ORDER if k in stages] + [k for k in stages if k not in STAGE_ORDER]
    print_table(("stage", "seconds", "ms/image", "where"),
                [(k, f"{stages[k]:.2f}", f"{1000 * stages[k] / n:.1f}",
                  where if k in in_workers else "main process") for k in keys])

if __name__ == "__main__":
    main()
