#!/usr/bin/env bash
# Goodput of the default server against the undefended one, measured the same way in the same run
# (docs/performance.md, "Third round"): `deepdefense load --serve` with 32 polite clients on the default server
# (lenet-mnist, DeepDefense, Grad-CAM, the gate, default admission control, default model threads), then on
# the same server with DD_DEFENSE=none, then the default server with one client.
# From the repository root:  docs/results/perf3/run.sh <data root> [tag]
OUT=docs/results/perf3
source "$(dirname "$0")/../load.sh"  # <data root> [tag]; the server's defaults; load <clients> <file> [VAR=value ...]
load 32 defended-32
load 32 undefended-32 DD_DEFENSE=none
load 1 defended-1
python - "$OUT" "$TAG" <<'PY'
import json, sys
out, tag = sys.argv[1], sys.argv[2]
r = {n: json.load(open(f"{out}/{n}{tag}.json")) for n in ("defended-32", "undefended-32", "defended-1")}
for n, x in r.items():
    print(f"{n}: {x['throughput_rps']} answers/s, statuses {x['statuses']}, p50 {x['latency_ms'].get('p50')} ms")
print(f"goodput ratio at 32 clients: {r['defended-32']['throughput_rps'] / r['undefended-32']['throughput_rps']:.3f}")
PY
