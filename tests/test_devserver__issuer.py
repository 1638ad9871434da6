"""AccessTokenIssuer, the simulated OP: the tokens it mints, judged as a storage element would.

A storage element verifies an access token with the OP's JWKS and the WLCG profile, so these
tests do the same with PyJWT. The token faults exist to test one client check each, so each
fault must break exactly what it promises and leave the rest of the token valid.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import jwt
import pytest

from jobtoken.devserver._issuer import (
    TOKEN_FAULTS,
    WIDER_SCOPE,
    WRONG_AUDIENCE,
    AccessTokenIssuer,
    MintedToken,
    with_token_fault,
)
from jobtoken.devserver._keys import new_signing_key
from jobtoken.devserver._responses import ApiError
from tests.fakes import FakeClock

OP = "http://127.0.0.1:8000/op"
SE = "https://se.example.org"
VO = "storage.create:/vo"
ANY_AUDIENCE = "https://wlcg.cern.ch/jwt/v1/any"
ALLOWED = ("openid", "storage.read:/", VO)
#: Claims the WLCG Common JWT Profile requires (fact 16; ``nbf`` is optional).
WLCG_REQUIRED = ["sub", "exp", "iss", "wlcg.ver", "aud", "iat", "jti"]


def make_issuer(alg: str = "RS256", lifetime_s: float = 1200) -> AccessTokenIssuer:
    return AccessTokenIssuer(
        key=new_signing_key(alg, "op"),
        issuer=OP,
        subject="dev-user",
        allowed_scopes=ALLOWED,
        default_audience=ANY_AUDIENCE,
        lifetime_s=lifetime_s,  # type: ignore[arg-type]
        client_id="jobtoken-devserver",
    )


def verify_like_storage(
    issuer: AccessTokenIssuer, token: str, audience: str = SE, *, check_times: bool = True
) -> Dict[str, Any]:
    """Key by ``kid`` from the JWKS, algorithm pinned to the key's, profile claims required."""
    jwks = jwt.PyJWKSet.from_dict(issuer.key.jwks())
    signing = jwks[jwt.get_unverified_header(token)["kid"]]
    options: Dict[str, Any] = {"require": WLCG_REQUIRED}
    if not check_times:
        options.update(verify_exp=False, verify_nbf=False, verify_iat=False)
    return jwt.decode(
        token,
        signing.key,
        algorithms=[issuer.key.alg],
        audience=audience,
        issuer=OP,
        options=options,
    )


def mint_now(
    issuer: AccessTokenIssuer, fault: Optional[str] = None, *, now: Optional[float] = None
) -> MintedToken:
    """A job's usual request: one storage scope, one audience, at wall-clock time.

    Wall-clock time, so that PyJWT's own expiry checks judge the token as a storage
    element would; nothing waits, and 1200 s of lifetime leave no room for flakiness.
    """
    return issuer.mint(
        scopes=[VO],
        audiences=[SE],
        now=time.time() if now is None else now,
        fault=fault,
    )


# --- well-formed tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_minted_token_is_a_wlcg_profile_jwt_a_storage_element_accepts(alg: str) -> None:
    issuer = make_issuer(alg)
    minted = issuer.mint(scopes=[VO + "/jobs/42"], audiences=[SE], now=time.time())
    header = jwt.get_unverified_header(minted.access_token)
    assert header["alg"] == alg and header["kid"] == issuer.key.kid
    claims = verify_like_storage(issuer, minted.access_token)
    assert claims["wlcg.ver"] == "1.0"
    assert claims["sub"] == "dev-user" and claims["client_id"] == "jobtoken-devserver"
    assert claims["aud"] == SE  # one audience: a plain string
    assert claims["scope"] == VO + "/jobs/42"  # the OP grants a narrower path (WLCG)
    assert claims["jti"] == minted.jti
    assert (minted.scope, minted.audiences) == (claims["scope"], (SE,))


