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
# Environment: PYTHON (default python3), used to generate the man page and completion.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:?DESTDIR}
sitelib=${2:?SITELIB}
version=${3:-$("$top/packaging/version.sh")}
python=${PYTHON:-python3}

libexec=/usr/libexec/jobtoken
share=/usr/share/jobtoken

d() { install -d -m 0755 "$dest$1"; }
f() { install -m "$1" "$2" "$dest$3"; }

# the Python package, without caches; its version as this build knows it
d "$sitelib"
(cd "$top/src" && find jobtoken -name __pycache__ -prune -o -type f ! -name '*.py[co]' -print) |
    while read -r file; do
        install -D -m 0644 "$top/src/$file" "$dest$sitelib/$file"
    done
printf '"""The version of this build (written by packaging/install-tree.sh)."""\n\nversion = "%s"\n' \
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
f 0755 "$top/wrappers/jobtoken-wrap" /usr/bin/jobtoken-wrap

# HTCondor: scripts the hooks and knobs name, snippets to copy (never active by themselves)
d "$libexec"
for script in "$top"/condor/jobtoken-*; do
    f 0755 "$script" "$libexec/$(basename "$script")"
done
d "$share/condor/config.d"
for snippet in "$top"/condor/config.d/*.conf; do
    f 0644 "$snippet" "$share/condor/config.d/$(basename "$snippet")"
done
d "$share/condor/examples"
for example in "$top"/condor/examples/*; do
    f 0644 "$example" "$share/condor/examples/$(basename "$example")"
done

# ARC: the runtime environment where arcctl finds system RTEs
d /usr/share/arc/rte/ENV
f 0644 "$top/wrappers/arc/ENV/JOBTOKEN" /usr/share/arc/rte/ENV/JOBTOKEN

# configuration example (all commented out), logrotate, man page, completion
d /etc/jobtoken
f 0644 "$top/packaging/jobtoken.toml" /etc/jobtoken/jobtoken.toml
d /etc/logrotate.d
f 0644 "$top/packaging/jobtoken.logrotate" /etc/logrotate.d/jobtoken
d /usr/share/man/man1
d /usr/share/bash-completion/completions
PYTHONPATH="$top/src" "$python" "$top/packaging/gen_docs.py" man "$dest/usr/share/man/man1/jobtoken.1"
PYTHONPATH="$top/src" "$python" "$top/packaging/gen_docs.py" bash-completion \
    "$dest/usr/share/bash-completion/completions/jobtoken"
chmod 0644 "$dest/usr/share/man/man1/jobtoken.1" "$dest/usr/share/bash-completion/completions/jobtoken"

# the audit directory of the HTCondor hooks: every job's user appends, nobody lists
install -d -m 1733 "$dest/var/log/jobtoken"
