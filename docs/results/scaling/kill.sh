#!/usr/bin/env bash
# The replica-kill fault (docs/scaling.md, "Measured"). From the repository root:
#   docs/results/scaling/kill.sh <data root>
# Starts a throw-away redis-server (nothing saved) and `deepdefense serve --replicas 2 --replica-cpus 1
# --state redis://... --query-budget B`, waits for /readyz (deadline), then `python -m deepdefense.measure.cluster_faults`:
# closed-loop load (16 clients, 60 s, single-instance requests with maps), SIGKILL of one ServeReplica
# worker after 20 s, time until Serve reports 2 healthy replicas again, statuses seen, spent vs answered.
# Writes docs/results/scaling/kill.json.
set -euo pipefail
DATA_ROOT=${1:?usage: docs/results/scaling/kill.sh <data root>}
OUT=docs/results/scaling
BUDGET=${BUDGET:-2000}
READY_DEADLINE_S=${READY_DEADLINE_S:-240}
export DD_DATA_ROOT=$DATA_ROOT
export DD_API_KEYS=scaling-kill-key
export DD_CLIENT_API_KEY=$DD_API_KEYS
WORK=$(mktemp -d)
source "$(dirname "$0")/common.sh"
trap cleanup EXIT
start_redis
start_cluster 2 "$WORK/serve.log" --query-budget "$BUDGET"
python -m deepdefense.measure.cluster_faults --url "$URL" --redis "$REDIS_URL" \
  --budget "$BUDGET" --clients 16 --duration 60 --kill-after 20 --restart-deadline 120 --out "$OUT/kill.json"
