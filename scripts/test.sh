#!/usr/bin/env bash
# Installs prerequisites, then runs every check CI runs: formatting, clippy
# with warnings as errors, and every test (unit, property, Raft scenario
# scripts, and end-to-end tests with real processes and SIGKILLs).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Kept outside the checkout so RocksDB (about 15 minutes of C++) is built once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cellbank-target}"
cargo fmt --all -- --check
# The protos: buf lint, and no breaking change against the last release.
./scripts/buf.sh
# The alert rules and the Prometheus config: valid, and each alert fires on
# its fixture (deploy/prometheus/tests).
(cd deploy/prometheus && promtool check config prometheus.yml && promtool test rules tests/*.yml)
# Both builds: the production one (no fault points) and the one the tests
# and local clusters run (with them).
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets --features fault-points -- -D warnings
# One test at a time: the end-to-end tests time elections on a two-core machine.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Every test binary runs even when one fails, so a run names every failure.
status=0
cargo test --workspace --features fault-points --no-fail-fast -- --test-threads=1 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "all tests: %d passed, %d failed\n", p, f; if (p == 0) exit 1 }' "$log"
exit "$status"
