#!/usr/bin/env bash
# Issue 18: the extra face sets, from git checkouts to roots that `--data` / `data.unlabelled_roots` read.
# Resumable: every stage skips what is done (prepare_faces.py keeps a ledger, filter_faces.py stores the
# teacher's vectors and moves what it removes, a held-out face is no longer in the image folder).
#
#   GIT=/path/to/clones OUT=../extdata scripts/prepare_extra_data.sh
#   LFW_MARGIN=0.015 FROM=../extdata/prepared OUT=../extdata-margin scripts/prepare_extra_data.sh
#
# LFW_MARGIN: the filter's relative LFW rule (`filter_faces.py --lfw-margin`, README: Data) instead of the
# absolute one the shipped model's data were made with. FROM: another run's $OUT/prepared; its aligned
# faces (kept, removed and held out alike) and the teacher's stored vectors are hard-linked here and
# only the filter runs again (minutes, not the ~40 of detection and alignment; GIT is not needed).
#
# GIT holds one clone (or bare mirror) per repository, named owner+name, at least at the commits below;
# the images are extracted with `git archive` into $OUT/src, prepared into $OUT/prepared. Nothing here
# writes into the repository. Needs the teacher runs/dlib.pt (`faceverify model import-dlib`).
set -euo pipefail
cd "$(dirname "$0")/.."
FROM=${FROM:-}
LFW_MARGIN=${LFW_MARGIN:-}
[ -n "$FROM" ] || GIT=${GIT:?GIT=folder of the clones}
OUT=${OUT:-../extdata}
DATA=${FACEVERIFY_DATA:-../shared/data}
PY=.venv/bin/python
mkdir -p "$OUT/src" "$OUT/prepared"

extract() {  # repository, commit, path inside it, set name
  local git="$GIT/$1"
  [ -d "$git/.git" ] && git="$git/.git"
  [ -d "$git/repo/.git" ] && git="$git/repo/.git"
  [ -d "$git/repo" ] && git="$git/repo"
  [ -d "$OUT/src/$4" ] && return 0
  rm -rf "$OUT/src/$4.part" && mkdir -p "$OUT/src/$4.part"
  git --git-dir="$git" archive "$2" "$3" | tar -x -C "$OUT/src/$4.part"
  mv "$OUT/src/$4.part" "$OUT/src/$4"
}
SETS=(CelebA_Samples UTKFace AllAgeFaces SCUT-FBP5500 GENKI-4K)
relink() {  # set name: FROM's aligned faces and teacher vectors, unfiltered, as prepare_faces.py left them
  local src="$FROM/$1" dst="$OUT/prepared/$1"
  [ -d "$dst" ] && return 0
  rm -rf "$dst.part" && mkdir -p "$dst.part/img_align_celeba"
  for d in img_align_celeba removed cohort strangers; do
    [ -d "$src/$d" ] && find "$src/$d" -maxdepth 1 -type f -exec ln -t "$dst.part/img_align_celeba" {} +
  done
  cp "$src"/teacher-*.npz "$src/ledger.jsonl" "$dst.part/"
  [ -f "$src/failed.txt" ] && cp "$src/failed.txt" "$dst.part/"
  $PY -c "import json, sys; c = json.load(open(sys.argv[1])); json.dump({k: c[k] for k in ('in', 'ok', 'failed', 'exact_dup') if k in c}, open(sys.argv[2], 'w'), indent=1)" \
      "$src/counts.json" "$dst.part/counts.json"
  mv "$dst.part" "$dst"
}
if [ -n "$FROM" ]; then
  for n in "${SETS[@]}"; do relink "$n"; done
else
extract ShaharKSegal+CelebA_Samples 2a68dac53f1a175a4716f615d7f096c8a6122482 celeba_identity_samples CelebA_Samples
extract delonyohan+deeplearn-agepred b06607bf2477c8295b33facb5dea7aada27cac01 dataset/UTKFace UTKFace
extract middleyuan+All-Age-Faces-Dataset 28741a75e2efb7a2f96e13d4beb58411536f473d "All-Age-Faces Dataset/aglined faces" AllAgeFaces
extract dduygaucho+SCUT-FBP5000 f5be42e82483e7a902da0f5d254c071d35eb01d7 data/landing/Images SCUT-FBP5500
extract cuongchl96+smile-CNN2Loss 850d88e1ec855e336d49504db54edd6323bd5495 train GENKI-4K

# 1. detect + align onto the CelebA frame (CelebA names kept, exact duplicates dropped)
for n in "${SETS[@]}"; do
  $PY scripts/prepare_faces.py "$OUT/src/$n" --out "$OUT/prepared/$n"
done
fi
RULE=()
[ -z "$LFW_MARGIN" ] || RULE=(--lfw-margin "$LFW_MARGIN")
# 2. LFW people and near duplicates out, by the teacher's vector. The labelled set keeps its CelebA
#    partitions (its held-out people are partitions 1-2); each unlabelled set holds out 45% of its faces
#    for the impostor cohort and 10% as strangers for scripts/far_check.py.
[ -f runs/dlib.pt ] || .venv/bin/faceverify model import-dlib --out runs/dlib.pt --data "$DATA"
$PY scripts/filter_faces.py "$OUT/prepared/CelebA_Samples" --teacher runs/dlib.pt \
    --lfw "$DATA/lfw/lfw-deepfunneled" "${RULE[@]}" --reference "$DATA/celeba" --reference "$DATA/celeba_wild"
$PY scripts/filter_faces.py "$OUT/prepared/UTKFace" "$OUT/prepared/AllAgeFaces" "$OUT/prepared/SCUT-FBP5500" \
    "$OUT/prepared/GENKI-4K" --teacher runs/dlib.pt --lfw "$DATA/lfw/lfw-deepfunneled" "${RULE[@]}" \
    --cohort 0.45 --strangers 0.10
