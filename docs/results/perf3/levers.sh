#!/usr/bin/env bash
# Each lever of the third round taken away alone from the default server, 32 polite clients, one run
# (docs/performance.md, "Third round"): the default; one model thread; im2col convolutions; and 9 steps, the
# lever measured and not taken (a weaker defense); then the undefended server with two and with one model thread. The engine's cached victim side and the fill wait have no switch:
# their effect is measured in-process and in the development runs the section quotes.
# From the repository root:  docs/results/perf3/levers.sh <data root>
set -euo pipefail
DATA_ROOT=${1:?usage: docs/results/perf3/levers.sh <data root>}
OUT=docs/results/perf3/levers
DURATION=${DURATION:-30}
mkdir -p "$OUT"
for name in $(env | grep -o '^DD_[A-Z_]*' || true); do unset "$name"; done  # the defaults, not this shell's
export DD_DATA_ROOT=$DATA_ROOT
run() {  # run <name> [VAR=value ...]
  local name=$1; shift
  env "$@" deepdefense load --serve --clients 32 --duration "$DURATION" --timeout 120 --progress-every 0 \
    --out "$OUT/$name.json" >/dev/null
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['throughput_rps'], 'answers/s', r['statuses'], 'p50', r['latency_ms'].get('p50'), 'ms')" "$OUT/$name.json" "$name"
}
run default
run one-model-thread DD_MODEL_WORKERS=1
run im2col DD_ENGINE__CONV_IMPL=unfold
run nine-steps DD_ENGINE__STEPS=9
run undefended DD_DEFENSE=none
run undefended-one-model-thread DD_DEFENSE=none DD_MODEL_WORKERS=1
