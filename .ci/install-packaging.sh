#!/usr/bin/env bash
# Install the tools that build and check jobtoken's packages (tests/test_packages.py):
# debhelper/dh-python for the Debian package, rpm/rpmlint for the EL9 spec, and the
# runtime dependencies the built .deb pulls in (so installing it needs no download).
# Idempotent and quiet (see apt-ensure.sh); runs as root without stdin.
set -euo pipefail
exec "$(dirname "$0")/apt-ensure.sh" install-packaging \
    build-essential dpkg-dev debhelper dh-python python3-all rpm rpmlint \
    python3-httpx python3-jwt python3-cryptography python3-psutil \
    -- dpkg-buildpackage dh rpmbuild rpmlint
