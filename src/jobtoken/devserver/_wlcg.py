"""What the simulated OP grants: WLCG scope path semantics.

Pure: no I/O, no clock. A granted ``storage.*:/a`` covers ``storage.*:/a/b`` per path
component (``/a`` does not cover ``/ab``); ``storage.modify`` covers ``storage.create``.
Non-storage scopes (``openid``, ``compute.*`` ...) are granted only by exact match.

Must NOT: be used for Mytoken restriction matching, which is exact-string (fact 6).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

__all__ = ["grant_scopes", "scope_allowed"]

_IMPLIED = {"storage.create": ("storage.modify",)}


def _split(scope: str) -> Tuple[str, Optional[str]]:
    if scope.startswith("storage.") and ":" in scope:
        kind, path = scope.split(":", 1)
        return kind, path
    return scope, None


def _path_covers(allowed: str, wanted: str) -> bool:
    if not allowed.startswith("/") or not wanted.startswith("/"):
        return False
    if allowed == "/":
        return True
    base = allowed.rstrip("/")
    return wanted == base or wanted.startswith(base + "/")


def scope_allowed(allowed: Iterable[str], wanted: str) -> bool:
    """Whether the OP may grant ``wanted`` given the scopes it allows this user."""
    kind, path = _split(wanted)
    for cand in allowed:
        if cand == wanted:
            return True
        ckind, cpath = _split(cand)
        if path is None or cpath is None:
            continue
        if ckind == kind or ckind in _IMPLIED.get(kind, ()):
            if _path_covers(cpath, path):
                return True
    return False


def grant_scopes(allowed: Sequence[str], requested: Sequence[str]) -> Tuple[str, ...]:
    """The requested scopes the OP grants (all allowed scopes if none were requested)."""
    if not requested:
        return tuple(allowed)
    out = []
    for scope in requested:
        if scope and scope not in out and scope_allowed(allowed, scope):
            out.append(scope)
    return tuple(out)
