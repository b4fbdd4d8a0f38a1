#!/usr/bin/env bash
# Measures the cost of mutual TLS: the same benchmark through the router
# against the default local cluster with TLS (as `cellbank up` runs it) and
# against the same cluster started with --insecure (plaintext everywhere,
# between the processes too), one after the other, batched and unary.
# Prints one JSON report per run.
#   ./scripts/bench-tls-cost.sh [seconds] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cellbank-target}"
cargo build --quiet --features fault-points
bin="$CARGO_TARGET_DIR/debug/cellbank"
seconds="${1:-20}"
rounds="${2:-1}"
work="$(mktemp -d)"
up_pid=""
trap '[ -n "$up_pid" ] && kill "$up_pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"' EXIT
for round in $(seq 1 "$rounds"); do
  for mode in tls insecure; do
    for api in batch unary; do
      rm -rf "$work/data"
      if [ "$mode" = insecure ]; then
        export CELLBANK_INSECURE=true
        up_args=(--insecure)
      else
        unset CELLBANK_INSECURE
        export CELLBANK_CERTS="$work/data/certs"
        up_args=()
      fi
      "$bin" up "${up_args[@]}" --data-dir "$work/data" >"$work/up.log" 2>&1 &
      up_pid=$!
      # Wait until both pairs are SYNC.
      for _ in $(seq 1 100); do
        if "$bin" status -o json 2>/dev/null | python3 -c '
import json, sys
pairs = json.load(sys.stdin)["pairs"]
sys.exit(0 if len(pairs) == 2 and all(p["mode"] == "SYNC" for p in pairs) else 1)'; then break; fi
        sleep 0.3
      done
      if [ "$api" = batch ]; then
        args=(--api batch --batch-size 1000 --concurrency 16)
      else
        args=(--api unary --concurrency 256)
      fi
      echo "== round $round, $mode, $api"
      "$bin" bench "${args[@]}" --duration "$seconds" --warmup 3 --json
      kill -INT "$up_pid"
      wait "$up_pid" || true
      up_pid=""
    done
  done
done
