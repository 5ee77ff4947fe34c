# Sourced with the script's arguments (<data root> [tag]) by the goodput scripts (perf3/run.sh, perf4/run.sh) once they
# have set OUT: the server's defaults rather than the calling shell's DD_* variables, and
#   load <clients> <file> [VAR=value ...]
# which runs `deepdefense load --serve` (the server configured by VAR=value) for DURATION seconds (40 unless set) into
# OUT/<file><tag>.json.
set -euo pipefail
DATA_ROOT=${1:?usage: $0 <data root> [tag]}
TAG=${2:-}
DURATION=${DURATION:-40}
for name in $(env | grep -o '^DD_[A-Z_]*' || true); do unset "$name"; done
export DD_DATA_ROOT=$DATA_ROOT
load() {
  local clients=$1 file=$2; shift 2
  env "$@" deepdefense load --serve --clients "$clients" --duration "$DURATION" --timeout 120 --progress-every 0 \
    --out "$OUT/$file$TAG.json" >/dev/null
}