def test_times_are_integers_counted_from_the_given_now() -> None:
    """JWT times are integers (scitokens-cpp refuses floats), even for a fractional now."""
    clock = FakeClock(start=1_800_000_000.75)
    issuer = make_issuer(lifetime_s=90.9)
    minted = issuer.mint(scopes=[VO], audiences=[SE], now=clock.now())
    claims = verify_like_storage(issuer, minted.access_token, check_times=False)
    assert claims["iat"] == claims["nbf"] == 1_800_000_000
    assert claims["exp"] == 1_800_000_090
    assert all(type(claims[k]) is int for k in ("iat", "nbf", "exp"))
    assert (minted.expires_in, minted.expires_at) == (90, claims["exp"])


def test_jti_is_unique_per_token() -> None:
    issuer = make_issuer()
    jtis = [mint_now(issuer).jti for _ in range(5)]
    assert len(set(jtis)) == 5


def test_audiences_several_as_array_none_as_op_default() -> None:
    """Fact 21: with no audience asked for (the server sends ``[""]``) the OP's default."""
    issuer = make_issuer()
    many = issuer.mint(scopes=[VO], audiences=[SE, "https://b.example"], now=time.time())
    assert verify_like_storage(issuer, many.access_token)["aud"] == [SE, "https://b.example"]
    assert many.audiences == (SE, "https://b.example")
    for audiences in ([], [""], ["", ""]):
        minted = issuer.mint(scopes=[VO], audiences=audiences, now=time.time())
        assert verify_like_storage(issuer, minted.access_token, ANY_AUDIENCE)["aud"] == (
            ANY_AUDIENCE
        )
        assert minted.audiences == (ANY_AUDIENCE,)


def test_op_grants_only_what_the_user_may_have() -> None:
    issuer = make_issuer()
    minted = issuer.mint(
        scopes=[VO + "/out", "storage.modify:/vo", "storage.create:/vobargain"],
        audiences=[SE],
        now=time.time(),
    )
    assert verify_like_storage(issuer, minted.access_token)["scope"] == VO + "/out"
    everything = issuer.mint(scopes=[""], audiences=[SE], now=time.time())
    assert everything.scope.split() == list(ALLOWED)
    with pytest.raises(ApiError) as err:
        issuer.mint(scopes=["compute.create"], audiences=[SE], now=time.time())
    assert (err.value.status, err.value.error) == (400, "oidc_error")
    assert err.value.description.startswith("invalid_scope: ")


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_discovery_leads_a_verifier_to_this_issuers_key(alg: str) -> None:
    issuer = make_issuer(alg)
    doc = issuer.discovery()
    assert doc["issuer"] == OP and doc["jwks_uri"] == OP + "/jwks"
    assert doc["id_token_signing_alg_values_supported"] == [alg]
    assert doc["scopes_supported"] == list(ALLOWED)
    assert "wlcg.ver" in doc["claims_supported"]


# --- token faults: each breaks what it promises, and nothing else ---------------------------------

FAULT_TESTS = {
    "wider_scope": "test_wider_scope_fault_adds_storage_modify_root",
    "wrong_audience": "test_wrong_audience_fault_is_refused_only_for_its_audience",
    "stale_exp": "test_stale_exp_fault_repeats_the_previous_tokens_exp",
    "expired": "test_expired_fault_is_a_correctly_signed_token_past_its_exp",
    "alg_none": "test_unsigned_and_hmac_faults_look_right_but_fail_verification",
    "hs256": "test_unsigned_and_hmac_faults_look_right_but_fail_verification",
}


def test_every_token_fault_has_a_test_here() -> None:
    assert set(FAULT_TESTS) == set(TOKEN_FAULTS)
    assert all(name in globals() for name in FAULT_TESTS.values())


def test_wider_scope_fault_adds_storage_modify_root() -> None:
    issuer = make_issuer()
    minted = mint_now(issuer, "wider_scope")
    claims = verify_like_storage(issuer, minted.access_token)
    assert WIDER_SCOPE == "storage.modify:/"
    assert claims["scope"].split() == [VO, WIDER_SCOPE]
    assert minted.scope == claims["scope"]  # the AT response tells the same story


