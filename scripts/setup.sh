#!/usr/bin/env bash
# Installs what building and testing cellbank needs on a fresh Debian
# machine that has a Rust toolchain: clang's libraries for the RocksDB
# bindings, and Prometheus (its server and promtool: the alert rules'
# tests and the end-to-end scrape test). protoc is not needed (a vendored
# one is used). Safe to run again: it installs only what is missing.
set -euo pipefail

need_apt=()
for pkg in libclang-dev clang prometheus; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        need_apt+=("$pkg")
    fi
done
if ((${#need_apt[@]})); then
    "$(dirname "$0")/apt-install.sh" "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
        rustup component add "$component"
    fi
done
