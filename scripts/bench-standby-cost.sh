#!/usr/bin/env bash
# Measures the cost of synchronous standby replication: the same benchmark
# through the router against the default local cluster (two pairs, each an
# active cell with a sync standby) and against the same cluster without
# standbys (deploy/local/no-standby.toml). Prints one JSON report per run.
#   ./scripts/bench-standby-cost.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cellbank-target}"
cargo build --quiet --features fault-points
bin="$CARGO_TARGET_DIR/debug/cellbank"
seconds="${1:-20}"
work="$(mktemp -d)"
trap 'kill "$up_pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
for topology in deploy/local/cluster.toml deploy/local/no-standby.toml; do
  for api in batch unary; do
    rm -rf "$work/data"
    # The cluster's certificates, which `up` makes on its first start.
    export CELLBANK_CERTS="$work/data/certs"
    "$bin" up --topology "$topology" --data-dir "$work/data" >"$work/up.log" 2>&1 &
    up_pid=$!
    # Wait until every pair is in its steady mode.
    for _ in $(seq 1 100); do
      if "$bin" status -o json 2>/dev/null | python3 -c '
import json, sys
pairs = json.load(sys.stdin)["pairs"]
sys.exit(0 if pairs and all(p["mode"] in ("SYNC", "NO_STANDBY") for p in pairs) else 1)'; then break; fi
      sleep 0.3
    done
    if [ "$api" = batch ]; then
      args=(--api batch --batch-size 1000 --concurrency 16)
    else
      args=(--api unary --concurrency 256)
    fi
    echo "== $topology, $api"
    "$bin" bench "${args[@]}" --duration "$seconds" --warmup 3 --json
    kill -INT "$up_pid"
    wait "$up_pid" || true
  done
done
