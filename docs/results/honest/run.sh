#!/bin/bash
# Honest users through the default server over HTTP: all 10,000 MNIST test digits sent by one API key
# (16 per request), with the server's defaults (DeepDefense, gate, monitor and its trust, ownership watermark)
# and the same without the watermark. Usage: docs/results/honest/run.sh [data root]
set -e
cd "$(dirname "$0")/../../.."
DATA=${1:-../shared/data}
mkdir -p /tmp/honest && python -c "import secrets; print(secrets.token_urlsafe(24))" > /tmp/honest/keys.txt
for arm in "watermarked:auto" "plain:off"; do
  name=${arm%%:*}; watermark=${arm#*:}
  out=docs/results/honest-default-server.json
  [ "$name" = watermarked ] && out=docs/results/honest-default-server-watermarked.json
  rm -f /tmp/honest/state-$name.sqlite*
  DD_API_KEYS_FILE=/tmp/honest/keys.txt DD_BUDGET_DB=/tmp/honest/state-$name.sqlite DD_WATERMARK=$watermark \
    python -m deepdefense.cli serve --port 18777 --data-root "$DATA" > /tmp/honest/serve-$name.log 2>&1 &
  pid=$!
  for i in $(seq 1 300); do curl -sf localhost:18777/readyz >/dev/null && break; sleep 1; done
  python -m deepdefense.cli client --url http://127.0.0.1:18777 --api-key-file /tmp/honest/keys.txt \
    --data-root "$DATA" --n 10000 --batch-size 16 --quiet --out $out > /tmp/honest/client-$name.log 2>&1
  kill $pid; wait $pid 2>/dev/null || true
  python -c "import json; r = json.load(open('$out')); print('$name', r['accuracy'], r['agreement_undefended'])"
done
