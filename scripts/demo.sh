#!/usr/bin/env bash
# The main job on a fresh machine, offline, with the shipped model and the real faces in ../shared/data:
# enroll one person (a CelebA identity never seen in training) from 12 photos, verify their other
# photos and a few strangers, then scan a folder of mixed photos into a report.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${FACEVERIFY_DATA:-../shared/data}
FV=".venv/bin/faceverify"
[ -d "$DATA/celeba" ] || { echo "demo: $DATA/celeba not found (set FACEVERIFY_DATA)" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export FACEVERIFY_HOME="$WORK/home"

# One held-out identity (partition 2) and its 30 photos, in file-name order.
mapfile -t PHOTOS < <(.venv/bin/python - "$DATA/celeba" <<'PY'
import sys
from verify.data.celeba import load_celeba
t = load_celeba([sys.argv[1]], need_attributes=False).table
t = t[t["partition"] == 2]
ident = sorted(t["identity"].unique())[0]
print("\n".join(t[t["identity"] == ident].sort_values("image")["path"]))
PY
)
echo "== enroll: 12 photos of a CelebA test identity (each + up to 8 augmented views)"
$FV enroll me "${PHOTOS[@]:0:12}"
echo
echo "== verify: the same person's other 18 photos (1:1, --as me)"
set +e
$FV verify "${PHOTOS[@]:12}" --as me --json > "$WORK/mine.jsonl"
set -e
.venv/bin/python -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(f'accepted {sum(any(f[\"match\"] for f in x[\"faces\"]) for x in r)}/{len(r)} of my later photos')" "$WORK/mine.jsonl"
echo
echo "== verify: 5 strangers (LFW)"
set +e
$FV verify $(ls -d "$DATA"/lfw/lfw-deepfunneled/*/ | head -5 | xargs -I{} sh -c 'ls {}*.jpg | head -1')
echo "exit code $? (1 = no matching face in some photo)"
set -e
echo
echo "== scan: a folder of 6 of my photos, 40 strangers, a text file and a broken JPEG"
mkdir -p "$WORK/photos/sub"
cp "${PHOTOS[@]:24:6}" "$WORK/photos/sub/"
ls -d "$DATA"/lfw/lfw-deepfunneled/*/ | sed -n '100,139p' | while read -r d; do cp "$(ls "$d"*.jpg | head -1)" "$WORK/photos/"; done
echo "not a photo" > "$WORK/photos/notes.txt"
head -c 2000 "${PHOTOS[0]}" > "$WORK/photos/broken.jpg"
PAGE_DIR=${DEMO_OUT:-$WORK}  # DEMO_OUT=DIR keeps the HTML page (and its thumbnails) after the demo
$FV scan "$WORK/photos" --out "$WORK/report.csv" --workers 2 --html "$PAGE_DIR/report.html"
.venv/bin/python - "$WORK/report.csv" <<'PY'
import sys, pandas as pd
r = pd.read_csv(sys.argv[1])
print(r["status"].value_counts().to_string() if "status" in r else r.head())
m = r[r["match"] == True]
print(f"matched faces: {len(m)} (files: {', '.join(sorted(set(m['path'].map(lambda p: p.split('/')[-2] + '/' + p.split('/')[-1]))))})")
PY
echo
echo "== scan again: the library index kept every file and face, so nothing is decoded twice"
$FV scan "$WORK/photos" --out "$WORK/report2.csv" --workers 2 | grep "files walked"
cmp -s "$WORK/report.csv" "$WORK/report2.csv" && echo "same report"
echo
echo "== find: my photos, answered from the index without reading a photo"
$FV find me --out "$WORK/me.csv"
