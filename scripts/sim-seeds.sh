#!/usr/bin/env bash
# Runs the simulator over seeds 1..N in chunks (a summary line per chunk, so
# a long run shows progress in a log), then the total wall time and rate.
# Not part of CI, which runs 300 seeds (sim/tests/seeds.rs).
#
#   ./scripts/sim-seeds.sh 100000            # chunks of 10,000
#   ./scripts/sim-seeds.sh 20000 5000 --mutate early-release
set -euo pipefail
cd "$(dirname "$0")/.."
total="${1:?usage: sim-seeds.sh SEEDS [CHUNK] [cellbank sim options...]}"
chunk="${2:-10000}"
shift $(( $# >= 2 ? 2 : 1 ))
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cellbank-target}"
cargo build --bin cellbank --features fault-points
bin="$CARGO_TARGET_DIR/debug/cellbank"
started=$(date +%s)
first=1
failed=0
while [ "$first" -le "$total" ]; do
    count=$(( total - first + 1 < chunk ? total - first + 1 : chunk ))
    if ! "$bin" sim --first "$first" --seeds "$count" --stop-after 0 "$@" 2>&1 | grep -v '^ .* ms  '; then
        failed=1
    fi
    first=$(( first + count ))
done
elapsed=$(( $(date +%s) - started ))
echo "seeds 1..=$total in ${elapsed} s ($(( total / (elapsed > 0 ? elapsed : 1) )) seeds/s); failing chunks: $failed"
exit "$failed"
