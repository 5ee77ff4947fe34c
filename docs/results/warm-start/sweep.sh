#!/usr/bin/env bash
# Strength against steps from the shipped warm starts, and the previous defaults (60 steps from the victim),
# on the first 512 test images of each victim in micro-batches of 64 (docs/performance.md, "Warm starts").
# From the repository root:  docs/results/warm-start/sweep.sh <data root>
set -euo pipefail
DATA_ROOT=${1:?usage: docs/results/warm-start/sweep.sh <data root>}
OUT=docs/results/warm-start
deepdefense fidelity --data-root "$DATA_ROOT" --n 512 --batch-size 64 --set warm_start=false \
  --out "$OUT/previous-defaults.json" >/dev/null
for STEPS in 6 8 10 12 15; do
  deepdefense fidelity --data-root "$DATA_ROOT" --n 512 --batch-size 64 --set steps=$STEPS \
    --out "$OUT/warm-steps$STEPS.json" >/dev/null
done
# The second shipped victim, on its own test images (Fashion-MNIST): previous defaults, steps from its warm
# start, and its default (serve_steps 30 in lenet-fashionmnist.warm.json, chosen from this sweep).
for STEPS in 10 20 30; do
  deepdefense fidelity --checkpoint lenet-fashionmnist --data-root "$DATA_ROOT" --n 512 --batch-size 64 \
    --set steps=$STEPS --out "$OUT/fashionmnist-warm-steps$STEPS.json" >/dev/null
done
deepdefense fidelity --checkpoint lenet-fashionmnist --data-root "$DATA_ROOT" --n 512 --batch-size 64 \
  --set warm_start=false --out "$OUT/fashionmnist-previous-defaults.json" >/dev/null
deepdefense fidelity --checkpoint lenet-fashionmnist --data-root "$DATA_ROOT" --n 512 --batch-size 64 \
  --out "$OUT/fashionmnist-warm-default.json" >/dev/null
