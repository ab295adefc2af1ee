"""The library index on real photos: scan once, ask many times (issue 16). Every row is one CLI
command in a subprocess, run side by side in this one run.

    .venv/bin/python bench/bench_library.py [--workers 2] [--new 100] [--model PATH] [--keep]

Photos: every LFW deep-funneled JPEG of ../shared/data (4,992 files of 250x250), copied into a temp
folder (`library/`), less `--new` photos held back for the incremental row. Person A (default
Jennifer_Lopez) is enrolled from 3 of their photos before the first scan; person B (default
Paul_Wolfowitz) from 3 of theirs after it: "enroll one more person and answer".

Rows:
- scan, index kept: `faceverify scan library --index DB` (the first scan; pays for the index writes).
- scan, no index: `faceverify scan library --no-index` (today's one-shot scan, same photos).
- second question, re-scan: after enrolling B, the full re-scan a one-shot tool needs (`--no-index`).
- second question, find: `faceverify find B --index DB` (answers from the index). Goal: >= 50x.
- find (everyone): the full report from the index, same columns as the scan's.
- rescan, nothing changed: `faceverify scan library --index DB` again (the walk + matching + report).
- incremental: the `--new` held-back photos copied into `library/new/`, then the indexed scan again,
  against a one-shot scan of those photos alone plus the walk of the library (`walk_files` timed in
  this process). Goal: <= 1.2x.
- model swap: another model with the shipped architecture (random weights: the cost of embedding does
  not depend on them; `--other-model` for a real one) re-embeds every indexed face from its stored
  landmarks (`scan --model OTHER --index DB`: decode, align, embed, no detection), against a full
  one-shot scan with that model.
The index size per face (database + WAL after the scans) closes the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACEVERIFY, LFW, REPO, SHARED_DATA, print_table, ratio, resolve_model, run_measured, write_random_model  # noqa: E402



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--new", type=int, default=100, help="photos added for the incremental row")
    ap.add_argument("--person-a", default="Jennifer_Lopez")
    ap.add_argument("--person-b", default="Paul_Wolfowitz")
    ap.add_argument("--model", default=None, help="model file (default: the shipped one)")
    ap.add_argument("--other-model", default=None, help="model for the swap row (default: random weights, same architecture)")
    ap.add_argument("--lfw", default=str(LFW))
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = ap.parse_args(argv)

    lfw = Path(args.lfw)
    photos = sorted(lfw.rglob("*.jpg"))
    enroll_a = sorted((lfw / args.person_a).glob("*.jpg"))[:3]
    enroll_b = sorted((lfw / args.person_b).glob("*.jpg"))[:3]
    # held back: every 37th photo not used for enrolling, `--new` of them
    pool = [p for p in photos if p not in enroll_a + enroll_b]
    held = pool[::37][:args.new]
    tmp = Path(tempfile.mkdtemp(prefix="bench-library-"))
    try:
        library, new, db, gallery = tmp / "library", tmp / "new", tmp / "library.db", tmp / "gallery"
        for p in photos:
            dest = (new if p in held else library) / p.parent.name / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
        model, model_note = resolve_model(args.model, tmp)
        other = Path(args.other_model) if args.other_model else write_random_model(tmp / "other.pt")
        env = {**os.environ, "FACEVERIFY_HOME": str(tmp / "home")}
        fv = [str(FACEVERIFY)]
        common = ["--gallery", str(gallery), "--model", str(model)]
        scan = [*fv, "scan", str(library), *common, "--workers", str(args.workers)]

        def run(what: str, argv: list[str], ok=(0, 1)):
            m = run_measured([str(a) for a in argv], env=env)
            if m.returncode not in ok:
                m.check(what)
            print(f"  {what}: {m.seconds:.1f} s", file=sys.stderr, flush=True)
            return m

        n_lib = sum(1 for _ in library.rglob("*.jpg"))
        print(f"{n_lib} photos in the library, {len(held)} held back; {model_note}", file=sys.stderr)
        run("enroll A", [*fv, "enroll", args.person_a, *enroll_a, *common], ok=(0,))
        indexed = run("scan, index kept", [*scan, "--index", db, "--out", tmp / "r_index.csv"])
        oneshot = run("scan, no index", [*scan, "--no-index", "--out", tmp / "r_oneshot.csv"])
        same_report = (tmp / "r_index.csv").read_bytes() == (tmp / "r_oneshot.csv").read_bytes()
        run("enroll B", [*fv, "enroll", args.person_b, *enroll_b, *common], ok=(0,))
        rescan_b = run("second question, re-scan", [*scan, "--no-index", "--out", tmp / "r_b.csv"])
        find_b = run("second question, find", [*fv, "find", args.person_b, "--gallery", gallery, "--index", db,
                                               "--out", tmp / "f_b.csv"])
        find_all = run("find, everyone", [*fv, "find", "--gallery", gallery, "--index", db, "--out", tmp / "f_all.csv"])
        same_find = (tmp / "f_all.csv").read_bytes() == (tmp / "r_b.csv").read_bytes()
        unchanged = run("rescan, nothing changed", [*scan, "--index", db, "--out", tmp / "r_again.csv"])

        # incremental: the held-back photos alone (one-shot), the walk, then the indexed scan with them added
        alone = run("new photos alone", [*fv, "scan", str(new), *common, "--workers", str(args.workers), "--no-index",
                                         "--out", tmp / "r_new.csv"])
        shutil.copytree(new, library / "new")
        from verify.scan import walk_files

        t0 = time.perf_counter()
        walked = len(walk_files([library]))
        walk_s = time.perf_counter() - t0
        incremental = run("incremental", [*scan, "--index", db, "--out", tmp / "r_incr.csv"])

        run("enroll A (other model)", [*fv, "enroll", args.person_a, *enroll_a, "--gallery", tmp / "gallery-other",
                                       "--model", other], ok=(0,))
        swap = run("model swap, re-embed", [*fv, "scan", str(library), "--gallery", tmp / "gallery-other",
                                            "--model", other, "--workers", str(args.workers), "--index", db,
                                            "--out", tmp / "r_other.csv"])
        swap_full = run("model swap, full scan", [*fv, "scan", str(library), "--gallery", tmp / "gallery-other",
                                                  "--model", other, "--workers", str(args.workers), "--no-index",
                                                  "--out", tmp / "r_other_full.csv"])

        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as c:
            faces = c.execute("SELECT count(*) FROM faces").fetchone()[0]
            files = c.execute("SELECT count(*) FROM files").fetchone()[0]
            emb = c.execute("SELECT count(*), sum(length(vector)) FROM embeddings").fetchone()
            models = c.execute("SELECT count(*) FROM models").fetchone()[0]
        db_bytes = sum(p.stat().st_size for p in tmp.glob("library.db*") if p.is_file() and not p.name.endswith(".lock"))

        def line(what, m, base=None, note=""):
            return (what, f"{m.seconds:.1f}", f"{m.max_rss_mb:.0f}", f"{m.tree_peak_mb:.0f}",
                    ratio(base.seconds, m.seconds) if base is not None else "", note)

        print(f"\n{n_lib} LFW photos (+{len(held)} added later), --workers {args.workers}; {model_note}; "
              f"2 cores. Ratios: the baseline's seconds / this row's.\n")
        print_table(("command", "wall s", "peak MB (largest)", "peak MB (tree)", "vs baseline", "baseline / note"), [
            line("scan, index kept (first scan)", indexed, note=f"{n_lib} photos"),
            line("scan, no index (one-shot)", oneshot, note="report identical: " + ("yes" if same_report else "NO")),
            line("second question: full re-scan (one-shot)", rescan_b, note="baseline"),
            line("second question: find B", find_b, rescan_b, "goal >= 50x"),
            line("find, everyone (full report)", find_all, rescan_b,
                 "= one-shot report: " + ("yes" if same_find else "NO")),
            line("rescan, nothing changed", unchanged, rescan_b),
            line(f"{len(held)} new photos alone (one-shot)", alone, note=f"+ walk {walk_s:.2f} s ({walked} files)"),
            line(f"incremental: +{len(held)} photos, indexed scan", incremental, None,
                 f"{incremental.seconds / (alone.seconds + walk_s):.2f}x of (alone + walk); goal <= 1.2x"),
            line("model swap: full scan with the other model", swap_full, note="baseline"),
            line("model swap: re-embed the indexed faces", swap, swap_full, "no detection"),
        ], right=[False, True, True, True, True, False])
        print(f"\nindex: {files} files, {faces} faces, {emb[0]} embeddings ({(emb[1] or 0) / max(emb[0], 1):.0f} B each) "
              f"in {db_bytes / 1e6:.1f} MB: {db_bytes / max(faces, 1):.0f} B per face with {models} models' embeddings "
              f"({db_bytes / max(files, 1):.0f} B per file)")
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
