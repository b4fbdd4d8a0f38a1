#!/usr/bin/env bash
# Runs each named drill with seeds 1..N and counts the verdicts; each run's
# report stays under chaos-reports/. Not part of CI (a drill takes about a
# minute).
#
#   ./scripts/drill-seeds.sh 20 deploy/drills/cell-loss.toml deploy/drills/cell-lost-for-good.toml
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:?usage: drill-seeds.sh SEEDS DRILL.toml...}"
shift
[ "$#" -gt 0 ] || { echo "usage: drill-seeds.sh SEEDS DRILL.toml..." >&2; exit 2; }
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cellbank-target}"
cargo build --bin cellbank --features fault-points
bin="$CARGO_TARGET_DIR/debug/cellbank"
logs="$(mktemp -d -t cellbank-drills-XXXXXX)"
failed=0
passed=0
for drill in "$@"; do
    for seed in $(seq 1 "$seeds"); do
        log="$logs/$(basename "$drill" .toml)-$seed.log"
        if "$bin" chaos run "$drill" --seed "$seed" >"$log" 2>&1; then
            passed=$((passed + 1))
            echo "ok      $drill seed $seed"
        else
            failed=$((failed + 1))
            echo "FAILED  $drill seed $seed (log: $log)"
        fi
    done
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
