#!/usr/bin/env bash
# Goodput of the default server under closed-loop load (docs/performance.md, "Through the server").
# From the repository root:  docs/results/goodput/run.sh <data root> [tag]   (CLIENTS="128" for an overload run)
# `deepdefense load --serve` starts `deepdefense serve` with its default settings (shipped lenet-mnist,
# DeepDefense, Grad-CAM, the gate, the default admission control: nothing lifted) on a free loopback
# port, runs single-instance requests with maps (Retry-After honoured, with jitter) and stops it.
set -euo pipefail
DATA_ROOT=${1:?usage: docs/results/goodput/run.sh <data root> [tag]}
TAG=${2:-}
OUT=docs/results/goodput
DURATION=${DURATION:-60}
CLIENTS_LIST=${CLIENTS:-32 1}
for name in $(env | grep -o '^DD_[A-Z_]*' || true); do unset "$name"; done  # the defaults, not this shell's
export DD_DATA_ROOT=$DATA_ROOT
for CLIENTS in $CLIENTS_LIST; do
  deepdefense load --serve --clients "$CLIENTS" --duration "$DURATION" --timeout 120 \
    --out "$OUT/clients$CLIENTS$TAG.json" >/dev/null
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], r['throughput_rps'], 'q/s', r['statuses'], 'p50', r['latency_ms'].get('p50'), 'ms')" "$OUT/clients$CLIENTS$TAG.json"
done
