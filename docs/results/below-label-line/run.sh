#!/usr/bin/env bash
# The Adaptive Misinformation baseline (--defense none --gate misinform) against the model-stealing
# attacker at B = 10,000 with Fashion-MNIST queries, and a benign user on the full MNIST test set.
# Usage (from the repository root): bash docs/results/below-label-line/run.sh ../shared/data
set -euo pipefail
DATA=${1:?data root}
OUT=docs/results/below-label-line
PORT=${PORT:-8101}
TMP=$(mktemp -d)
DD_DEFENSE=none DD_GATE=misinform DD_MAX_INSTANCES=128 DD_BUDGET_DB="$TMP/budget.sqlite" DD_LOG_LEVEL=warning \
  deepdefense serve --port "$PORT" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true; rm -rf "$TMP"' EXIT
for _ in $(seq 600); do  # at most 60 s for /readyz
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null
URL="http://127.0.0.1:$PORT"
for LOSS in labels probabilities; do  # one transfer set (stored under runs/), two attackers
  deepdefense attack --url "$URL" --budget 10000 --loss "$LOSS" --data-root "$DATA" --store "$TMP/store" \
    --quiet --out "$OUT/am-fashionmnist-$LOSS-10000.json" > /dev/null
done
deepdefense client --url "$URL" --data-root "$DATA" --n 10000 --batch-size 100 --no-explain --quiet \
  --out "$OUT/am-benign-mnist-test.json" > /dev/null
curl -s "$URL/metrics" | grep '^dd_misinformed_answers_total\|^dd_answers_total' > "$OUT/am-metrics.txt"
