#!/usr/bin/env bash
# The GPU benchmarks of docs/performance.md, in one call when a device is lent (issue 32): LeNet-MNIST at micro-
# batches 64 and 256 through the engine and the server, and ResNet-18 at 224 px (random weights) through the
# engine. From the repository root:  docs/results/gpu/run.sh <data root>    (about 6 minutes on one H100)
set -euo pipefail
DATA_ROOT=${1:?usage: docs/results/gpu/run.sh <data root>}
OUT=docs/results/gpu
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
deepdefense bench --device cuda --data-root "$DATA_ROOT" --batch-sizes 1,64,256 --queries 512 \
  --clients 1,32 --duration 30 --out "$OUT/bench-lenet-mnist-cuda.json"
deepdefense bench --device cuda --model resnet18 --batch-sizes 1,8,32 --queries 64 --one-query-queries 8 \
  --previous none --no-server --out "$OUT/bench-resnet18-224-cuda.json"
