#!/usr/bin/env bash
# Measures the cost of mutual TLS: the same benchmark through the router
# against the default local cluster with TLS (as `cellbank up` runs it) and
# against the same cluster started with --insecure (plaintext everywhere,
# between the processes too), one after the other, batched and unary.
# Prints one JSON report per run.
#   ./scripts/bench-tls-cost.sh [seconds] [rounds]
source "$(dirname "$0")/bench-lib.sh"
seconds="${1:-20}"
rounds="${2:-1}"
for round in $(seq 1 "$rounds"); do
  for mode in tls insecure; do
    for api in batch unary; do
      if [ "$mode" = insecure ]; then
        export CELLBANK_INSECURE=true
        start_cluster --insecure
      else
        unset CELLBANK_INSECURE
        start_cluster
      fi
      bench_args_for "$api"
      echo "== round $round, $mode, $api"
      "$bin" bench "${bench_args[@]}" --duration "$seconds" --warmup 3 --json
      stop_cluster
    done
  done
done
