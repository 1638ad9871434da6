#!/bin/sh
# Print jobtoken's version: from the newest v* git tag (v1.2.3 -> 1.2.3; commits after it
# -> 1.2.3.post<N>+g<hash>), else the fallback in src/jobtoken/_version.py (with
# .dev0+g<hash> appended when git knows the commit but no tag). PEP 440, and valid as a
# Debian upstream version and an RPM Version.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
fallback=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$top/src/jobtoken/_version.py")
[ -n "$fallback" ] || { echo "version.sh: no version in src/jobtoken/_version.py" >&2; exit 1; }
if command -v git >/dev/null 2>&1 && git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
    if described=$(git -C "$top" describe --tags --match 'v[0-9]*' --long 2>/dev/null); then
        # v1.2.3-4-gabcdef0 (the tag itself may contain '-': split from the right)
        hash=${described##*-}
        rest=${described%-*}
        count=${rest##*-}
        tag=${rest%-*}
        base=${tag#v}
        if [ "$count" = 0 ]; then echo "$base"; else echo "$base.post$count+$hash"; fi
        exit 0
    fi
    if hash=$(git -C "$top" rev-parse --short HEAD 2>/dev/null); then
        echo "$fallback.dev0+g$hash"
        exit 0
    fi
fi
echo "$fallback"
