#!/usr/bin/env bash
# Install a real ARC 6 CE (A-REX, arcctl, the ARC client with the REST plugins) for
# tests/real/arc/, plus dash and shellcheck for the RTE's POSIX sh checks.
#
# Debian 12 ships ARC 6.17; Debian 13 ships ARC 7.0 only. On a machine whose Debian has no
# ARC 6 the CE goes into a Debian 12 chroot (debootstrap bookworm) at $ARC_CHROOT, and the
# tests run every CE command there (tests/real/arc/_ce.py reads the same path). Setting
# JOBTOKEN_ARC_CHROOT=1 forces the chroot on Debian 12 too (to try that path).
#
# Idempotent and quiet (apt-get update only when something is missing); root, no stdin.
# Package scripts start no service: the machine's policy-rc.d (or a temporary one while
# dpkg runs) refuses it, and units a systemd would have started are stopped and disabled.
set -euo pipefail

ARC_CHROOT=${ARC_CHROOT:-/var/lib/jobtoken-ci/arc-bookworm}
# procps and time: the fork back end runs ps and /usr/bin/time (a minbase chroot has neither);
# python3-*: what jobtoken's Debian package depends on, so that tests/real/arc installs it
# there with apt and no download
ARC_PACKAGES=(
    nordugrid-arc-arex
    nordugrid-arc-arcctl
    nordugrid-arc-client
    nordugrid-arc-plugins-needed
    nordugrid-arc-plugins-arcrest
    openssl
    procps
    time
    ca-certificates
    python3
    python3-httpx
    python3-jwt
    python3-cryptography
    python3-psutil
)
HOST_PACKAGES=(dash shellcheck)
APT=(apt-get -q -y -o DPkg::Lock::Timeout=900 --no-install-recommends)
export DEBIAN_FRONTEND=noninteractive

die() {
    echo "install-arc: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "need root"

log=$(mktemp)
created_policy=""
mounted_proc=""
cleanup() {
    rm -f "$log"
    if [[ -n $created_policy ]]; then rm -f "$created_policy"; fi
    if [[ -n $mounted_proc ]]; then umount "$mounted_proc" 2>/dev/null || true; fi
}
trap cleanup EXIT

# missing ROOT PKG... -> prints the packages not installed under ROOT ("" = this system)
missing() {
    local root=$1 pkg status
    shift
    for pkg in "$@"; do
        status=$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${db:Status-Status}' \
            "$pkg" 2>/dev/null || true)
        [[ $status == installed ]] || printf '%s ' "$pkg"
    done
}

# no_services ROOT: package scripts under ROOT must not start daemons.
no_services() {
    local policy=$1/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=$policy
    fi
}

# apt_install ROOT PKG...: install under ROOT ("" = here, else chroot ROOT)
apt_install() {
    local root=$1
    shift
    local run=()
    [[ -z $root ]] || run=(chroot "$root")
    no_services "$root"
    # an earlier run cut short leaves packages half-configured; finish them first
    "${run[@]}" dpkg --force-confdef --force-confold --configure -a </dev/null >"$log" 2>&1 || true
    if ! "${run[@]}" "${APT[@]}" update </dev/null >"$log" 2>&1; then
        cat "$log" >&2
        die "apt-get update failed${root:+ in $root}"
    fi
    if ! "${run[@]}" "${APT[@]}" install "$@" </dev/null >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "apt-get install failed${root:+ in $root}: $*"
    fi
    if [[ -n $created_policy ]]; then
        rm -f "$created_policy"
        created_policy=""
    fi
}

# The packaged units, stopped and disabled if a running systemd took them up.
stop_units() {
    local unit
    [[ -d /run/systemd/system ]] || return 0
    for unit in arc-arex arc-arex-ws arc-datadelivery-service arc-infosys-ldap nordugrid-arc-gridftpd; do
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
}

# mounted_under DIR: true when a mount point lies in DIR (never rm -rf through /dev or /sys)
mounted_under() {
    awk -v d="$1/" 'index($2 "/", d) == 1 { found = 1 } END { exit !found }' /proc/mounts
}

host_has_arc6() {
    local candidate
    candidate=$(apt-cache policy nordugrid-arc-arex 2>/dev/null | awk '/Candidate:/ {print $2}')
    [[ $candidate == 6.* ]]
}

need=$(missing "" "${HOST_PACKAGES[@]}")
if [[ -n $need ]]; then
    # shellcheck disable=SC2086  # a word list
    apt_install "" $need
fi

use_chroot=${JOBTOKEN_ARC_CHROOT:-}
if [[ -z $use_chroot ]]; then
    if [[ $(cut -d. -f1 /etc/debian_version) == 12 ]] || host_has_arc6; then
        use_chroot=0
    else
        use_chroot=1
    fi
fi

if [[ $use_chroot == 0 ]]; then
    need=$(missing "" "${ARC_PACKAGES[@]}")
    if [[ -n $need ]]; then
        # shellcheck disable=SC2086
        apt_install "" $need
        stop_units
        echo "install-arc: installed $need"
    fi
    exit 0
fi

# Debian 13 (or forced): ARC 6 in a Debian 12 chroot. It is built in $ARC_CHROOT.partial
# and renamed only when complete: the arex postinst (arcctl test-ca) cannot be re-run over
# its own half-made files, so a failed build starts again from scratch.
if [[ ! -x $ARC_CHROOT/usr/sbin/arched ]]; then
    need=$(missing "" debootstrap)
    if [[ -n $need ]]; then apt_install "" debootstrap; fi
    partial=$ARC_CHROOT.partial
    if mountpoint -q "$partial/proc"; then umount "$partial/proc"; fi
    mounted_under "$partial" && die "something is still mounted under $partial"
    rm -rf --one-file-system "$partial"
    mkdir -p "$(dirname "$ARC_CHROOT")"
    if ! debootstrap --variant=minbase bookworm "$partial" \
        http://deb.debian.org/debian </dev/null >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "debootstrap bookworm failed"
    fi
    # name service as on the host: the arex postinst signs a host certificate for hostname -f
    cp /etc/resolv.conf "$partial/etc/resolv.conf" 2>/dev/null || true
    cp /etc/hosts "$partial/etc/hosts"
    mount -t proc proc "$partial/proc"
    mounted_proc=$partial/proc
    apt_install "$partial" "${ARC_PACKAGES[@]}"
    umount "$partial/proc"
    mounted_proc=""
    need=$(missing "$partial" "${ARC_PACKAGES[@]}")
    [[ -z $need ]] || die "not installed in the chroot: $need"
    mounted_under "$ARC_CHROOT" && die "something is still mounted under $ARC_CHROOT"
    rm -rf --one-file-system "$ARC_CHROOT"
    mv "$partial" "$ARC_CHROOT"
    echo "install-arc: ARC 6 installed in the Debian 12 chroot $ARC_CHROOT"
fi
# packages added to the list since the chroot was built (its arex postinst is done by now)
need=$(missing "$ARC_CHROOT" "${ARC_PACKAGES[@]}")
if [[ -n $need ]]; then
    # shellcheck disable=SC2086  # a word list
    apt_install "$ARC_CHROOT" $need
    echo "install-arc: installed $need in $ARC_CHROOT"
fi
