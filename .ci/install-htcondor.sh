#!/usr/bin/env bash
# Install a real HTCondor 23.x (Debian 13's `htcondor` package) for the real-pool tests
# (tests/real/condor/), plus what jobtoken needs to run next to it. (Debian's `condor`
# package, which `htcondor` pulls in, carries its own Python bindings: classad, htcondor.)
#
# Debian 13 and later: the packages go onto the host.
# Debian 12: Debian 12 has no HTCondor package, so a Debian 13 chroot is made with
# debootstrap at $JOBTOKEN_CI_ROOT (default /var/lib/jobtoken-ci/trixie) from the host's
# own mirror, and the packages go in there. A stamp file records a complete chroot; an
# incomplete one (interrupted run) is removed and made again.
#
# Both paths share one step: `install_packages ROOT` runs apt in the pool environment
# ("/" on Debian 13, the chroot on Debian 12). The tests find the result through the same
# rule (tests/real/condor/_pool.py: pool_root()).
#
# Idempotent and quiet; root; no stdin.
set -euo pipefail

# python3-six, python3-urllib3: HTCondor's own Vault credmon (tests/real/condor/test_ap_credd.py
# runs it beside jobtoken's); Debian's htcondor package does not pull them in.
# docker.io, docker-cli, busybox-static: the Docker engine, its command line tool (which
# HTCondor runs) and the test image's only program, for docker-universe jobs
# (tests/real/condor/_docker.py); docker-cli is only recommended by docker.io
PACKAGES=(htcondor python3 python3-httpx python3-jwt python3-cryptography
    python3-psutil procps python3-six python3-urllib3 docker.io docker-cli busybox-static)
ROOT_DEFAULT=/var/lib/jobtoken-ci/trixie
STAMP_NAME=.jobtoken-ci-complete

die() {
    echo "install-htcondor: $*" >&2
    exit 1
}

debian_major() {
    local version
    version=$(cat /etc/debian_version 2>/dev/null || true)
    case "$version" in
        [0-9]*) echo "${version%%.*}" ;;
        trixie/sid | trixie*) echo 13 ;;
        *) echo 0 ;;
    esac
}

# run apt-get in the pool environment ROOT ("/" = the host)
in_root() {
    local root=$1
    shift
    if [[ "$root" == / ]]; then
        env DEBIAN_FRONTEND=noninteractive "$@"
    else
        chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"
    fi
}

missing_packages() {
    local root=$1 pkg status
    for pkg in "${PACKAGES[@]}"; do
        status=$(in_root "$root" dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [[ "$status" == installed ]] || echo "$pkg"
    done
}

# maintainer scripts want /proc; mount it for the install unless a pool already did
PROC_MOUNTED=
# on a host, apt must not start the daemons it installs (HTCondor, Docker): the tests start
# their own; a policy-rc.d made here is removed again, one the site has is left alone
OUR_POLICY=
clean_up() {
    if [[ -n "$PROC_MOUNTED" ]]; then umount "$PROC_MOUNTED" 2>/dev/null || true; fi
    if [[ -n "$OUR_POLICY" ]]; then rm -f "$OUR_POLICY"; fi
}
trap clean_up EXIT

install_packages() {
    local root=$1 log missing
    mapfile -t missing < <(missing_packages "$root")
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ "$root" != / ]] && ! grep -qs " ${root%/}/proc " /proc/mounts; then
        mount -t proc proc "$root/proc"
        PROC_MOUNTED="$root/proc"
    fi
    if [[ "$root" == / && ! -e /usr/sbin/policy-rc.d ]]; then
        OUR_POLICY=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$OUR_POLICY"
        chmod 755 "$OUR_POLICY"
    fi
    log=$(mktemp)
    if ! in_root "$root" apt-get -o DPkg::Lock::Timeout=900 update -q >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        die "apt-get update failed in $root"
    fi
    if ! in_root "$root" apt-get -o DPkg::Lock::Timeout=900 install -y -q \
        --no-install-recommends "${missing[@]}" </dev/null >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        rm -f "$log"
        die "apt-get install failed in $root for: ${missing[*]}"
    fi
    rm -f "$log"
    echo "install-htcondor: installed ${missing[*]} in $root"
}