def test_wrong_audience_fault_is_refused_only_for_its_audience() -> None:
    issuer = make_issuer()
    minted = mint_now(issuer, "wrong_audience")
    with pytest.raises(jwt.InvalidAudienceError):
        verify_like_storage(issuer, minted.access_token, SE)
    claims = verify_like_storage(issuer, minted.access_token, WRONG_AUDIENCE)
    assert claims["aud"] == WRONG_AUDIENCE and claims["scope"] == VO
    assert minted.audiences == (WRONG_AUDIENCE,)


def test_stale_exp_fault_repeats_the_previous_tokens_exp() -> None:
    clock = FakeClock()
    issuer = make_issuer()
    first = mint_now(issuer, "stale_exp", now=clock.now())  # nothing to repeat yet
    assert first.expires_at == int(clock.now()) + 1200
    clock.advance(300)
    stale = mint_now(issuer, "stale_exp", now=clock.now())
    claims = verify_like_storage(issuer, stale.access_token, check_times=False)
    assert claims["exp"] == stale.expires_at == first.expires_at
    assert claims["iat"] == int(clock.now())  # a new token...
    assert stale.jti != first.jti
    assert stale.expires_in == 900  # ...whose response matches its exp


def test_expired_fault_is_a_correctly_signed_token_past_its_exp() -> None:
    issuer = make_issuer()
    now = time.time()
    minted = mint_now(issuer, "expired", now=now)
    with pytest.raises(jwt.ExpiredSignatureError):
        verify_like_storage(issuer, minted.access_token)
    claims = verify_like_storage(issuer, minted.access_token, check_times=False)
    assert claims["exp"] < now and claims["iat"] < claims["exp"]
    assert minted.expires_in == 0


@pytest.mark.parametrize(("fault", "alg"), [("alg_none", "none"), ("hs256", "HS256")])
def test_unsigned_and_hmac_faults_look_right_but_fail_verification(fault: str, alg: str) -> None:
    issuer = make_issuer()
    minted = mint_now(issuer, fault)
    assert jwt.get_unverified_header(minted.access_token)["alg"] == alg
    looks = jwt.decode(minted.access_token, options={"verify_signature": False})
    assert (looks["iss"], looks["aud"], looks["scope"]) == (OP, SE, VO)
    assert looks["exp"] > time.time()
    with pytest.raises(jwt.InvalidTokenError):
        jwt.decode(
            minted.access_token,
            issuer.key.public_key,
            algorithms=[issuer.key.alg],
            audience=SE,
        )


def test_faults_do_not_leak_into_the_next_token() -> None:
    issuer = make_issuer()
    for fault in TOKEN_FAULTS:
        mint_now(issuer, fault)
        after = mint_now(issuer)
        claims = verify_like_storage(issuer, after.access_token)
        assert (claims["scope"], claims["aud"]) == (VO, SE), fault


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (None, (["a"], ["x"], 1000, 2200)),
        ("hs256", (["a"], ["x"], 1000, 2200)),
        ("wider_scope", (["a", WIDER_SCOPE], ["x"], 1000, 2200)),
        ("wrong_audience", (["a"], [WRONG_AUDIENCE], 1000, 2200)),
        ("stale_exp", (["a"], ["x"], 1000, 1500)),
        ("expired", (["a"], ["x"], 1000 - 1200 - 60, 1000 - 60)),
    ],
)
def test_each_token_fault_changes_only_its_own_part(fault, expected) -> None:
    assert with_token_fault(fault, ["a"], ["x"], 1000, 2200, last_exp=1500,
                            lifetime_s=1200) == expected


def test_a_stale_exp_needs_a_previous_token() -> None:
    assert with_token_fault("stale_exp", ["a"], ["x"], 1000, 2200, last_exp=None,
                            lifetime_s=1200)[3] == 2200
