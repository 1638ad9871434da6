#!/bin/sh
# Build the EL9 RPM from a copy of this checkout with rpmbuild: build-rpm.sh OUTDIR.
# The version is packaging/version.sh's. On a host that is not EL (CI builds on Debian)
# the BuildRequires cannot be checked against an rpm database, so EXTRA args (e.g.
# --nodeps) go to rpmbuild.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:?OUTDIR}" && cd "$1" && pwd)
shift
version=$("$top/packaging/version.sh")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/SOURCES" "$work/src"
"$top/packaging/copy-tree.sh" "$work/src/jobtoken-$version"
tar -C "$work/src" -czf "$work/SOURCES/jobtoken-$version.tar.gz" "jobtoken-$version"
rpmbuild -bb --define "_topdir $work" --define "jobtoken_version $version" "$@" \
    "$top/packaging/rpm/jobtoken.spec" >"$work/build.log" 2>&1 || {
    tail -n 60 "$work/build.log" >&2
    echo "build-rpm.sh: rpmbuild failed" >&2
    exit 1
}
cp "$work"/RPMS/noarch/*.rpm "$out"/
ls "$out"/*.rpm
