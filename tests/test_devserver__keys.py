"""Throwaway signing keys: what the JWKS publishes, what verify() accepts, when keys are shared.

Clients find the key for a token by the header's ``kid`` in the published JWKS (the WLCG
verification path), so every check here goes through the public JWK, never the private key.
"""

from __future__ import annotations

import re
from typing import Callable, Dict

import jwt
import pytest

from jobtoken.devserver._keys import SigningKey, new_signing_key

CLAIMS = {"sub": "dev-user", "scope": "storage.read:/"}
PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


@pytest.mark.parametrize("alg", ["RS256", "ES256", "ES384", "ES512"])
def test_token_verifies_with_the_published_jwk_found_by_kid(alg: str) -> None:
    key = new_signing_key(alg, "keys-test")
    token = key.sign(CLAIMS, headers={"typ": "MT+JWT"})
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg and header["typ"] == "MT+JWT"
    assert header["kid"] == key.kid and re.fullmatch(r"[A-Za-z0-9_-]+", key.kid)
    (jwk,) = key.jwks()["keys"]
    assert (jwk["kid"], jwk["alg"], jwk["use"]) == (key.kid, alg, "sig")
    assert not PRIVATE_JWK_MEMBERS & set(jwk)  # the JWKS is public: no private parameters
    published = jwt.PyJWKSet.from_dict(key.jwks())[header["kid"]]
    assert jwt.decode(token, published.key, algorithms=[alg]) == CLAIMS
    assert "private_key" not in repr(key)


def test_verify_leaves_time_audience_and_issuer_to_the_caller() -> None:
    """The store answers expiry with its own 401 wording and a FakeClock's now."""
    key = new_signing_key("ES256", "keys-test")
    claims = {"exp": 1, "nbf": 4_000_000_000, "iat": 4_000_000_000, "aud": "x", "iss": "y"}
    assert key.verify(key.sign(claims)) == claims


def _other_key(key: SigningKey) -> str:
    return new_signing_key(key.alg, "keys-test", fresh=True).sign(CLAIMS)


def _tampered(key: SigningKey) -> str:
    head, _, sig = key.sign(CLAIMS).split(".")
    _, payload, _ = key.sign({"sub": "someone-else"}).split(".")
    return f"{head}.{payload}.{sig}"


def _unsigned(key: SigningKey) -> str:
    return jwt.encode(CLAIMS, None, algorithm="none")


def _hmac(key: SigningKey) -> str:
    return jwt.encode(CLAIMS, "0" * 32, algorithm="HS256", headers={"kid": key.kid})


def _other_alg(key: SigningKey) -> str:
    return new_signing_key("ES384", "keys-test").sign(CLAIMS, headers={"kid": key.kid})


FORGERIES: Dict[str, Callable[[SigningKey], str]] = {
    "other key": _other_key,
    "tampered payload": _tampered,
    "alg none": _unsigned,
    "hmac": _hmac,
    "other alg, same kid": _other_alg,
    "garbage": lambda key: "not-a-jwt",
}


@pytest.mark.parametrize("forge", list(FORGERIES.values()), ids=list(FORGERIES))
def test_verify_rejects_what_this_key_did_not_sign(forge: Callable[[SigningKey], str]) -> None:
    key = new_signing_key("ES256", "keys-test")
    with pytest.raises(jwt.InvalidTokenError):
        key.verify(forge(key))


def test_rsa_keys_are_shared_per_purpose_unless_fresh() -> None:
    """Sharing keeps server start-up fast; ``fresh`` is how a test gets a foreign server."""
    mytoken = new_signing_key("RS256", "keys-test-mytoken")
    assert new_signing_key("RS256", "keys-test-mytoken").kid == mytoken.kid
    op = new_signing_key("RS256", "keys-test-op")
    fresh = new_signing_key("RS256", "keys-test-mytoken", fresh=True)
    assert len({mytoken.kid, op.kid, fresh.kid}) == 3
    with pytest.raises(jwt.InvalidSignatureError):
        mytoken.verify(fresh.sign(CLAIMS))
    with pytest.raises(jwt.InvalidSignatureError):
        mytoken.verify(op.sign(CLAIMS))


def test_ec_keys_are_new_for_every_server() -> None:
    first, second = new_signing_key("ES512", "mytoken"), new_signing_key("ES512", "mytoken")
    assert first.kid != second.kid
    with pytest.raises(jwt.InvalidSignatureError):
        first.verify(second.sign(CLAIMS))
