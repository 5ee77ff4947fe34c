#!/usr/bin/env bash
# The eq. (1) thief of the evaluation trained with more seeds on the same two transfer sets as the third round's
# "Strength" (the second round's engine, 10 steps with im2col, and today's, 10 steps with grouped convolutions; the
# evaluation's seed-0 queries), one torch thread, so that the engines are compared over thieves rather than on one
# (docs/performance.md, "Fourth round"). From the repository root:  docs/results/perf4/thief-seeds/run.sh <data root>
set -euo pipefail
DATA_ROOT=${1:?usage: docs/results/perf4/thief-seeds/run.sh <data root>}
for seed in ${SEEDS:-1 2 3}; do
  python -m deepdefense.measure.thief_spread \
    --stores before=runs/transfer-sets/lenet-mnist-deepdefense-random-fashionmnist-6bf63342196b \
    after=runs/transfer-sets/lenet-mnist-deepdefense-random-fashionmnist-6ecd1943c316 \
    --threads 1 --seed "$seed" --data-root "$DATA_ROOT" --out "docs/results/perf4/thief-seeds/thief-spread-1-seed$seed.json"
done
