"""Mint test JWTs (access tokens and mytoken look-alikes) with a throwaway key."""

from __future__ import annotations

import functools
import time
import uuid
from typing import Any, Dict, Optional

import jwt
from cryptography.hazmat.primitives.asymmetric import ec


@functools.cache
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def access_token(
    *,
    scope: Optional[str] = "storage.create:/vo/jobs/1",
    aud: Any = "https://se.example.org",
    lifetime_s: float = 1200,
    now: Optional[float] = None,
    **extra: Any,
) -> str:
    t = time.time() if now is None else now
    claims: Dict[str, Any] = {
        "wlcg.ver": "1.0",
        "iss": "https://issuer.example.org",
        "sub": "test-subject",
        "aud": aud,
        "iat": int(t),
        "nbf": int(t),
        "exp": int(t + lifetime_s),
        "jti": str(uuid.uuid4()),
    }
    if scope is not None:
        claims["scope"] = scope
    claims.update(extra)
    return jwt.encode(claims, _key(), algorithm="ES256", headers={"kid": "test"})


def mytoken_jwt(iss: str = "https://mytoken.example.org", **extra: Any) -> str:
    t = int(time.time())
    claims: Dict[str, Any] = {
        "ver": "0.7",
        "token_type": "mytoken",
        "iss": iss,
        "sub": "test-subject",
        "aud": iss,
        "iat": t,
        "nbf": t,
        "exp": t + 86400,
        "jti": str(uuid.uuid4()),
        "seq_no": 1,
        "capabilities": ["AT"],
    }
    claims.update(extra)
    return jwt.encode(claims, _key(), algorithm="ES256", headers={"typ": "MT+JWT"})
