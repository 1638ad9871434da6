#!/usr/bin/env bash
# Install the Debian packages that the end-to-end storage tests (tests/e2e/) need:
# a real XRootD with XrdHttp and the SciTokens authorization plugin, the grid clients
# (xrdcp, davix, gfal2), curl/openssl for the test CA, and a C compiler for the loopback
# bind shim that keeps xrootd off every non-loopback address.
# Idempotent and quiet (see apt-ensure.sh); runs as root without stdin.
set -euo pipefail
exec "$(dirname "$0")/apt-ensure.sh" install-system-packages \
    xrootd-server xrootd-client xrootd-scitokens-plugins davix gfal2 gfal2-plugin-http \
    gfal2-plugin-file python3-gfal2-util gfal2-util-scripts curl openssl ca-certificates \
    gcc libc6-dev \
    -- xrootd xrdcp davix-put gfal-copy curl openssl gcc
