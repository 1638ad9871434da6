"""Where a mytoken comes from, how it is checked on load, and how rotation is persisted.

A mytoken is the long-lived secret; losing it (a rotated-away copy is dead at once,
no grace period) loses the job's credentials. So a rotated mytoken is written back
atomically to the very file it came from, *before* anyone uses the access token
that came with it. A mytoken from an environment variable cannot be written back:
such a source refuses a rotation with a clear error rather than losing it silently.

Checks on load, each a one-line ``ConfigError``: missing or empty file; a symlink
owned by someone else; a file readable by everyone (refused: every local user could
have copied it; group-readable is allowed because sites share a VO robot mytoken
with the pilot account's group); a file owned by another non-root user; a value
that is too short or is an access token rather than a mytoken.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from ._errors import ConfigError, ProtocolError, TokenFileError
from ._tokenfile import read_secret_file, write_secret_file
from ._tokens import unverified_jwt

__all__ = ["MytokenSource", "check_mytoken_value", "load_mytoken", "save_rotated_mytoken"]

logger = logging.getLogger(__name__)

_MIN_LEN = 32  # the server treats anything shorter as "not a token"
_MAX_LEN = 16 * 1024


@dataclass(frozen=True)
class MytokenSource:
    """Exactly one of ``path`` or ``env_var``."""

    path: Optional[Path] = None
    env_var: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.env_var is None):
            raise ConfigError("give the mytoken as a file or as an environment variable, not both")

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"${self.env_var}"


def check_mytoken_value(value: str, where: str) -> str:
    """Return the stripped mytoken, or raise ConfigError if it cannot be one.

    A JWT is accepted when it says it is a mytoken (``token_type`` or ``typ``); a
    JWT that looks like a WLCG access token is refused by name, because sending an
    AT where an MT belongs is a common mix-up (the mytoken CLI even discovers MTs in
    ``bt_u<uid>``). Opaque strings of 32+ characters are short mytokens.
    """
    text = value.strip()
    if not text:
        raise ConfigError(f"mytoken {where} is empty")
    if len(text) > _MAX_LEN or not text.isascii() or any(c.isspace() for c in text):
        raise ConfigError(f"mytoken {where} is not a single token (whitespace or binary data)")
    if len(text) < _MIN_LEN:
        raise ConfigError(f"mytoken {where} is too short to be a mytoken")
    if text.count(".") == 2:
        read = unverified_jwt(text)
        if read is None:
            raise ConfigError(f"mytoken {where} is a malformed JWT")
        header, claims = read
        if claims.get("token_type") == "mytoken" or header.get("typ") == "MT+JWT":
            return text
        if "wlcg.ver" in claims or "scope" in claims:
            raise ConfigError(
                f"{where} holds an access token, not a mytoken (point it at the mytoken file)"
            )
        raise ConfigError(f"mytoken {where} is a JWT that is not a mytoken")
    return text


def load_mytoken(
    source: MytokenSource,
    *,
    env: Optional[Mapping[str, str]] = None,
    allow_other_owner: bool = False,
) -> str:
    """Read and check the mytoken from its source.

    Raises:
        ConfigError: missing, empty, unsafe, or not a mytoken.
    """
    if source.env_var is not None:
        environ = os.environ if env is None else env
        if source.env_var not in environ:
            raise ConfigError(f"mytoken variable ${source.env_var} is not set")
        return check_mytoken_value(environ[source.env_var], f"in ${source.env_var}")
    assert source.path is not None
    path = source.path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"mytoken file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"mytoken file {path}: {exc.strerror}") from exc
    if st.st_mode & stat.S_IROTH:
        raise ConfigError(
            f"mytoken file {path} is readable by everyone (mode {stat.S_IMODE(st.st_mode):04o});"
            " chmod o-rwx and consider it compromised"
        )
    try:
        value = read_secret_file(path, allow_other_owner=allow_other_owner)
    except TokenFileError as exc:
        raise ConfigError(f"mytoken {exc.message}") from exc
    return check_mytoken_value(value, f"file {path}")


def save_rotated_mytoken(source: MytokenSource, new_mytoken: str) -> None:
    """Persist a rotated mytoken where the old one came from (atomic, fsynced).

    Raises:
        ProtocolError: the server's replacement is not a plausible mytoken (keep the
            old one: it may still be valid if the server did not commit).
        ConfigError: the mytoken came from a variable, where it cannot be saved.
        TokenFileError: the file could not be replaced; the old file is untouched.
    """
    try:
        value = check_mytoken_value(new_mytoken, "in the server's token_update")
    except ConfigError as exc:
        raise ProtocolError(f"server sent a malformed rotated mytoken: {exc.message}") from exc
    if source.path is None:
        raise ConfigError(
            f"the server rotated the mytoken from ${source.env_var} but a variable cannot be "
            "updated; use a mytoken file (--mytoken-file) for rotating mytokens"
        )
    write_secret_file(source.path, value, newline=False)
    logger.info("mytoken rotated and saved path=%s", source.path)
