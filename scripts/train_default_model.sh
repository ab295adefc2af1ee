#!/usr/bin/env bash
# Reproduces the shipped model verify/models/default.pt from scratch on ../shared/data, CPU only.
# Takes ~1 hour on an idle 2-core machine: stage 1 (~6 min), stage 2 (~47 min for 20 epochs), cohort (~1.5 min),
# LFW evaluation (~3 min).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${FACEVERIFY_DATA:-../shared/data}
FV=".venv/bin/faceverify"
$FV train attributes -c configs/attributes-cpu.yaml --data "$DATA/celeba" --out runs/attributes-cpu
$FV train identity -c configs/identity-cpu.yaml --data "$DATA/celeba" --data "$DATA/celeba_half" \
    --init runs/attributes-cpu --out runs/identity-cpu
# The shipped model was then continued for 6 more epochs (the cosine schedule re-stretched to 20):
$FV train identity -c configs/identity-cpu.yaml --data "$DATA/celeba" --data "$DATA/celeba_half" \
    --init runs/attributes-cpu --out runs/identity-cpu --resume --epochs 20
$FV calibrate --model runs/identity-cpu/model.pt --pairs "$DATA/lfw/pairsDevTrain.txt" \
    --images "$DATA/lfw/lfw-deepfunneled"
cp runs/identity-cpu/model.pt verify/models/default.pt
$FV evaluate --model verify/models/default.pt --pairs "$DATA/lfw/pairsDevTest.txt" \
    --images "$DATA/lfw/lfw-deepfunneled" --threshold-from "$DATA/lfw/pairsDevTrain.txt" --json
