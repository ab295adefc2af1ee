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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACEVERIFY, LFW, REPO, SHARED_DATA, print_table, ratio, resolve_model, run_measured, write_random_model  # noqa: E402



class Run:
    """The photos, folders and model files of one run, and each command's measurement by key."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        lfw = Path(args.lfw)
        photos = sorted(lfw.rglob("*.jpg"))
        self.enroll_a = sorted((lfw / args.person_a).glob("*.jpg"))[:3]
        self.enroll_b = sorted((lfw / args.person_b).glob("*.jpg"))[:3]
        # held back: every 37th photo not used for enrolling, `--new` of them
        pool = [p for p in photos if p not in self.enroll_a + self.enroll_b]
        self.held = pool[::37][:args.new]
        self.library, self.new = tmp / "library", tmp / "new"
        self.db, self.gallery = tmp / "library.db", tmp / "gallery"
        for p in photos:
            dest = (self.new if p in self.held else self.library) / p.parent.name / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
        self.model, self.model_note = resolve_model(args.model, tmp)
        self.other = Path(args.other_model) if args.other_model else write_random_model(tmp / "other.pt")
        self.env = {**os.environ, "FACEVERIFY_HOME": str(tmp / "home")}
        self.fv = [str(FACEVERIFY)]
        self.common = ["--gallery", str(self.gallery), "--model", str(self.model)]
        self.scan = [*self.fv, "scan", str(self.library), *self.common, "--workers", str(args.workers)]
        self.other_scan = [*self.fv, "scan", str(self.library), "--gallery", tmp / "gallery-other", "--model",
                           self.other, "--workers", str(args.workers)]
        self.n_lib = sum(1 for _ in self.library.rglob("*.jpg"))
        self.m: dict[str, Any] = {}  # key -> common.Measured
        self.walked, self.walk_s = 0, 0.0

    def run(self, key: str, what: str, argv: list, ok: tuple[int, ...] = (0, 1)) -> None:
        m = run_measured([str(a) for a in argv], env=self.env)
        if m.returncode not in ok:
            m.check(what)
        print(f"  {what}: {m.seconds:.1f} s", file=sys.stderr, flush=True)
        self.m[key] = m

    def add_new_photos(self) -> None:
        """The held-back photos join the library; the walk of it timed in this process."""
        shutil.copytree(self.new, self.library / "new")
        from verify.scan import walk_files

        t0 = time.perf_counter()
        self.walked = len(walk_files([self.library]))
        self.walk_s = time.perf_counter() - t0

    def same_bytes(self, a: str, b: str) -> bool:
        return (self.tmp / a).read_bytes() == (self.tmp / b).read_bytes()


# The steps, in order: (key, what, argv of a faceverify command, its accepted exit codes), or (None, what,
# a step in this process). Person A is enrolled before the first scan, person B after it.
STEPS = (
    ("enroll_a", "enroll A", lambda r: [*r.fv, "enroll", r.args.person_a, *r.enroll_a, *r.common], (0,)),
    ("indexed", "scan, index kept", lambda r: [*r.scan, "--index", r.db, "--out", r.tmp / "r_index.csv"], (0, 1)),
    ("oneshot", "scan, no index", lambda r: [*r.scan, "--no-index", "--out", r.tmp / "r_oneshot.csv"], (0, 1)),
    ("enroll_b", "enroll B", lambda r: [*r.fv, "enroll", r.args.person_b, *r.enroll_b, *r.common], (0,)),
    ("rescan_b", "second question, re-scan", lambda r: [*r.scan, "--no-index", "--out", r.tmp / "r_b.csv"], (0, 1)),
    ("find_b", "second question, find", lambda r: [*r.fv, "find", r.args.person_b, "--gallery", r.gallery,
                                                   "--index", r.db, "--out", r.tmp / "f_b.csv"], (0, 1)),
    ("find_all", "find, everyone", lambda r: [*r.fv, "find", "--gallery", r.gallery, "--index", r.db,
                                              "--out", r.tmp / "f_all.csv"], (0, 1)),
    ("unchanged", "rescan, nothing changed", lambda r: [*r.scan, "--index", r.db, "--out", r.tmp / "r_again.csv"],
     (0, 1)),
    # incremental: the held-back photos alone (one-shot), the walk, then the indexed scan with them added
    ("alone", "new photos alone", lambda r: [*r.fv, "scan", str(r.new), *r.common, "--workers", str(r.args.workers),
                                             "--no-index", "--out", r.tmp / "r_new.csv"], (0, 1)),
    (None, "add the new photos, walk", Run.add_new_photos),
    ("incremental", "incremental", lambda r: [*r.scan, "--index", r.db, "--out", r.tmp / "r_incr.csv"], (0, 1)),
    ("enroll_a_other", "enroll A (other model)", lambda r: [*r.fv, "enroll", r.args.person_a, *r.enroll_a, "--gallery",
                                                            r.tmp / "gallery-other", "--model", r.other], (0,)),
    ("swap", "model swap, re-embed", lambda r: [*r.other_scan, "--index", r.db, "--out", r.tmp / "r_other.csv"],
     (0, 1)),
    ("swap_full", "model swap, full scan", lambda r: [*r.other_scan, "--no-index", "--out",
                                                      r.tmp / "r_other_full.csv"], (0, 1)),
)


def table_rows(r: Run) -> list[tuple]:
    """The table: (command, its key, the baseline's key or None, note), each a row."""
    m, held = r.m, len(r.held)
    same_report = "report identical: " + ("yes" if r.same_bytes("r_index.csv", "r_oneshot.csv") else "NO")
    same_find = "= one-shot report: " + ("yes" if r.same_bytes("f_all.csv", "r_b.csv") else "NO")
    incremental = m["incremental"].seconds / (m["alone"].seconds + r.walk_s)
    rows = (
        ("scan, index kept (first scan)", "indexed", None, f"{r.n_lib} photos"),
        ("scan, no index (one-shot)", "oneshot", None, same_report),
        ("second question: full re-scan (one-shot)", "rescan_b", None, "baseline"),
        ("second question: find B", "find_b", "rescan_b", "goal >= 50x"),
        ("find, everyone (full report)", "find_all", "rescan_b", same_find),
        ("rescan, nothing changed", "unchanged", "rescan_b", ""),
        (f"{held} new photos alone (one-shot)", "alone", None, f"+ walk {r.walk_s:.2f} s ({r.walked} files)"),
        (f"incremental: +{held} photos, indexed scan", "incremental", None,
         f"{incremental:.2f}x of (alone + walk); goal <= 1.2x"),
        ("model swap: full scan with the other model", "swap_full", None, "baseline"),
        ("model swap: re-embed the indexed faces", "swap", "swap_full", "no detection"),
    )
    return [(what, f"{m[key].seconds:.1f}", f"{m[key].max_rss_mb:.0f}", f"{m[key].tree_peak_mb:.0f}",
             ratio(m[base].seconds, m[key].seconds) if base is not None else "", note)
            for what, key, base, note in rows]


def index_line(r: Run) -> str:
    """What the index holds and its size per face (database + WAL after the scans)."""
    with sqlite3.connect(f"{r.db.as_uri()}?mode=ro", uri=True) as c:
        faces = c.execute("SELECT count(*) FROM faces").fetchone()[0]
        files = c.execute("SELECT count(*) FROM files").fetchone()[0]
        emb = c.execute("SELECT count(*), sum(length(vector)) FROM embeddings").fetchone()
        models = c.execute("SELECT count(*) FROM models").fetchone()[0]
    db_bytes = sum(p.stat().st_size for p in r.tmp.glob("library.db*") if p.is_file() and not p.name.endswith(".lock"))
    return (f"index: {files} files, {faces} faces, {emb[0]} embeddings ({(emb[1] or 0) / max(emb[0], 1):.0f} B each) "
            f"in {db_bytes / 1e6:.1f} MB: {db_bytes / max(faces, 1):.0f} B per face with {models} models' embeddings "
            f"({db_bytes / max(files, 1):.0f} B per file)")


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

    tmp = Path(tempfile.mkdtemp(prefix="bench-library-"))
    try:
        r = Run(args, tmp)
        print(f"{r.n_lib} photos in the library, {len(r.held)} held back; {r.model_note}", file=sys.stderr)
        for key, what, step, *ok in STEPS:
            if key is None:
                step(r)
            else:
                r.run(key, what, step(r), *ok)
        print(f"\n{r.n_lib} LFW photos (+{len(r.held)} added later), --workers {args.workers}; {r.model_note}; "
              f"2 cores. Ratios: the baseline's seconds / this row's.\n")
        print_table(("command", "wall s", "peak MB (largest)", "peak MB (tree)", "vs baseline", "baseline / note"),
                    table_rows(r), right=[False, True, True, True, True, False])
        print(f"\n{index_line(r)}")
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    main()
