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
cargo clippy --workspace --all-targets -- -D warnings
# One test at a time: the end-to-end tests time elections on a two-core machine.
cargo test --workspace -- --test-threads=1
