#!/bin/sh
# Install jobtoken into DESTDIR with the layout both distribution packages use (the one
# place that layout is written; packaging/debian/rules and packaging/rpm/jobtoken.spec call
# it). Installs the pure-Python package and a minimal .dist-info directly, without a PEP 517
# build: EL9's setuptools 53 cannot build from pyproject.toml's [project] table and
# Debian 12's setuptools 66 rejects its SPDX license string.
#
# Usage: install-tree.sh DESTDIR SITELIB [VERSION]
#   SITELIB: the distribution's pure-Python directory, e.g. /usr/lib/python3/dist-packages
#   VERSION: default packaging/version.sh
# Environment: PYTHON (default python3), used to generate the man page and completion;
# DEVSERVER_DESTDIR (default DESTDIR): where jobtoken.devserver goes. The dev server is its
# own package (jobtoken-devserver): worker nodes never need it. The RPM splits it with
# %files; a Debian build installs each binary package into its own directory.
# SYSTEMD_UNITDIR (default /usr/lib/systemd/system; empty: not installed here, the Debian
# build lets dh_installsystemd place it where its Debian release wants units).
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:?DESTDIR}
devdest=${DEVSERVER_DESTDIR:-$dest}
sitelib=${2:?SITELIB}
version=${3:-$("$top/packaging/version.sh")}
python=${PYTHON:-python3}

d() { install -d -m 0755 "$dest$1"; }

# the Python package, without caches (and without _data, whose symlinks find skips: the
# files it points to are installed in their system places below); the build's version
d "$sitelib"
(cd "$top/src" && find jobtoken -name __pycache__ -prune -o -type f ! -name '*.py[co]' -print) |
    while read -r file; do
        case $file in
            jobtoken/devserver/*) into=$devdest ;;
            *) into=$dest ;;
        esac
        install -D -m 0644 "$top/src/$file" "$into$sitelib/$file"
    done
printf '"""The version of this build (written by packaging/install-tree.sh)."""\n\nfrom __future__ import annotations\n\nversion = "%s"\n' \
    "$version" >"$dest$sitelib/jobtoken/_version.py"
info="$dest$sitelib/jobtoken-$version.dist-info"
install -d -m 0755 "$info"
cat >"$info/METADATA" <<META
Metadata-Version: 2.1
Name: jobtoken
Version: $version
Summary: Keep WLCG bearer tokens alive inside grid batch jobs, from a Mytoken
License: Apache-2.0
Requires-Python: >=3.9
META
printf '[console_scripts]\njobtoken = jobtoken.cli:main\n' >"$info/entry_points.txt"
printf 'jobtoken\n' >"$info/top_level.txt"
printf 'distribution package\n' >"$info/INSTALLER"
chmod 0644 "$info"/*

# the command
d /usr/bin
cat >"$dest/usr/bin/jobtoken" <<'CMD'
#!/usr/bin/python3
import sys

from jobtoken.cli import main

sys.exit(main())
CMD
chmod 0755 "$dest/usr/bin/jobtoken"

# hooks, job wrapper, credmon, config.d snippets (never active by themselves), pilot
# wrapper, ARC RTE, example config and logrotate: the layout `jobtoken install-files` has
PYTHONPATH="$top/src" "$python" -m jobtoken install-files --prefix "$dest" >/dev/null

# man page and completion, generated from the parser
d /usr/share/man/man1
d /usr/share/bash-completion/completions
PYTHONPATH="$top/src" "$python" "$top/packaging/gen_docs.py" man "$dest/usr/share/man/man1/jobtoken.1"
PYTHONPATH="$top/src" "$python" "$top/packaging/gen_docs.py" bash-completion \
    "$dest/usr/share/bash-completion/completions/jobtoken"
PYTHONPATH="$top/src" "$python" "$top/packaging/gen_docs.py" wrapper-man "$top/wrappers/jobtoken-wrap" \
    "$dest/usr/share/man/man1/jobtoken-wrap.1"
chmod 0644 "$dest/usr/share/man/man1/jobtoken.1" "$dest/usr/share/man/man1/jobtoken-wrap.1" \
    "$dest/usr/share/bash-completion/completions/jobtoken"

# the node broker's unit, installed but not enabled (the packages' scripts never enable it)
unitdir=${SYSTEMD_UNITDIR-/usr/lib/systemd/system}
if [ -n "$unitdir" ]; then
    install -D -m 0644 "$top/packaging/systemd/jobtoken-broker.service" \
        "$dest$unitdir/jobtoken-broker.service"
fi

# the audit directory of the HTCondor hooks: every job's user appends, nobody lists
install -d -m 1733 "$dest/var/log/jobtoken"
