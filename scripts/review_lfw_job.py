"""The review job on LFW, as a user would do it with the commands: enroll one person from 3 photos,
scan the LFW photos of ../shared/data, reject the person's worst false matches, confirm their nearest
misses; found / false before and after, and how the next `find` of that person changed.

    .venv/bin/python scripts/review_lfw_job.py [--person Paul_Wolfowitz] [--work /tmp/review_lfw]
        [--index DB] [--reject 5] [--confirm 5] [--enroll 3]

Truth: an LFW photo is named after its subject, who is centred in the 250 x 250 crop; a face whose box
centre is within 40 px of the middle is the subject, any other face a bystander (as
tests/test_library_cli.py labels them). "found": matched faces that are the person; "false": matched
faces that are not. The 3 enrolled photos are left out of every count. The user's choices are those
a person looking at the review page would make: reject the false matches with the smallest distance
(the most confident mistakes), confirm the near misses (unmatched faces whose nearest identity is
the person) that are the person, closest first. `--index`: an index of the LFW folder made before
(the scan is skipped; it must be of the same folder).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
LFW = REPO.parent / "shared" / "data" / "lfw" / "lfw-deepfunneled"


def cli(*args: object) -> str:
    r = subprocess.run([sys.executable, "-m", "verify", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    if r.returncode not in (0, 1):
        raise SystemExit(f"faceverify {' '.join(map(str, args))}: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout


def labelled(report: Path) -> pd.DataFrame:
    rows = pd.read_csv(report)
    rows = rows[rows["status"] == "face"].copy()
    cx, cy = (rows["x1"] + rows["x2"]) / 2, (rows["y1"] + rows["y2"]) / 2
    subject = ((cx - 125).abs() < 40) & ((cy - 125).abs() < 40)
    named = rows["path"].map(lambda p: Path(p).parent.name)
    rows["truth"] = named.where(subject, "bystander")
    rows["match"] = rows["match"].fillna(False).astype(bool)
    return rows


def counts(rows: pd.DataFrame, name: str, enrolled: set[str]) -> dict:
    rows = rows[~rows["path"].isin(enrolled)]
    mine = rows["match"] & (rows["identity"] == name)
    return {"found": int((mine & (rows["truth"] == name)).sum()), "false": int((mine & (rows["truth"] != name)).sum()),
            "missed": int((~mine & (rows["truth"] == name)).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--person", default="Paul_Wolfowitz")
    ap.add_argument("--work", type=Path, default=Path("/tmp/review_lfw"))
    ap.add_argument("--index", type=Path, default=None)
    ap.add_argument("--reject", type=int, default=5)
    ap.add_argument("--confirm", type=int, default=5)
    ap.add_argument("--enroll", type=int, default=3, help="photos of the person to enroll from")
    args = ap.parse_args()

    work = args.work
    gallery = work / "gallery"
    shutil.rmtree(gallery, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    db = args.index or work / "lib.db"
    photos = sorted((LFW / args.person).glob("*.jpg"))
    enrolled = {str(p) for p in photos[:args.enroll]}
    name = args.person
    print(cli("enroll", name, *photos[:args.enroll], "--gallery", gallery, "--device", "cpu").strip())
    if args.index is None:
        print(cli("scan", LFW, "--gallery", gallery, "--index", db, "--out", work / "scan.csv", "--device", "cpu").strip())

    def find(tag: str) -> pd.DataFrame:
        cli("find", "--gallery", gallery, "--index", db, "--out", work / f"{tag}.csv")
        return labelled(work / f"{tag}.csv")

    before = find("before")
    table = [("after enroll + scan", counts(before, name, enrolled))]
    pool = before[~before["path"].isin(enrolled)]
    false = pool[pool["match"] & (pool["identity"] == name) & (pool["truth"] != name)].sort_values("distance")
    for _, r in false.head(args.reject).iterrows():
        print(cli("reject", r["path"], "--face", int(r["face"]), "--as", name, "--index", db).strip())
    after_reject = find("after_reject")
    table.append((f"after rejecting {min(args.reject, len(false))} false matches", counts(after_reject, name, enrolled)))
    near = after_reject[~after_reject["path"].isin(enrolled) & ~after_reject["match"]
                        & (after_reject["nearest"] == name)].sort_values("distance")
    band = near[near["distance"] <= near["threshold"] + 0.05]  # the review page's near misses (--near-miss 0.05)
    true_near = near[near["truth"] == name].head(args.confirm)
    looked = int((near["distance"] <= true_near["distance"].max()).sum()) if len(true_near) else 0
    for _, r in true_near.iterrows():
        print(cli("confirm", r["path"], "--face", int(r["face"]), "--as", name, "--index", db, "--gallery", gallery,
                  "--device", "cpu").strip())
    after = find("after_confirm")
    table.append((f"after confirming {len(true_near)} near misses ({looked} near misses looked at)",
                  counts(after, name, enrolled)))
    decided = set(false.head(args.reject)["path"]) | set(true_near["path"])
    undecided = counts(after[~after["path"].isin(decided)], name, enrolled)
    first = counts(before[~before["path"].isin(decided)], name, enrolled)
    print(f"\n# {name}: enrolled from {args.enroll} photos; {len(pool)} other faces in the index; truth from LFW "
          f"names; near misses on the review page (within 0.05 of the threshold): {len(band)}, of them "
          f"{int((band['truth'] == name).sum())} of {name}")
    print("| state | found | false | missed |")
    print("|---|---:|---:|---:|")
    for label, c in table:
        print(f"| {label} | {c['found']} | {c['false']} | {c['missed']} |")
    print(f"| faces nobody decided about: before | {first['found']} | {first['false']} | {first['missed']} |")
    print(f"| faces nobody decided about: after | {undecided['found']} | {undecided['false']} | {undecided['missed']} |")


if __name__ == "__main__":
    main()
