#!/usr/bin/env bash
# Lints the protos and checks them for breaking changes against the
# baseline image of the last release (proto/baseline/), with a pinned buf.
#
#   scripts/buf.sh             buf lint, then buf breaking against the baseline
#   scripts/buf.sh baseline    rewrite the baseline from the protos as they are
#                              now (at a release; see proto/README.md)
#   scripts/buf.sh run ARGS    any buf command, run in proto/
#
# buf comes from the npm registry's @bufbuild/buf-linux-x64 package (the
# tarball is checked against a pinned SHA-256) and is kept outside the
# checkout, so a second run downloads nothing. Safe to run again; installs
# curl first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0
BUF_TARBALL_SHA256=98b19d4b2b46130e083157490c54dfdcb8ea771e53204d3c6a06a2b12edd0503
BUF_TARBALL_URL="https://registry.npmjs.org/@bufbuild/buf-linux-x64/-/buf-linux-x64-${BUF_VERSION}.tgz"
BASELINE=baseline/cellbank-v1.binpb # relative to proto/

tools="${XDG_CACHE_HOME:-$HOME/.cache}/cellbank-tools"
dir="$tools/buf-$BUF_VERSION"
buf="$dir/bin/buf"

install_buf() {
    case "$(uname -s)-$(uname -m)" in
        Linux-x86_64) ;;
        *)
            echo "buf.sh: only linux x86_64 is pinned here ($(uname -s)-$(uname -m)); install buf $BUF_VERSION yourself" >&2
            exit 1
            ;;
    esac
    if ! command -v curl >/dev/null; then
        ./scripts/apt-install.sh curl ca-certificates
    fi
    echo "buf.sh: installing buf $BUF_VERSION into $dir" >&2
    mkdir -p "$tools"
    local work
    work="$(mktemp -d "$tools/.buf-install.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    curl -fsSL --retry 3 -o "$work/buf.tgz" "$BUF_TARBALL_URL"
    echo "$BUF_TARBALL_SHA256  $work/buf.tgz" | sha256sum --check --quiet - || {
        echo "buf.sh: the buf tarball's SHA-256 is not the pinned one; not installing it" >&2
        exit 1
    }
    tar -xzf "$work/buf.tgz" -C "$work" package/bin/buf
    mkdir -p "$work/install/bin"
    mv "$work/package/bin/buf" "$work/install/bin/buf"
    chmod 0755 "$work/install/bin/buf"
    "$work/install/bin/buf" --version >/dev/null
    # Into place in one rename: an interrupted install leaves no half a buf.
    rm -rf "$dir"
    mv "$work/install" "$dir"
    rm -rf "$work"
    trap - EXIT
}

if [ ! -x "$buf" ] || [ "$("$buf" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
    install_buf
fi

cd proto
case "${1:-check}" in
    check)
        "$buf" lint
        echo "buf lint: clean"
        "$buf" breaking --against "$BASELINE"
        echo "buf breaking: no breaking change against proto/$BASELINE"
        ;;
    baseline)
        "$buf" build --exclude-source-info -o "$BASELINE"
        echo "wrote proto/$BASELINE from proto/cellbank; commit it with the release"
        ;;
    run)
        shift
        exec "$buf" "$@"
        ;;
    *)
        echo "usage: scripts/buf.sh [check | baseline | run BUF-ARGS...]" >&2
        exit 2
        ;;
esac
