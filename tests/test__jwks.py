from __future__ import annotations

import json

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from jobtoken._errors import ProtocolError, ServerUnavailableError, TokenCheckError
from jobtoken._http import http_client
from jobtoken._jwks import SignatureVerifier, discovery_urls
from jobtoken._tokens import decode_access_token
from tests.fakes import FakeClock

ISSUER = "https://op.example.org/realms/vo"
NOW = 1_800_000_000.0

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_RSA2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC = ec.generate_private_key(ec.SECP256R1())


def _jwk(key, kid, **extra):
    if isinstance(key, rsa.RSAPrivateKey):
        data = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    else:
        data = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    data["kid"] = kid
    data.update(extra)
    return data


def mint(key=_RSA, alg="RS256", kid="rsa1", iss=ISSUER, exp=NOW + 1200, **claims):
    body = {"iss": iss, "sub": "u", "jti": "j1", "exp": int(exp), "iat": int(NOW)}
    body.update(claims)
    headers = {"kid": kid} if kid is not None else {}
    return decode_access_token(jwt.encode(body, key, algorithm=alg, headers=headers))


class FakeOP:
    """Serves OIDC discovery (at the appended form only, like many OPs) and a JWKS."""

    def __init__(self, issuer=ISSUER, keys=None):
        self.issuer = issuer
        self.keys = keys if keys is not None else [_jwk(_RSA, "rsa1"), _jwk(_EC, "ec1")]
        self.requests: list[str] = []
        self.discovery_status = 200
        self.jwks_answer = None
        self.serve_inserted_form = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.requests.append(url)
        appended = self.issuer + "/.well-known/openid-configuration"
        inserted = discovery_urls(self.issuer)[0]
        if url == appended or (self.serve_inserted_form and url == inserted):
            if self.discovery_status != 200:
                return httpx.Response(self.discovery_status, text="nope")
            return httpx.Response(
                200, json={"issuer": self.issuer, "jwks_uri": "https://keys.example.org/jwks"}
            )
        if url == "https://keys.example.org/jwks":
            if self.jwks_answer is not None:
                return self.jwks_answer
            return httpx.Response(200, json={"keys": self.keys})
        return httpx.Response(404, text="not found")

    def count(self, needle):
        return sum(1 for u in self.requests if needle in u)


@pytest.fixture
def op():
    return FakeOP()


@pytest.fixture
def clock():
    return FakeClock(start=NOW)


def verifier_for(op, clock, **kwargs):
    def factory(url):
        return http_client(url, timeout_s=5, transport=httpx.MockTransport(op))

    return SignatureVerifier([ISSUER], http_factory=factory, clock=clock, **kwargs)


def test_discovery_urls_prefer_rfc8414_form():
    assert discovery_urls("https://op.example.org/realms/vo/") == (
        "https://op.example.org/.well-known/openid-configuration/realms/vo",
        "https://op.example.org/realms/vo/.well-known/openid-configuration",
    )
    assert discovery_urls("https://op.example.org") == (
        "https://op.example.org/.well-known/openid-configuration",
    )
    assert discovery_urls("https://op.example.org:8443/x")[0] == (
        "https://op.example.org:8443/.well-known/openid-configuration/x"
    )


@pytest.mark.parametrize(
    ("key", "alg", "kid"),
    [
        (_RSA, "RS256", "rsa1"),
        (_RSA, "PS256", "rsa1"),
        (_RSA, "RS512", "rsa1"),
        (_EC, "ES256", "ec1"),
    ],
)
def test_valid_signatures_verify(op, clock, key, alg, kid):
    claims = verifier_for(op, clock).verify(mint(key=key, alg=alg, kid=kid))
    assert claims["iss"] == ISSUER


def test_inserted_form_is_tried_first_then_appended(op, clock):
    verifier_for(op, clock).verify(mint())
    assert op.requests[:3] == [
        "https://op.example.org/.well-known/openid-configuration/realms/vo",
        "https://op.example.org/realms/vo/.well-known/openid-configuration",
        "https://keys.example.org/jwks",
    ]


def test_inserted_form_used_when_served(op, clock):
    op.serve_inserted_form = True
    verifier_for(op, clock).verify(mint())
    assert op.requests[0].endswith("/openid-configuration/realms/vo")
    assert op.count("/realms/vo/.well-known") == 0


def test_untrusted_issuer_is_refused_without_network(op, clock):
    with pytest.raises(TokenCheckError, match="untrusted issuer 'https://evil.example.org'"):
        verifier_for(op, clock).verify(mint(iss="https://evil.example.org"))
    assert op.requests == []


def test_token_without_kid_is_refused(op, clock):
    with pytest.raises(TokenCheckError, match="no 'kid'"):
        verifier_for(op, clock).verify(mint(kid=None))


