#!/usr/bin/env bash
# Installs the named Debian packages (apt-get, through sudo unless root).
# The scripts that need something call it with only what they found
# missing: scripts/setup.sh, scripts/buf.sh, scripts/python-client-test.sh.
set -euo pipefail
(($#)) || exit 0
echo "installing $*" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
