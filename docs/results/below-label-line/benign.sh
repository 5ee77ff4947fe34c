#!/usr/bin/env bash
# Honest users through the gated servers, over HTTP with `deepdefense client`: the Adaptive Misinformation
# baseline (--defense none, gate on by default) on the full MNIST test set, and the default server
# (DeepDefense + gate) on the first N_DD test digits (DeepDefense costs ~0.2 s of CPU per query).
# Usage (from the repository root): bash docs/results/below-label-line/benign.sh ../shared/data [N_DD]
set -euo pipefail
DATA=${1:?data root}
N_DD=${2:-1000}
OUT=docs/results/below-label-line
TMP=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$TMP"' EXIT

serve() {  # serve <port> <defense>: the default settings but the defense; waits for /readyz (at most 120 s)
  DD_DEFENSE=$2 DD_MAX_INSTANCES=128 DD_BUDGET_DB="$TMP/$2.sqlite" DD_LOG_LEVEL=warning \
    deepdefense serve --port "$1" &
  PIDS+=($!)
  for _ in $(seq 1200); do
    curl -sf "http://127.0.0.1:$1/readyz" >/dev/null && return 0
    sleep 0.1
  done
  echo "server $2 on port $1 did not become ready" >&2
  return 1
}

serve 8111 none
deepdefense client --url http://127.0.0.1:8111 --data-root "$DATA" --n 10000 --batch-size 100 --no-explain \
  --quiet --out "$OUT/benign-am.json" > /dev/null
curl -s http://127.0.0.1:8111/metrics | grep '^dd_misinformed_answers_total\|^dd_answers_total' > "$OUT/benign-am-metrics.txt"

serve 8112 deepdefense
deepdefense client --url http://127.0.0.1:8112 --data-root "$DATA" --n "$N_DD" --batch-size 16 --no-explain \
  --quiet --out "$OUT/benign-deepdefense-gate.json" > /dev/null
curl -s http://127.0.0.1:8112/metrics | grep '^dd_misinformed_answers_total\|^dd_answers_total' \
  > "$OUT/benign-deepdefense-gate-metrics.txt"
