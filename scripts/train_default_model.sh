#!/usr/bin/env bash
# Reproduces the shipped model verify/models/default.pt from scratch on ../shared/data, CPU only.
# Resumable: run it again after an interruption. Each training stage continues from its last
# checkpoint (a finished stage resumes as a no-op), the dlib import and the teacher's views (cached in
# .cache/faceverify) are made once. On an idle 2-core machine: stage 1 ~5 min, dlib import ~3 min,
# teacher views ~9 min (8 per image), stage 2 ~58 min (24 epochs), cohort and LFW evaluation ~4 min.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${FACEVERIFY_DATA:-../shared/data}
FV=".venv/bin/faceverify"
RUNS=${RUNS:-runs}
resume() { [ -f "$1/ckpt_last.pt" ] && echo --resume || true; }
# 1. attribute pre-training on dlib's chip box of the CelebA frame (configs/attributes-cpu.yaml)
$FV train attributes -c configs/attributes-cpu.yaml --data "$DATA/celeba" --out "$RUNS/attributes-cpu" \
    $(resume "$RUNS/attributes-cpu")
# 2. the teacher: dlib's face network from the face_recognition_models package, calibrated here
[ -f "$RUNS/dlib.pt" ] || $FV model import-dlib --out "$RUNS/dlib.pt" --data "$DATA"
# 3. identity stage: triplet + CosFace + distillation from the teacher (configs/identity-cpu.yaml)
$FV train identity -c configs/identity-cpu.yaml --data "$DATA/celeba" --data "$DATA/celeba_wild" \
    --data "$DATA/celeba_half" --init "$RUNS/attributes-cpu" --out "$RUNS/identity-cpu" \
    --set identity.teacher="$RUNS/dlib.pt" $(resume "$RUNS/identity-cpu")
# 4. impostor cohort (LFW DevTrain people), ship, and report LFW View 1 DevTest
$FV calibrate --model "$RUNS/identity-cpu/model.pt" --pairs "$DATA/lfw/pairsDevTrain.txt" \
    --images "$DATA/lfw/lfw-deepfunneled"
cp "$RUNS/identity-cpu/model.pt" verify/models/default.pt
$FV evaluate --model verify/models/default.pt --pairs "$DATA/lfw/pairsDevTest.txt" \
    --images "$DATA/lfw/lfw-deepfunneled" --threshold-from "$DATA/lfw/pairsDevTrain.txt" --json
