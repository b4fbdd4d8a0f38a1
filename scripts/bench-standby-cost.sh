#!/usr/bin/env bash
# Measures the cost of synchronous standby replication: the same benchmark
# through the router against the default local cluster (two pairs, each an
# active cell with a sync standby) and against the same cluster without
# standbys (deploy/local/no-standby.toml). Prints one JSON report per run.
#   ./scripts/bench-standby-cost.sh [seconds]
source "$(dirname "$0")/bench-lib.sh"
seconds="${1:-20}"
for topology in deploy/local/cluster.toml deploy/local/no-standby.toml; do
  for api in batch unary; do
    start_cluster --topology "$topology"
    bench_args_for "$api"
    echo "== $topology, $api"
    "$bin" bench "${bench_args[@]}" --duration "$seconds" --warmup 3 --json
    stop_cluster
  done
done
