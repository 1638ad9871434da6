#!/bin/sh
# Build the Debian package from a copy of this checkout: build-deb.sh OUTDIR.
# dpkg-buildpackage wants debian/ at the top of the tree, so the copy gets
# packaging/debian there and a debian/changelog whose version is packaging/version.sh's.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:?OUTDIR}" && cd "$1" && pwd)
version=$("$top/packaging/version.sh")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tree="$work/jobtoken-$version"
"$top/packaging/copy-tree.sh" "$tree"
cp -r "$top/packaging/debian" "$tree/debian"
cat >"$tree/debian/changelog" <<CHANGELOG
jobtoken ($version) unstable; urgency=medium

  * Built from jobtoken $version; see /usr/share/doc/jobtoken/changelog.gz.

 -- jobtoken developers <jobtoken@example.org>  $(date -R)
CHANGELOG
(cd "$tree" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1 || {
    tail -n 60 "$work/build.log" >&2
    echo "build-deb.sh: dpkg-buildpackage failed" >&2
    exit 1
}
cp "$work"/*.deb "$out"/
ls "$out"/*.deb
