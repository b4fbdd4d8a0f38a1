#!/usr/bin/env bash
# Tests the Python client (clients/python): its unit tests, and an
# end-to-end test that starts a real local cluster from the cellbank binary
# named by CELLBANK_BIN (`cargo test` runs this through
# tests/python_client.rs, which sets it).
#
#   CELLBANK_BIN=~/.cache/cellbank-target/debug/cellbank ./scripts/python-client-test.sh
#
# Installs python3's venv module first if it is missing (Debian), then keeps
# a virtualenv outside the checkout, keyed by a hash of the package's
# pinned requirements, so a second run installs nothing from PyPI. Each run
# generates the code from proto/ and installs the package from this
# checkout for that run.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

if [ -z "${CELLBANK_BIN:-}" ]; then
    echo "python-client-test: set CELLBANK_BIN to a built cellbank binary" >&2
    exit 2
fi
if [ ! -x "$CELLBANK_BIN" ]; then
    echo "python-client-test: CELLBANK_BIN=$CELLBANK_BIN is not an executable" >&2
    exit 2
fi
CELLBANK_BIN="$(cd "$(dirname "$CELLBANK_BIN")" && pwd)/$(basename "$CELLBANK_BIN")"
export CELLBANK_BIN

# Prerequisites, only what is missing (as scripts/setup.sh does).
need_apt=()
if ! command -v python3 >/dev/null; then
    need_apt+=(python3 python3-venv python3-pip)
elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    need_apt+=(python3-venv python3-pip)
fi
if ((${#need_apt[@]})); then
    ./scripts/apt-install.sh "${need_apt[@]}"
fi

pkg=clients/python
key="$(cat "$pkg/pyproject.toml" "$pkg/requirements-test.txt" <(python3 -c 'import sys; print(sys.version)') |
    sha256sum | cut -c1-16)"
tools="${XDG_CACHE_HOME:-$HOME/.cache}/cellbank-tools"
venv="$tools/python-client-venv-$key"
mkdir -p "$tools"
(
    # One run at a time makes the virtualenv; a half-made one is made again.
    flock 9
    if [ ! -f "$venv/.complete" ]; then
        echo "python-client-test: creating $venv" >&2
        rm -rf "$venv"
        # Older virtualenvs of this client (other requirements) go.
        find "$tools" -maxdepth 1 -name 'python-client-venv-*' ! -name "python-client-venv-$key" \
            -exec rm -rf {} +
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$pkg/requirements-test.txt"
        touch "$venv/.complete"
    fi
) 9>"$tools/python-client-venv.lock"

py="$venv/bin/python"
"$py" "$pkg/generate.py"
# The package from this checkout, installed for this run only: the shared
# virtualenv keeps just the dependencies, so runs from two checkouts do not
# meet in it.
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
# Told to stop, the shell first waits for the tests (told too) to stop their cluster.
trap 'exit 143' TERM INT
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --target "$site" "./$pkg"
rm -rf "$pkg/build"

# From the tests' folder, so the package is imported as installed, not from src/.
cd "$pkg/tests"
started=$(date +%s)
PYTHONPATH="$site" "$py" -m unittest -v
echo "python-client-test: passed in $(($(date +%s) - started)) s (package from $repo/$pkg)"
