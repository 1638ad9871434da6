"""Mytoken → a checked access token, with rotation persisted first.

The order matters and is the reason this module exists: (1) ask the server, (2) if
it rotated the mytoken, save the new one durably *before* anything else (the old one
is dead now), (3) only then judge the access token. A token that fails the checks is
never handed on, but the rotated mytoken is already safe.

No file other than the mytoken is written here; the caller decides where ATs go.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Protocol, Tuple

from ._clock import utc_text
from ._mytoken import MytokenClient
from ._mytokenfile import MytokenSource, load_mytoken, save_rotated_mytoken
from ._tokens import AccessToken, check_access_token, decode_access_token

__all__ = ["TokenRequest", "Verifier", "fetch_access_token"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenRequest:
    """What to ask the server for; the same strings are the upper bound we accept."""

    scopes: Tuple[str, ...] = ()
    audiences: Tuple[str, ...] = ()
    min_valid_s: float = 0.0
    comment: Optional[str] = None


class Verifier(Protocol):
    def verify(self, token: AccessToken) -> object:
        """Raise TokenCheckError unless the signature is good (the return value is unused)."""


def fetch_access_token(
    client: MytokenClient,
    source: MytokenSource,
    request: TokenRequest,
    *,
    now: float,
    previous: Optional[AccessToken] = None,
    env: Optional[Mapping[str, str]] = None,
    verifier: Optional[Verifier] = None,
    allow_other_owner: bool = False,
) -> AccessToken:
    """Exchange the mytoken from ``source`` for an access token and check it.

    Args:
        now: wall-clock time captured before the request; token times are judged
            against it (google-auth's rule: a slow response must not make a token
            look fresher than it is).
        previous: the token being replaced; the new one must extend it, or renewing
            achieved nothing.
        env: where a mytoken named by a variable is looked up (default ``os.environ``).

    Raises:
        ConfigError, MytokenError, TokenCheckError, TokenFileError.
    """
    mytoken = load_mytoken(source, env=env, allow_other_owner=allow_other_owner)
    response = client.get_access_token(
        mytoken,
        scopes=request.scopes,
        audiences=request.audiences,
        comment=request.comment,
    )
    if response.token_update is not None:
        save_rotated_mytoken(source, response.token_update.mytoken)
    token = decode_access_token(response.access_token)
    check_access_token(
        token,
        requested_scopes=request.scopes,
        requested_audiences=request.audiences,
        now=now,
        min_valid_s=request.min_valid_s,
        previous=previous,
    )
    if verifier is not None:
        verifier.verify(token)
    logger.info(
        "access token obtained jti=%s sub=%s scope=%s aud=%s exp=%s",
        token.jti,
        token.subject,
        " ".join(token.scopes),
        " ".join(token.audiences),
        utc_text(token.expires_at),
    )
    return token
