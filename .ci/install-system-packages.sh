#!/usr/bin/env bash
# Install the Debian packages that the end-to-end storage tests (tests/e2e/) need:
# a real XRootD with XrdHttp and the SciTokens authorization plugin, the grid clients
# (xrdcp, davix, gfal2), curl/openssl for the test CA, and a C compiler for the loopback
# bind shim that keeps xrootd off every non-loopback address.
#
# Idempotent and quiet: does nothing when everything is already installed, runs
# `apt-get update` only when a package is missing. Runs as root without stdin.
set -euo pipefail

PACKAGES=(
    xrootd-server
    xrootd-client
    xrootd-scitokens-plugins
    davix
    gfal2
    gfal2-plugin-http
    gfal2-plugin-file
    python3-gfal2-util
    gfal2-util-scripts
    curl
    openssl
    ca-certificates
    gcc
    libc6-dev
)

die() {
    echo "install-system-packages: $*" >&2
    exit 1
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "installed" ]]; then
        missing+=("$pkg")
    fi
done

check_binaries() {
    local binary
    for binary in xrootd xrdcp davix-put gfal-copy curl openssl gcc; do
        command -v "$binary" >/dev/null 2>&1 ||
            die "packages are installed but '$binary' is still not on PATH"
    done
}

if [[ ${#missing[@]} -eq 0 ]]; then
    check_binaries
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "need root to install: ${missing[*]}"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: ${missing[*]}"

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT

if ! apt-get update -q >"$log" 2>&1; then
    cat "$log" >&2
    die "apt-get update failed"
fi
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "apt-get install failed for: ${missing[*]}"
fi

check_binaries
echo "install-system-packages: installed ${missing[*]}"
