#!/usr/bin/env bash
# The choice of N and λ_D for lenet-mnist's EDM (docs/design.md, "Ensemble of Diverse Models"): short runs on
# 25,600 MNIST training images (one epoch), each measured on the 5,000 held-out training images and synthetic
# outliers made from them only. No foreign data set is read (no --ood-dataset). Usage: sweep.sh "N:LAMBDA ..."
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=docs/results/edm/sweep
mkdir -p "$out" /tmp/edm-sweep
for pair in ${1:-5:0 5:0.5 5:1 5:2}; do
  n=${pair%%:*} lambda=${pair##*:}
  [ -f "$out/n$n-lambda$lambda.json" ] && continue
  deepdefense edm --checkpoint lenet-mnist --data-root "${DD_DATA_ROOT:-../shared/data}" --members "$n" \
    --lambda-d "$lambda" --epochs 1 --train-images 25600 --seed 0 --quiet --device cpu \
    --save "/tmp/edm-sweep/n$n-lambda$lambda" --out "$out/n$n-lambda$lambda.json"
done
