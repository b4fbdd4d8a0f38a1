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
# A package's service is not started (prometheus ships one): cellbank's
# scripts and tests start what they use themselves, on their own ports.
policy=/usr/sbin/policy-rc.d
created_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created_policy=1
fi
status=0
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null || status=$?
if [ -n "$created_policy" ]; then $SUDO rm -f "$policy"; fi
exit "$status"
