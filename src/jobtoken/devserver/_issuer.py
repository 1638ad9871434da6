"""The simulated OP: mints WLCG-profile access tokens, and broken ones on request.

Must NOT: know about mytokens or restrictions; it receives the scopes and audiences the
Mytoken side decided to ask for, like a real OP's refresh-token grant.
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jwt

from ._keys import SigningKey
from ._responses import ApiError
from ._wlcg import grant_scopes

__all__ = ["TOKEN_FAULTS", "AccessTokenIssuer", "MintedToken"]

logger = logging.getLogger(__name__)

#: Token-content faults the AT endpoint can inject.
TOKEN_FAULTS = ("wider_scope", "wrong_audience", "stale_exp", "expired", "alg_none", "hs256")
WIDER_SCOPE = "storage.modify:/"
WRONG_AUDIENCE = "https://wrong-audience.invalid"


@dataclass(frozen=True)
class MintedToken:
    access_token: str = field(repr=False)
    expires_in: int
    scope: str
    audiences: Tuple[str, ...]
    expires_at: int
    jti: str


def with_token_fault(
    fault: Optional[str],
    granted: List[str],
    audiences: List[str],
    iat: int,
    exp: int,
    *,
    last_exp: Optional[int],
    lifetime_s: int,
) -> Tuple[List[str], List[str], int, int]:
    """``(scopes, audiences, iat, exp)`` as a misbehaving OP would issue them for ``fault``
    (a wider scope, a wrong audience, the previous token's ``exp``, an expired token);
    unchanged for any other fault."""
    if fault == "wider_scope" and WIDER_SCOPE not in granted:
        granted = [*granted, WIDER_SCOPE]
    if fault == "wrong_audience":
        audiences = [WRONG_AUDIENCE]
    if fault == "stale_exp" and last_exp is not None:
        exp = last_exp
    if fault == "expired":
        iat, exp = iat - lifetime_s - 60, iat - 60
    return granted, audiences, iat, exp


class AccessTokenIssuer:
    """Signs access tokens for one subject with the OP key."""

    def __init__(
        self,
        *,
        key: SigningKey,
        issuer: str,
        subject: str,
        allowed_scopes: Sequence[str],
        default_audience: str,
        lifetime_s: int,
        client_id: str,
    ) -> None:
        self.key = key
        self.issuer = issuer
        self.subject = subject
        self.allowed_scopes = tuple(allowed_scopes)
        self.default_audience = default_audience
        self.lifetime_s = int(lifetime_s)  # JWT times are integers; scitokens-cpp insists
        self.client_id = client_id
        self._lock = threading.Lock()
        self._last_exp: Optional[int] = None

    def mint(
        self,
        *,
        scopes: Sequence[str],
        audiences: Sequence[str],
        now: float,
        fault: Optional[str] = None,
    ) -> MintedToken:
        """Mint an AT for a refresh with ``scopes``/``audiences`` (as sent to a real OP).

        Empty audience entries are ignored (the real server sends ``[""]`` when the request
        names none), so the AT gets the OP's default audience.

        Raises:
            ApiError: ``oidc_error`` (400) when none of the requested scopes may be granted.
        """
        granted = list(grant_scopes(self.allowed_scopes, [s for s in scopes if s]))
        if not granted:
            raise ApiError(
                400,
                "oidc_error",
                "invalid_scope: none of the requested scopes is allowed for this user",
            )
        auds = [a for a in audiences if a] or [self.default_audience]
        inow = int(now)
        iat, exp = inow, inow + self.lifetime_s
        with self._lock:
            granted, auds, iat, exp = with_token_fault(
                fault, granted, auds, iat, exp, last_exp=self._last_exp, lifetime_s=self.lifetime_s
            )
            self._last_exp = exp
        jti = str(uuid.uuid4())
        claims: Dict[str, Any] = {
            "wlcg.ver": "1.0",
            "iss": self.issuer,
            "sub": self.subject,
            "aud": auds[0] if len(auds) == 1 else auds,
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "jti": jti,
            "scope": " ".join(granted),
            "client_id": self.client_id,
        }
        token = self._sign(claims, fault)
        logger.info("access token minted jti=%s exp=%d fault=%s", jti, exp, fault or "-")
        return MintedToken(
            access_token=token,
            expires_in=max(0, exp - inow),
            scope=" ".join(granted),
            audiences=tuple(auds),
            expires_at=exp,
            jti=jti,
        )

    def _sign(self, claims: Dict[str, Any], fault: Optional[str]) -> str:
        """Signed with the OP's key, or as a broken OP would: unsigned, or with HMAC."""
        if fault == "alg_none":
            return jwt.encode(claims, "", algorithm="none")  # "none" takes no key; "" means none
        if fault == "hs256":
            return jwt.encode(claims, secrets.token_bytes(32), algorithm="HS256")
        return self.key.sign(claims)

    def discovery(self) -> Dict[str, Any]:
        """The OP's OpenID Connect discovery document."""
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/jwks",
            "token_endpoint": f"{self.issuer}/token",
            "authorization_endpoint": f"{self.issuer}/authorize",
            "scopes_supported": list(self.allowed_scopes),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.key.alg],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "claims_supported": [
                "sub",
                "iss",
                "aud",
                "exp",
                "iat",
                "nbf",
                "jti",
                "scope",
                "wlcg.ver",
                "client_id",
            ],
        }
