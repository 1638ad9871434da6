"""WLCG scope semantics: which granted scope covers which wanted scope.

Two different matching rules meet in jobtoken, and mixing them up is the classic bug:

* WLCG (Common JWT Profile §6.2, what storage enforces): ``storage.*`` scopes carry an
  absolute path and cover everything below it, *per path component*
  (``/foo`` covers ``/foo/bar`` but not ``/foobar``); a trailing ``/`` means
  "directory only" (``/foo/`` does not let you create a *file* ``/foo``);
  ``storage.modify`` is a strict superset of ``storage.create``; a ``storage.*`` scope
  without a path is invalid. Every other scope (``openid``, ``compute.read``,
  ``wlcg.groups:/vo``...) matches only itself. :func:`scope_covers`,
  :func:`scopes_within` and :func:`narrower_or_equal` implement this; use them to judge
  a granted access token against what was asked, and a job's wish against a site's
  allowed list ("jobs may narrow, never widen").
* Mytoken restrictions: the server compares scope strings *exactly*
  (``storage.create:/vo/out`` does not allow asking for ``storage.create:/vo/out/job``).
  :func:`not_exactly_within` states that rule, for checks before talking to the server.

This module is pure: no I/O, no clock, no logging, no exceptions for bad input (invalid
scopes are reported by :func:`invalid_scopes` and never cover anything), so callers
choose the error class that fits where the scope came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = [
    "STORAGE_PREFIX",
    "Scope",
    "invalid_scopes",
    "is_valid_scope",
    "join_scopes",
    "narrower_or_equal",
    "not_exactly_within",
    "parse_scope",
    "parse_scopes",
    "scope_covers",
    "scopes_within",
]

STORAGE_PREFIX = "storage."

# Kinds a granted storage scope implies besides itself (profile: modify ⊃ create).
# storage.stage does NOT imply storage.read in the current profile text.
_IMPLIED_KINDS = {"storage.modify": frozenset({"storage.modify", "storage.create"})}


@dataclass(frozen=True)
class Scope:
    """One parsed scope.

    ``kind`` is the part before the first ``:`` for storage scopes (``storage.read``) and
    the whole string otherwise; ``path`` is the storage path or ``None``; ``valid`` is
    False for storage scopes with a missing, relative or non-normalised path.
    """

    text: str
    kind: str
    path: Optional[str]
    valid: bool

    @property
    def is_storage(self) -> bool:
        return self.kind.startswith(STORAGE_PREFIX)


def parse_scopes(value: Optional[str]) -> tuple[str, ...]:
    """Split a space-separated scope string (the OAuth ``scope`` wire form).

    Any whitespace separates; empty items vanish; duplicates are dropped keeping the
    first occurrence, so the result is usable as an ordered set.
    """
    if not value:
        return ()
    return tuple(dict.fromkeys(value.split()))


def join_scopes(scopes: Iterable[str]) -> str:
    """The space-separated wire form of ``scopes`` (duplicates dropped, order kept)."""
    return " ".join(dict.fromkeys(s for s in scopes if s))


def _path_is_valid(path: str) -> bool:
    # Absolute, and already normalised: no empty, "." or ".." components. We refuse
    # rather than normalise, because a storage system may normalise differently and a
    # scope check must never be more generous than the storage behind it.
    if not path.startswith("/"):
        return False
    if path == "/":
        return True
    inner = path[1:-1] if path.endswith("/") else path[1:]
    return all(part not in ("", ".", "..") for part in inner.split("/"))


def parse_scope(text: str) -> Scope:
    """Parse one scope string into kind and path (see :class:`Scope`)."""
    if not text or any(c.isspace() for c in text):
        return Scope(text=text, kind=text, path=None, valid=False)
    if not text.startswith(STORAGE_PREFIX):
        return Scope(text=text, kind=text, path=None, valid=True)
    kind, sep, path = text.partition(":")
    if not sep or kind == STORAGE_PREFIX:
        return Scope(text=text, kind=kind, path=None, valid=False)
    return Scope(text=text, kind=kind, path=path, valid=_path_is_valid(path))


def is_valid_scope(text: str) -> bool:
    """Whether ``text`` is a usable scope (storage scopes need a normalised absolute path)."""
    return parse_scope(text).valid


def invalid_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes in ``scopes`` that are invalid (e.g. ``storage.read`` with no path)."""
    return tuple(s for s in scopes if not parse_scope(s).valid)


