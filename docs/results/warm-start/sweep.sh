#!/usr/bin/env bash
# Strength against steps from the shipped warm start, and the previous defaults (60 steps from the victim),
# on the first 512 MNIST test digits in micro-batches of 64 (docs/performance.md, "Warm starts").
# From the repository root:  docs/results/warm-start/sweep.sh <data root>
set -euo pipefail
DATA_ROOT=${1:?usage: docs/results/warm-start/sweep.sh <data root>}
OUT=docs/results/warm-start
deepdefense fidelity --data-root "$DATA_ROOT" --n 512 --batch-size 64 --set warm_start=false \
  --json "$OUT/previous-defaults.json" >/dev/null
for STEPS in 6 8 10 12 15; do
  deepdefense fidelity --data-root "$DATA_ROOT" --n 512 --batch-size 64 --set steps=$STEPS \
    --json "$OUT/warm-steps$STEPS.json" >/dev/null
done
