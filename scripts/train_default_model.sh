#!/usr/bin/env bash
# Reproduces the shipped model verify/models/default.pt from scratch on ../shared/data, CPU only.
# Takes ~1 hour on 2 cores: stage 1 (~8 min), stage 2 (~35 min), cohort + LFW evaluation (~10 min).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${FACEVERIFY_DATA:-../shared/data}
FV=".venv/bin/faceverify"
$FV train attributes -c configs/attributes-cpu.yaml --data "$DATA/celeba" --out runs/attributes-cpu
$FV train identity -c configs/identity-cpu.yaml --data "$DATA/celeba" --data "$DATA/celeba_half" \
    --init runs/attributes-cpu --out runs/identity-cpu
$FV calibrate --model runs/identity-cpu/model.pt --pairs "$DATA/lfw/pairsDevTrain.txt" \
    --images "$DATA/lfw/lfw-deepfunneled"
cp runs/identity-cpu/model.pt verify/models/default.pt
$FV evaluate --model verify/models/default.pt --pairs "$DATA/lfw/pairsDevTest.txt" \
    --images "$DATA/lfw/lfw-deepfunneled" --threshold-from "$DATA/lfw/pairsDevTrain.txt" --json
