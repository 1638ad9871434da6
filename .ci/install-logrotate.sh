#!/usr/bin/env bash
# Install logrotate: tests/test__logs.py rotates jobtoken's shipped logrotate rule for real
# and checks the credmon's and hooks' logs survive it.
# Idempotent and quiet (see apt-ensure.sh); runs as root without stdin.
set -euo pipefail
exec "$(dirname "$0")/apt-ensure.sh" install-logrotate logrotate -- logrotate
