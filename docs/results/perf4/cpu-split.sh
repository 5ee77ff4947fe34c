#!/usr/bin/env bash
# Where the cores go while the default server answers 32 polite clients (docs/performance.md, "Fourth round"):
# `deepdefense serve` with the given DD_* settings, a 40 s `deepdefense load`, and from its 10th to its 30th second
# the CPU of every thread of the server, of its worker processes, of the load client and of the whole machine
# (/proc), then the server's micro-batch sizes and model time (/metrics). Writes <out>.json.
# From the repository root:  docs/results/perf4/cpu-split.sh <data root> <out> [VAR=value ...]
set -euo pipefail
DATA_ROOT=${1:?usage: cpu-split.sh <data root> <out> [VAR=value ...]}
OUT=${2:?usage: cpu-split.sh <data root> <out> [VAR=value ...]}
shift 2
for name in $(env | grep -o '^DD_[A-Z_]*' || true); do unset "$name"; done  # the defaults, not this shell's
export DD_DATA_ROOT=$DATA_ROOT
PORT=$(python -c "from deepdefense.measure.launcher import free_port; print(free_port())")
env "$@" deepdefense serve --port "$PORT" --log-level warning >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break; sleep 1; done
deepdefense load --url "http://127.0.0.1:$PORT" --clients 32 --duration 40 --timeout 120 --progress-every 0 \
  --out "$OUT.load.json" >/dev/null 2>&1 &
LOAD=$!
sleep 10
python - "$SERVER" "$LOAD" "$OUT.cpu.json" <<'PY'
import json, os, sys, time
from deepdefense.clients.load import process_descendants
server, load, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
hz = os.sysconf("SC_CLK_TCK")
def ticks(pid, tid=None):
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    f = open(path).read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])
def snapshot():
    threads = {t: ticks(server, t) for t in os.listdir(f"/proc/{server}/task")}
    children = {c: ticks(c) for c in process_descendants(server)}
    machine = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return threads, children, ticks(load), machine, time.time()
a = snapshot(); time.sleep(20); b = snapshot()
dt = b[4] - a[4]
cores = lambda d: round(d / hz / dt, 3)
busy = [y - x for x, y in zip(a[3], b[3])]
record = {
    "server_threads_cores": sorted((cores(v - a[0].get(t, 0)) for t, v in b[0].items()), reverse=True)[:6],
    "worker_processes_cores": sorted((cores(v - a[1].get(c, 0)) for c, v in b[1].items()), reverse=True),
    "load_client_cores": cores(b[2] - a[2]),
    "machine_busy_cores": round((sum(busy) - busy[3] - busy[4]) / sum(busy) * os.cpu_count(), 3),
    "seconds": round(dt, 1),
}
json.dump(record, open(out, "w"), indent=2)
print(json.dumps(record))
PY
wait $LOAD
curl -s "http://127.0.0.1:$PORT/metrics" | python -c "
import json, sys
m = {}
for line in sys.stdin:
    if line.startswith(('dd_batch_instances_bucket', 'dd_batch_instances_count', 'dd_batch_instances_sum', 'dd_inference_seconds_sum')):
        name, value = line.rsplit(' ', 1); m[name] = float(value)
json.dump(m, open('$OUT.metrics.json', 'w'), indent=2)"
python -c "import json; x = json.load(open('$OUT.load.json')); print('answers/s', x['throughput_rps'], 'p50', x['latency_ms']['p50'])"
