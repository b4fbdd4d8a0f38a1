# Sourced by the bench-*.sh scripts: builds cellbank, and starts, waits for
# and stops a local cluster. After sourcing: $bin (the binary) and $work (a
# temporary directory, removed at exit with any cluster still running).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/setup.sh >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cellbank-target}"
cargo build --quiet --features fault-points
bin="$CARGO_TARGET_DIR/debug/cellbank"
work="$(mktemp -d)"
chmod 755 "$work"
up_pid=""
# Extra cleanup a script needs (a function name), run before the cluster stops.
bench_cleanup=""
bench_exit() {
    if [ -n "$bench_cleanup" ]; then "$bench_cleanup" || true; fi
    stop_cluster
    rm -rf "$work"
}
trap bench_exit EXIT

# start_cluster [up arguments...]: a fresh cluster in $work/data, waited for
# until every pair is in its steady mode (SYNC, or NO_STANDBY without a
# standby). Clients find its certificates through CELLBANK_CERTS.
start_cluster() {
    rm -rf "$work/data"
    export CELLBANK_CERTS="$work/data/certs"
    "$bin" up --data-dir "$work/data" "$@" >"$work/up.log" 2>&1 &
    up_pid=$!
    for _ in $(seq 1 200); do
        if "$bin" status -o json 2>/dev/null | python3 -c '
import json, sys
pairs = json.load(sys.stdin)["pairs"]
sys.exit(0 if pairs and all(p["mode"] in ("SYNC", "NO_STANDBY") for p in pairs) else 1)' 2>/dev/null; then
            return 0
        fi
        sleep 0.3
    done
    echo "the cluster did not settle; its log: $work/up.log" >&2
    return 1
}

stop_cluster() {
    if [ -n "$up_pid" ]; then
        kill -INT "$up_pid" 2>/dev/null || true
        wait "$up_pid" 2>/dev/null || true
        up_pid=""
    fi
}

# The benchmark's arguments for `batch` (1,000 per call, 16 in flight),
# `unary` (256 in flight) or `coalesced` (256 in flight, one transfer each,
# through the client's opt-in coalescer), in the array bench_args.
bench_args_for() {
    case "$1" in
        batch) bench_args=(--api batch --batch-size 1000 --concurrency 16) ;;
        coalesced) bench_args=(--api coalesced --concurrency 256) ;;
        *) bench_args=(--api unary --concurrency 256) ;;
    esac
}
