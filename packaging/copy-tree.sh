#!/usr/bin/env bash
# Copy this checkout's source to DIR for a package build: the files git tracks plus
# uncommitted and untracked-but-not-ignored ones (so a build shows what the tree has now),
# or, without git, the tree minus build leftovers. Usage: copy-tree.sh DIR
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:?DIR}
mkdir -p "$dest"
if command -v git >/dev/null 2>&1 && git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$top" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' file; do
            [ -e "$file" ] || [ -L "$file" ] || continue   # deleted, not yet committed
            cp --parents -P -p "$file" "$dest"
        done)
else
    (cd "$top" && tar --exclude=./.venv --exclude=./.git --exclude=__pycache__ -cf - .) |
        (cd "$dest" && tar -xf -)
fi
