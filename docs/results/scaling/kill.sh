#!/usr/bin/env bash
# The replica-kill fault (docs/scaling.md, "Measured"). From the repository root:
#   docs/results/scaling/kill.sh <data root>
# Starts a throw-away redis-server (nothing saved) and `deepdefense serve --replicas 2 --replica-cpus 1
# --state redis://... --query-budget B`, waits for /readyz (deadline), then `python -m measure.cluster_faults`:
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
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
SERVE_PID=
cleanup() {
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -TERM "$SERVE_PID"; for _ in $(seq 60); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$SERVE_PID" 2>/dev/null || true
  fi
  kill -KILL "$REDIS_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

PORT=$(free_port)
deepdefense serve --replicas 2 --replica-cpus 1 --state "redis://127.0.0.1:$REDIS_PORT/0" \
  --query-budget "$BUDGET" --host 127.0.0.1 --port "$PORT" --log-level warning >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
t0=$(date +%s)
until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
  if ! kill -0 "$SERVE_PID" 2>/dev/null || [ $(( $(date +%s) - t0 )) -gt "$READY_DEADLINE_S" ]; then
    echo "not ready within ${READY_DEADLINE_S} s" >&2; tail -50 "$WORK/serve.log" >&2; exit 1
  fi
  sleep 1
done
echo "ready after $(( $(date +%s) - t0 )) s" >&2
python -m measure.cluster_faults --url "http://127.0.0.1:$PORT" --redis "redis://127.0.0.1:$REDIS_PORT/0" \
  --budget "$BUDGET" --clients 16 --duration 60 --kill-after 20 --restart-deadline 120 --out "$OUT/kill.json"
