#!/usr/bin/env bash
# Throughput of 1 against 2 Ray Serve replicas under the same closed-loop load (docs/scaling.md, "Measured").
# From the repository root:  docs/results/scaling/run.sh <data root> [tag]
# Starts a throw-away redis-server on a free loopback port (nothing saved), then for N in 1 2:
# `deepdefense serve --replicas N --replica-cpus 1 --state redis://...` (default checkpoint, defense and gate),
# waits for /readyz (deadline), runs `deepdefense load` (16 clients, 60 s, single-instance requests with
# maps) and writes its report to docs/results/scaling/load-replicas-N<tag>.json; then stops the server (SIGTERM).
set -euo pipefail
DATA_ROOT=${1:?usage: docs/results/scaling/run.sh <data root>}
OUT=docs/results/scaling
TAG=${2:-}
CLIENTS=${CLIENTS:-16}
DURATION=${DURATION:-60}
READY_DEADLINE_S=${READY_DEADLINE_S:-240}
export DD_DATA_ROOT=$DATA_ROOT
export DD_API_KEYS=scaling-run-key
export DD_CLIENT_API_KEY=$DD_API_KEYS
WORK=$(mktemp -d)
source "$(dirname "$0")/common.sh"
trap cleanup EXIT
start_redis

for N in 1 2; do
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  start_cluster "$N" "$WORK/serve-$N.log" --query-budget 10000000
  deepdefense load --url "$URL" --clients "$CLIENTS" --duration "$DURATION" --instances 1 \
    --timeout 120 --out "$OUT/load-replicas-$N$TAG.json" >/dev/null
  echo "replicas=$N: spent in Redis $(redis-cli -p "$REDIS_PORT" --scan --pattern 'dd:budget:*' | xargs -r redis-cli -p "$REDIS_PORT" get)" >&2
  stop_cluster
done
