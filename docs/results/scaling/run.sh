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

for N in 1 2; do
  PORT=$(free_port)
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  deepdefense serve --replicas "$N" --replica-cpus 1 --state "redis://127.0.0.1:$REDIS_PORT/0" \
    --query-budget 10000000 --host 127.0.0.1 --port "$PORT" --log-level warning >"$WORK/serve-$N.log" 2>&1 &
  SERVE_PID=$!
  t0=$(date +%s)
  until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$SERVE_PID" 2>/dev/null || [ $(( $(date +%s) - t0 )) -gt "$READY_DEADLINE_S" ]; then
      echo "replicas=$N: not ready within ${READY_DEADLINE_S} s" >&2; tail -50 "$WORK/serve-$N.log" >&2; exit 1
    fi
    sleep 1
  done
  echo "replicas=$N ready after $(( $(date +%s) - t0 )) s" >&2
  deepdefense load --url "http://127.0.0.1:$PORT" --clients "$CLIENTS" --duration "$DURATION" --instances 1 \
    --timeout 120 --out "$OUT/load-replicas-$N$TAG.json" >/dev/null
  echo "replicas=$N: spent in Redis $(redis-cli -p "$REDIS_PORT" --scan --pattern 'dd:budget:*' | xargs -r redis-cli -p "$REDIS_PORT" get)" >&2
  kill -TERM "$SERVE_PID"; for _ in $(seq 60); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL "$SERVE_PID" 2>/dev/null || true
  SERVE_PID=
done
