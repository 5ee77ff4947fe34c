#!/usr/bin/env bash
# Goodput of the default server against the undefended one, measured the same way in the same run, with each kind
# of model worker (docs/performance.md, "Fourth round"): `deepdefense load --serve`, 32 polite clients, on
#   defended-32           the default server (lenet-mnist, DeepDefense, Grad-CAM, the gate): model processes (auto)
#   defended-32-threads   the same with model threads (DD_MODEL_WORKER_KIND=thread: the third round's server)
#   undefended-32         DD_DEFENSE=none: model threads (auto)
#   undefended-32-processes  DD_DEFENSE=none with model processes
#   defended-1            the default server, one client
# From the repository root:  docs/results/perf4/run.sh <data root> [tag]
OUT=docs/results/perf4
source "$(dirname "$0")/../load.sh"  # <data root> [tag]; the server's defaults; load <clients> <file> [VAR=value ...]
load 32 defended-32
load 32 defended-32-threads DD_MODEL_WORKER_KIND=thread
load 32 undefended-32 DD_DEFENSE=none
load 32 undefended-32-processes DD_DEFENSE=none DD_MODEL_WORKER_KIND=process
load 1 defended-1
python - "$OUT" "$TAG" <<'PY'
import json, sys
out, tag = sys.argv[1], sys.argv[2]
names = ("defended-32", "defended-32-threads", "undefended-32", "undefended-32-processes", "defended-1")
r = {n: json.load(open(f"{out}/{n}{tag}.json")) for n in names}
for n, x in r.items():
    print(f"{n}: {x['throughput_rps']} answers/s, statuses {x['statuses']}, p50 {x['latency_ms'].get('p50')} ms")
best = max(r["undefended-32"]["throughput_rps"], r["undefended-32-processes"]["throughput_rps"])
print(f"goodput ratio at 32 clients: {r['defended-32']['throughput_rps'] / r['undefended-32']['throughput_rps']:.3f} "
      f"(against the faster undefended server: {r['defended-32']['throughput_rps'] / best:.3f}; "
      f"model threads: {r['defended-32-threads']['throughput_rps'] / r['undefended-32']['throughput_rps']:.3f})")
PY