# the host's Debian mirror (deb822 or one-line sources), deb.debian.org if none is found
host_mirror() {
    local url
    url=$(grep -hs -E '^URIs:' /etc/apt/sources.list.d/debian.sources |
        awk '{print $2}' | grep -v security | head -n 1 || true)
    if [[ -z "$url" ]]; then
        url=$(grep -hs -E '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
            awk '{print $2}' | grep -E 'debian/?$' | grep -v security | head -n 1 || true)
    fi
    echo "${url:-http://deb.debian.org/debian}"
}

# never delete through a mount a pool fixture left behind (those are the host's /dev, /sys)
assert_unmounted() {
    local root=$1
    if grep -qs " ${root%/}/" /proc/mounts; then
        die "$root still has mounts (a pool is running or was not cleaned up): $(
            grep " ${root%/}/" /proc/mounts | awk '{print $2}' | tr '\n' ' ')"
    fi
}

make_chroot() {
    local root=$1 mirror log
    mirror=$(host_mirror)
    command -v debootstrap >/dev/null 2>&1 || {
        apt-get -o DPkg::Lock::Timeout=900 install -y -q debootstrap </dev/null >/dev/null 2>&1 ||
            { apt-get -o DPkg::Lock::Timeout=900 update -q >/dev/null 2>&1 &&
                apt-get -o DPkg::Lock::Timeout=900 install -y -q debootstrap </dev/null >/dev/null; } ||
            die "cannot install debootstrap"
    }
    if [[ -e "$root" ]]; then
        assert_unmounted "$root"
        rm -rf --one-file-system "$root"
    fi
    mkdir -p "$(dirname "$root")"
    log=$(mktemp)
    if ! debootstrap --variant=minbase \
        --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        trixie "$root" "$mirror" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        die "debootstrap trixie from $mirror into $root failed"
    fi
    rm -f "$log"
    # the chroot resolves names like the host; apt must not start daemons in it
    cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
}

# the account real-pool test jobs run as, and the group that may read the site's robot
# mytoken (0640 root:GROUP), in the pool environment
TEST_USER=jobtoken-ci
TEST_GROUP=jobtoken-jobs
ensure_test_user() {
    local root=$1
    in_root "$root" getent group "$TEST_GROUP" >/dev/null ||
        in_root "$root" groupadd --system "$TEST_GROUP" ||
        in_root "$root" getent group "$TEST_GROUP" >/dev/null || die "cannot create group $TEST_GROUP"
    in_root "$root" getent passwd "$TEST_USER" >/dev/null ||
        in_root "$root" useradd --create-home --user-group --groups "$TEST_GROUP" \
            --shell /bin/sh "$TEST_USER" ||
        in_root "$root" getent passwd "$TEST_USER" >/dev/null || die "cannot create user $TEST_USER"
}

[[ $(id -u) -eq 0 ]] || die "need root"
major=$(debian_major)
if [[ "$major" -ge 13 ]]; then
    install_packages /
    root=/
elif [[ "$major" -eq 12 ]]; then
    root=${JOBTOKEN_CI_ROOT:-$ROOT_DEFAULT}
    if [[ ! -f "$root/$STAMP_NAME" ]]; then
        make_chroot "$root"
    fi
    install_packages "$root"
    date -u +%FT%TZ >"$root/$STAMP_NAME"
else
    die "unsupported Debian release '$(cat /etc/debian_version 2>/dev/null)' (need 12 or 13)"
fi
ensure_test_user "$root"
# HTCondor's startd runs `docker info` as the condor user (HTCondor's docs: add condor to
# the docker group); the tests' engine gives its socket to that group
in_root "$root" id -nG condor | grep -qw docker || in_root "$root" usermod -aG docker condor ||
    die "cannot add condor to the docker group in $root"
in_root "$root" condor_version >/dev/null 2>&1 || die "condor_version does not run in $root"
in_root "$root" python3 -c 'import classad, htcondor, httpx, jwt, cryptography, psutil' \
    >/dev/null 2>&1 || die "the Python modules jobtoken needs do not import in $root"