def test_bad_signature_is_refused(op, clock):
    forged = mint(key=_RSA2, kid="rsa1")  # right kid, wrong key
    with pytest.raises(TokenCheckError, match="bad signature") as info:
        verifier_for(op, clock).verify(forged)
    assert forged.raw not in str(info.value)


def test_algorithm_must_fit_the_key(op, clock):
    # an RSA-signed token claiming the EC key's kid
    with pytest.raises(TokenCheckError, match="cannot verify"):
        verifier_for(op, clock).verify(mint(key=_RSA, alg="RS256", kid="ec1"))


def test_declared_jwk_alg_restricts(op, clock):
    op.keys = [_jwk(_RSA, "rsa1", alg="RS256")]
    with pytest.raises(TokenCheckError, match="PS256"):
        verifier_for(op, clock).verify(mint(alg="PS256"))


def test_hmac_keys_in_jwks_are_ignored(op, clock):
    op.keys = [{"kty": "oct", "kid": "rsa1", "k": "c2VjcmV0"}]
    with pytest.raises(TokenCheckError, match="does not publish"):
        verifier_for(op, clock).verify(mint())


def test_expiry_is_checked_with_the_injected_clock(op, clock):
    verifier = verifier_for(op, clock)
    token = mint(exp=NOW + 60)
    verifier.verify(token)
    clock.advance(61)
    with pytest.raises(TokenCheckError, match="expired"):
        verifier.verify(token)


def test_discovery_and_jwks_are_cached_for_cache_s(op, clock):
    verifier = verifier_for(op, clock, cache_s=3600)
    for _ in range(3):
        verifier.verify(mint(exp=NOW + 7200))
    assert op.count("/jwks") == 1
    clock.advance(3601)
    verifier.verify(mint(exp=NOW + 7200))
    assert op.count("/jwks") == 2


def test_unknown_kid_refetches_once_then_fails(op, clock):
    verifier = verifier_for(op, clock)
    verifier.verify(mint())
    clock.advance(120)
    with pytest.raises(TokenCheckError, match="'new'.*does not publish"):
        verifier.verify(mint(kid="new"))
    assert op.count("/jwks") == 2


def test_unknown_kid_found_after_key_rotation(op, clock):
    verifier = verifier_for(op, clock)
    verifier.verify(mint())
    op.keys = [_jwk(_RSA2, "rsa2")]
    clock.advance(120)
    verifier.verify(mint(key=_RSA2, kid="rsa2"))
    assert op.count("/jwks") == 2


def test_unknown_kid_refetch_is_rate_limited(op, clock):
    verifier = verifier_for(op, clock, refetch_min_interval_s=30)
    verifier.verify(mint())
    for _ in range(3):
        with pytest.raises(TokenCheckError):
            verifier.verify(mint(kid="garbage"))
    assert op.count("/jwks") == 1


def test_fetch_failures_are_server_unavailable(op, clock):
    op.discovery_status = 503
    with pytest.raises(ServerUnavailableError, match="HTTP 503"):
        verifier_for(op, clock).verify(mint())


def test_connection_failure_is_server_unavailable(clock):
    def factory(url):
        def refuse(request):
            raise httpx.ConnectError("Connection refused", request=request)

        return http_client(url, timeout_s=5, transport=httpx.MockTransport(refuse))

    verifier = SignatureVerifier([ISSUER], http_factory=factory, clock=clock)
    with pytest.raises(ServerUnavailableError, match="oidc discovery failed"):
        verifier.verify(mint())


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>"),
        httpx.Response(200, json={"nokeys": []}),
        httpx.Response(404, text="gone"),
    ],
)
def test_malformed_jwks_is_protocol_error(op, clock, answer):
    op.jwks_answer = answer
    with pytest.raises(ProtocolError, match="jwks fetch failed"):
        verifier_for(op, clock).verify(mint())


def test_discovery_for_another_issuer_is_refused(clock):
    def factory(url):
        def handler(request):
            return httpx.Response(
                200, json={"issuer": "https://elsewhere", "jwks_uri": "https://k/jwks"}
            )

        return http_client(url, timeout_s=5, transport=httpx.MockTransport(handler))

    verifier = SignatureVerifier([ISSUER], http_factory=factory, clock=clock)
    with pytest.raises(ProtocolError, match="not 'https://op.example.org/realms/vo'"):
        verifier.verify(mint())


def test_stale_keys_used_when_refresh_fails(op, clock):
    verifier = verifier_for(op, clock, cache_s=3600)
    verifier.verify(mint(exp=NOW + 86400))
    clock.advance(4000)
    op.discovery_status = 503
    verifier.verify(mint(exp=NOW + 86400))  # still verifies with cached keys
    assert op.count("/jwks") == 1
