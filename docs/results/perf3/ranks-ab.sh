#!/usr/bin/env bash
# Lever 5 (constraint (4)'s ranks from one sort) alone, through the server (docs/performance.md, "Third round"):
# the default server under 32 polite clients for 30 s, the commit before the lever (60e0bcf, checked out at
# <before tree>) and this one, alternately, three runs each, logging at "warning" on both sides.
# From the repository root:  docs/results/perf3/ranks-ab.sh <data root> <before tree>
#   (git worktree add --detach <before tree> 60e0bcf)
set -euo pipefail
DATA_ROOT=${1:?usage: docs/results/perf3/ranks-ab.sh <data root> <before tree>}
BEFORE=${2:?usage: docs/results/perf3/ranks-ab.sh <data root> <before tree>}
OUT=docs/results/perf3/ranks-ab
mkdir -p "$OUT"
for name in $(env | grep -o '^DD_[A-Z_]*' || true); do unset "$name"; done  # the defaults, not this shell's
export DD_DATA_ROOT=$DATA_ROOT DD_LOG_LEVEL=warning
run() {  # run <name> <tree whose deepdefense is imported>
  PYTHONPATH=$2 deepdefense load --serve --clients 32 --duration 30 --timeout 120 --progress-every 0 \
    --out "$OUT/$1.json" >/dev/null 2>&1
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['throughput_rps'], 'answers/s, p50', r['latency_ms'].get('p50'), 'ms')" "$OUT/$1.json" "$1"
}
for i in 1 2 3; do
  run "before-$i" "$BEFORE"
  run "after-$i" "$PWD"
done
