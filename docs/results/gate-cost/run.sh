#!/bin/bash
# p50 of one client's defended queries: the default server with keys (gate + monitor) vs the same without gate and monitor.
cd "$(dirname "$0")/../../.."
mkdir -p /tmp/gc && python -c "import secrets; print(secrets.token_urlsafe(24))" > /tmp/gc/keys.txt
for arm in "gated:" "plain:--gate none --monitor off"; do
  name=${arm%%:*}; flags=${arm#*:}
  rm -f /tmp/gc/state-$name.sqlite*
  DD_API_KEYS_FILE=/tmp/gc/keys.txt DD_BUDGET_DB=/tmp/gc/state-$name.sqlite python -m deepdefense.cli serve --port 18790 $flags > /tmp/gc/serve-$name.log 2>&1 &
  pid=$!
  for i in $(seq 1 120); do curl -sf localhost:18790/readyz >/dev/null && break; sleep 1; done
  python -m deepdefense.cli client --url http://127.0.0.1:18790 --api-key-file /tmp/gc/keys.txt --data-root ../shared/data --n 300 --batch-size 1 --quiet --out docs/results/gate-cost/$name.json > /tmp/gc/client-$name.log 2>&1
  kill $pid; wait $pid 2>/dev/null
done
python - <<'PY'
import json
g, p = (json.load(open(f"docs/results/gate-cost/{n}.json")) for n in ("gated", "plain"))
print(json.dumps({"gated": g.get("latency_ms"), "plain": p.get("latency_ms")}, indent=1))
PY
