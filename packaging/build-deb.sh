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
mkdir "$tree"
# the files git tracks (plus uncommitted edits), else the whole tree without build leftovers
if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$top" && git ls-files -z --cached --others --exclude-standard) |
        (cd "$top" && xargs -0 cp --parents -P -t "$tree" 2>/dev/null || true)
else
    (cd "$top" && tar --exclude=.venv --exclude=.git --exclude=__pycache__ -cf - .) |
        (cd "$tree" && tar -xf -)
fi
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
