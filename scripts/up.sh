#!/usr/bin/env bash
# Runs a local cellbank cluster (a router, two active cells and their standby
# cells, three replicas each, on loopback) in
# the foreground. Installs prerequisites and builds first. Ctrl-C stops it;
# running it again resumes the same data. Extra arguments go to `cellbank up`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cellbank-target}"
# With fault points: `cellbank chaos` drills run against local clusters.
cargo build --bin cellbank --features fault-points
exec "$CARGO_TARGET_DIR/debug/cellbank" up "$@"
