#!/usr/bin/env bash
# Make sure Debian packages are installed and commands exist:
#   apt-ensure.sh NAME PACKAGE... -- COMMAND...
# NAME prefixes messages. Idempotent and quiet: does nothing when every package is
# installed, runs `apt-get update` only when one is missing, waits for another apt's lock
# (DPkg::Lock::Timeout), needs no stdin. The .ci/install-*.sh scripts call it.
set -euo pipefail

name=$1
shift
packages=()
while [[ $# -gt 0 && $1 != -- ]]; do
    packages+=("$1")
    shift
done
[[ $# -gt 0 ]] && shift
binaries=("$@")

die() {
    echo "$name: $*" >&2
    exit 1
}

check_binaries() {
    local binary
    for binary in "${binaries[@]}"; do
        command -v "$binary" >/dev/null 2>&1 ||
            die "packages are installed but '$binary' is still not on PATH"
    done
}

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "installed" ]]; then
        missing+=("$pkg")
    fi
done

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
echo "$name: installed ${missing[*]}"
