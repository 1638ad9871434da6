"""The version of this tree: the fallback when it is not built from a tagged git checkout.

``packaging/version.sh`` derives the version from the ``v*`` git tag and the package
builds write it here in their copy of the tree, so a checkout without tags or without git
still has a version (this one).
"""

from __future__ import annotations

version = "0.1.0"
