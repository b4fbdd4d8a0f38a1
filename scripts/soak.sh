#!/usr/bin/env bash
# Runs one end-to-end test many times in a row and counts the outcomes; the
# log of every failed run is kept. Not part of CI (a run takes a minute).
#
#   ./scripts/soak.sh 200                      # the whole-cell failover money test
#   ./scripts/soak.sh 50 safety an_old_active  # any test file and name filter
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-200}"
test_file="${2:-money}"
filter="${3:-money_crosses_cells_exactly_once_through_a_whole_cell_failover}"
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cellbank-target}"
cargo test --features fault-points --test "$test_file" --no-run
logs="$(mktemp -d -t cellbank-soak-XXXXXX)"
passed=0
failed=0
started=$(date +%s)
for run in $(seq 1 "$runs"); do
    log="$logs/run-$run.log"
    if cargo test --features fault-points --test "$test_file" "$filter" -- --exact --test-threads=1 >"$log" 2>&1 \
        && grep -q "test result: ok. 1 passed" "$log"; then
        passed=$((passed + 1))
        rm -f "$log"
    else
        failed=$((failed + 1))
        echo "run $run failed: $log" >&2
    fi
    printf 'soak: %d/%d runs, %d passed, %d failed, %d s\n' "$run" "$runs" "$passed" "$failed" \
        "$(($(date +%s) - started))"
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
