"""WLCG Bearer Token ServerMetadata, read side (the spec's exact order).

1. ``BEARER_TOKEN`` (the value), 2. ``BEARER_TOKEN_FILE`` (the file's contents),
3. ``$XDG_RUNTIME_DIR/bt_u<euid>``, 4. ``/tmp/bt_u<euid>``. Whitespace as C
``isspace`` defines it is stripped; an empty value means "go on to the next step".
A missing file at step 3 falls through to step 4, as the mytoken CLI and HTCondor
do (the spec is ambiguous there).

The default place (``/tmp`` unless ``$XDG_RUNTIME_DIR`` is set, which is per-user and
preferred) is in a shared directory: another user can create ``/tmp/bt_u<uid>`` first
and have our tools send *their* token, or make our writes fail. A file there that is
not ours is refused with that explanation (:func:`refuse_foreign_file`).

Why jobtoken needs this: ``jobtoken inspect``/``status`` show what a payload tool
would actually pick up, and ``run`` must know where the job's tools will look.
This module never writes anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from ._errors import TokenFileError
from ._tokenfile import read_secret_file

__all__ = [
    "DiscoveredToken",
    "default_token_path",
    "discover_bearer_token",
    "refuse_foreign_file",
]

_ISSPACE = " \t\n\r\v\f"


@dataclass(frozen=True)
class DiscoveredToken:
    token: str = field(repr=False)
    source: str  # "BEARER_TOKEN", or the file path it came from


def default_token_path(env: Mapping[str, str], euid: Optional[int] = None) -> Path:
    """Where step 3/4 of discovery look for this user (``bt_u<euid>``)."""
    uid = os.geteuid() if euid is None else euid
    runtime = env.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path("/tmp")
    return base / f"bt_u{uid}"


def refuse_foreign_file(path: Path, euid: Optional[int] = None) -> None:
    """Refuse ``path`` if it exists and belongs to another user (root's files are fine).

    Raises:
        TokenFileError: the file (or a link there) is someone else's; the message says
            why that matters and what to do.
    """
    uid = os.geteuid() if euid is None else euid
    try:
        st = os.lstat(path)
    except OSError:
        return
    if st.st_uid in (uid, 0):
        return
    raise TokenFileError(
        f"{path} belongs to uid {st.st_uid}, not to you (uid {uid}): another user may have "
        "planted it so that your tools use their token; remove it (or have it removed) and "
        "keep tokens in $XDG_RUNTIME_DIR or a file named by $BEARER_TOKEN_FILE"
    )


def _read_optional(path: Path) -> Optional[str]:
    try:
        return read_secret_file(path).strip(_ISSPACE)
    except TokenFileError:
        if not os.path.lexists(path):
            return None
        raise


def discover_bearer_token(
    env: Optional[Mapping[str, str]] = None, *, euid: Optional[int] = None
) -> Optional[DiscoveredToken]:
    """Find the bearer token a WLCG-conforming tool would use; None if there is none.

    Raises:
        TokenFileError: a named file exists but cannot be read safely (the spec says
            an invalid value should stop discovery with an error, not be skipped).
    """
    environ = os.environ if env is None else env
    value = environ.get("BEARER_TOKEN", "").strip(_ISSPACE)
    if value:
        return DiscoveredToken(value, "BEARER_TOKEN")
    candidates = []
    named = environ.get("BEARER_TOKEN_FILE", "")
    if named:
        candidates.append(Path(named))
    uid = os.geteuid() if euid is None else euid
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        candidates.append(Path(runtime) / f"bt_u{uid}")
    candidates.append(Path("/tmp") / f"bt_u{uid}")
    for path in candidates:
        refuse_foreign_file(path, uid)
        text = _read_optional(path)
        if text:
            return DiscoveredToken(text, str(path))
    return None
