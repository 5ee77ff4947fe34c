#!/usr/bin/env bash
# Where a defended request's time goes (docs/performance.md, "Third round"): the default server under 32 polite
# clients (`deepdefense load --serve`, as docs/results/goodput/run.sh), sampled by py-spy (pip install py-spy) for
# 25 s from the 20th second, then summarised by thread and by the innermost frame of ours.
# From the repository root:  docs/results/profile/run.sh <data root> [results folder]
# (docs/results/profile/before/ holds the profile before the third round, docs/results/profile/after/ after it)
# With GIL=1 py-spy keeps only the samples of threads that hold the GIL (docs/results/profile/gil/).
set -euo pipefail
DATA_ROOT=${1:?usage: docs/results/profile/run.sh <data root> [results folder]}
OUT=${2:-docs/results/profile/after}
mkdir -p "$OUT"
for name in $(env | grep -o '^DD_[A-Z_]*' || true); do unset "$name"; done  # the defaults, not this shell's
export DD_DATA_ROOT=$DATA_ROOT
deepdefense load --serve --clients 32 --duration 50 --timeout 120 --out "$OUT/load.json" >/dev/null &
LOAD=$!
sleep 20
SERVER=$(pgrep -f "deepdefense.* serve --host 127.0.0.1" | head -1)
py-spy record --pid "$SERVER" --duration 25 --rate 50 --threads ${GIL:+--gil} --format raw -o "$OUT/server.stacks" \
  --nonblocking
wait $LOAD
python docs/results/profile/summarise.py "$OUT/server.stacks" "$OUT/load.json" | tee "$OUT/summary.txt"
