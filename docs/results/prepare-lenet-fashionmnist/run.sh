#!/bin/bash
# deepdefense prepare on lenet-fashionmnist from nothing but its trained weights (issue 33's target): the shipped
# weights file alone in a fresh folder, described as a model from elsewhere (lenet-fashionmnist.toml), prepared
# with the settings its shipped companions were made with (warm start --serve-steps 30, EDM measured on MNIST),
# then compared with the shipped companions (compare.py). ~40 min on one busy core.
set -e
cd "$(dirname "$0")/../../.."
work=${WORK:-/tmp/prep-fmnist}
rm -rf "$work" && mkdir -p "$work"
cp models/checkpoints/lenet-fashionmnist.safetensors "$work/weights.safetensors"
cp docs/results/prepare-lenet-fashionmnist/lenet-fashionmnist.toml "$work/"
OMP_NUM_THREADS=1 python -m deepdefense.cli prepare --from "$work/lenet-fashionmnist.toml" \
  --checkpoint "$work/lenet-fashionmnist" --data-root ../shared/data --serve-steps 30 --edm --seed 0 > "$work/prepare.log" 2>&1
cp "$work"/lenet-fashionmnist.prepare/{report.json,report.md,domain.json} docs/results/prepare-lenet-fashionmnist/
python docs/results/prepare-lenet-fashionmnist/compare.py "$work" > docs/results/prepare-lenet-fashionmnist/comparison.md