def _components(path: str) -> tuple[list[str], bool]:
    """Path components and whether the path is directory-only (trailing ``/``)."""
    if path == "/":
        return [], True
    directory_only = path.endswith("/")
    return path.strip("/").split("/"), directory_only


def _path_covers(granted: str, wanted: str) -> bool:
    g_parts, g_dir_only = _components(granted)
    w_parts, w_dir_only = _components(wanted)
    if w_parts[: len(g_parts)] != g_parts:
        return False
    if not g_dir_only:
        return True
    # Directory-only grant: the granted directory itself only as a directory, and
    # anything strictly below it. The root "/" is a directory, so it covers everything.
    return not g_parts or len(w_parts) > len(g_parts) or w_dir_only


def scope_covers(granted_by: str, wanted: str) -> bool:
    """Whether holding scope ``granted_by`` permits everything scope ``wanted`` permits.

    WLCG semantics: ``storage.create:/a`` covers ``storage.create:/a/b`` but not
    ``storage.create:/ab``; ``storage.modify:/a`` covers ``storage.create:/a/b``;
    ``storage.create:/a/`` does not cover ``storage.create:/a``; other scopes only cover
    themselves. An invalid scope on either side covers / is covered by nothing.
    """
    g = parse_scope(granted_by)
    w = parse_scope(wanted)
    if not (g.valid and w.valid):
        return False
    if not (g.is_storage and w.is_storage):
        return g.text == w.text
    if w.kind not in _IMPLIED_KINDS.get(g.kind, frozenset({g.kind})):
        return False
    assert g.path is not None and w.path is not None
    return _path_covers(g.path, w.path)


def scopes_within(granted: Iterable[str], allowed: Iterable[str]) -> tuple[str, ...]:
    """The scopes in ``granted`` that no scope in ``allowed`` covers (empty = all within).

    Use it for "the access token got no more than we asked for" (granted = the token's
    scopes, allowed = the requested ones) and for "the job asks no more than the site
    allows" (granted = the job's wish, allowed = the site list).
    """
    allowed_list = list(dict.fromkeys(allowed))
    return tuple(
        s for s in dict.fromkeys(granted) if not any(scope_covers(a, s) for a in allowed_list)
    )


def narrower_or_equal(wanted: Iterable[str], allowed: Iterable[str]) -> bool:
    """Whether every scope in ``wanted`` is valid and covered by ``allowed``.

    The check behind "jobs may narrow, never widen": a job may ask for
    ``storage.create:/vo/jobs/42`` when the site allows ``storage.create:/vo/jobs``, but
    not for ``storage.modify:/vo/jobs/42`` nor ``storage.create:/vo/jobsX``.
    """
    wanted_list = list(wanted)
    return not invalid_scopes(wanted_list) and not scopes_within(wanted_list, allowed)


def not_exactly_within(wanted: Iterable[str], available: Iterable[str]) -> tuple[str, ...]:
    """The scopes in ``wanted`` that are not literally in ``available``.

    This is the Mytoken server's rule for restriction scopes (exact string subset, no
    path semantics): an access-token request or a sub-mytoken restriction may only name
    scope strings the mytoken's restriction carries, else the server answers 403
    ``usage_restricted`` or drops the restriction.
    """
    have = set(available)
    return tuple(s for s in dict.fromkeys(wanted) if s not in have)
