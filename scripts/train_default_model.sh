#!/usr/bin/env bash
# Reproduces the shipped model verify/models/default.pt from scratch on ../shared/data, CPU only.
# Takes ~1.5 hours on an idle 2-core machine: stage 1 (~6 min), stage 2 (~72 min for 30 epochs),
# cohort (~1 min), LFW evaluation (~2 min).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${FACEVERIFY_DATA:-../shared/data}
FV=".venv/bin/faceverify"
$FV train attributes -c configs/attributes-cpu.yaml --data "$DATA/celeba" --out runs/attributes-cpu
# configs/identity-cpu.yaml: 30 epochs, EMA of the weights (optim.ema 0.998); the shipped run was
# runs/identity-v2, trained with exactly these settings.
$FV train identity -c configs/identity-cpu.yaml --data "$DATA/celeba" --data "$DATA/celeba_half" \
    --init runs/attributes-cpu --out runs/identity-cpu
$FV calibrate --model runs/identity-cpu/model.pt --pairs "$DATA/lfw/pairsDevTrain.txt" \
    --images "$DATA/lfw/lfw-deepfunneled"
cp runs/identity-cpu/model.pt verify/models/default.pt
$FV evaluate --model verify/models/default.pt --pairs "$DATA/lfw/pairsDevTest.txt" \
    --images "$DATA/lfw/lfw-deepfunneled" --threshold-from "$DATA/lfw/pairsDevTrain.txt" --json
