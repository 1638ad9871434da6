"""Throwaway signing keys for mytokens and access tokens, and their JWKS.

Must NOT: persist private keys anywhere or decide what goes into a token; it only holds key
material, signs given claims and verifies signatures.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Union

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

__all__ = ["SigningKey", "new_signing_key"]


@functools.cache
def _rsa_private_key(slot: str) -> rsa.RSAPrivateKey:
    # RSA generation is the slow part of server start-up; one key per purpose and process.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


_CURVES: Dict[str, Callable[[], ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}

PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]


@dataclass(frozen=True)
class SigningKey:
    """One private key with its algorithm and key id (``kid`` is always set)."""

    alg: str
    kid: str
    private_key: PrivateKey = field(repr=False)

    @property
    def public_key(self) -> Union[rsa.RSAPublicKey, ec.EllipticCurvePublicKey]:
        return self.private_key.public_key()

    def public_jwk(self) -> Dict[str, Any]:
        """The public key as a JWK with ``kid``, ``alg`` and ``use``."""
        algo: Any = RSAAlgorithm if self.alg.startswith("RS") else ECAlgorithm
        jwk: Dict[str, Any] = json.loads(algo.to_jwk(self.public_key))
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk

    def jwks(self) -> Dict[str, Any]:
        return {"keys": [self.public_jwk()]}

    def sign(self, claims: Mapping[str, Any], headers: Optional[Mapping[str, Any]] = None) -> str:
        hdr = {"kid": self.kid}
        hdr.update(headers or {})
        return jwt.encode(dict(claims), self.private_key, algorithm=self.alg, headers=hdr)

    def verify(self, token: str) -> Dict[str, Any]:
        """Check the signature only; time and audience checks belong to the caller.

        Raises:
            jwt.InvalidTokenError: malformed token or bad signature.
        """
        return jwt.decode(
            token,
            self.public_key,
            algorithms=[self.alg],
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )


def new_signing_key(alg: str, purpose: str, *, fresh: bool = False) -> SigningKey:
    """A key for ``alg``; RSA keys are reused per process and purpose unless ``fresh``."""
    if alg.startswith("RS"):
        private_key: PrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if fresh
            else _rsa_private_key(purpose)
        )
    else:
        private_key = ec.generate_private_key(_CURVES[alg]())
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:12]).decode().rstrip("=")
    return SigningKey(alg=alg, kid=kid, private_key=private_key)
