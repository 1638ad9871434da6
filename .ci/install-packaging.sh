#!/usr/bin/env bash
# Install the tools that build and check jobtoken's packages (tests/test_packages.py):
# debhelper/dh-python for the Debian package, rpm/rpmlint for the EL9 spec, and the
# runtime dependencies the built .deb pulls in (so installing it needs no download).
#
# Idempotent and quiet: does nothing when everything is installed, runs `apt-get update`
# only when a package is missing. Runs as root without stdin.
set -euo pipefail

PACKAGES=(
    dpkg-dev
    debhelper
    dh-python
    python3-all
    python3-setuptools
    rpm
    rpmlint
    python3-httpx
    python3-jwt
    python3-cryptography
    python3-psutil
)

die() {
    echo "install-packaging: $*" >&2
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
    for binary in dpkg-buildpackage dh rpmbuild rpmlint; do
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
apt=(apt-get -o DPkg::Lock::Timeout=900 -q)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

if ! "${apt[@]}" update >"$log" 2>&1; then
    cat "$log" >&2
    die "apt-get update failed"
fi
if ! "${apt[@]}" install -y --no-install-recommends "${missing[@]}" </dev/null >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "apt-get install failed for: ${missing[*]}"
fi

check_binaries
echo "install-packaging: installed ${missing[*]}"
