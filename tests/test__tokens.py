from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from jobtoken import _tokens
from jobtoken._errors import TokenCheckError
from jobtoken._tokens import (
    MAX_TOKEN_CHARS,
    AccessToken,
    check_access_token,
    decode_access_token,
    describe,
    looks_like_jwt,
)

NOW = 1_800_000_000.0
_EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _claims(**overrides):
    claims = {
        "iss": "https://op.example.org",
        "sub": "user-1",
        "jti": "jti-1",
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 70,
        "exp": int(NOW) + 1200,
        "aud": "https://se.example.org",
        "scope": "storage.create:/vo/jobs/42 openid",
        "wlcg.ver": "1.0",
    }
    for key, value in overrides.items():
        if value is _DROP:
            claims.pop(key, None)
        else:
            claims[key] = value
    return claims


_DROP = object()


def make_token(headers=None, **overrides) -> str:
    return jwt.encode(
        _claims(**overrides), _EC_KEY, algorithm="ES256", headers={"kid": "k1", **(headers or {})}
    )


def _b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def handmade(header, payload, signature="c2ln") -> str:
    return f"{_b64(header)}.{_b64(payload)}.{signature}"


def test_decode_reads_claims_and_header():
    raw = make_token()
    tok = decode_access_token(raw + "\n")
    assert tok.raw == raw
    assert tok.issuer == "https://op.example.org"
    assert tok.subject == "user-1"
    assert tok.jti == "jti-1"
    assert tok.expires_at == NOW + 1200
    assert tok.issued_at == NOW - 10
    assert tok.not_before == NOW - 70
    assert tok.scopes == ("storage.create:/vo/jobs/42", "openid")
    assert tok.audiences == ("https://se.example.org",)
    assert tok.wlcg_ver == "1.0"
    assert (tok.algorithm, tok.key_id) == ("ES256", "k1")
    assert tok.remaining_s(NOW) == 1200


def test_repr_never_contains_the_token():
    raw = make_token()
    tok = decode_access_token(raw)
    text = repr(tok)
    assert raw not in text
    assert raw.split(".")[1] not in text
    assert "jti-1" in text


def test_audience_array_and_optional_claims():
    tok = decode_access_token(
        make_token(aud=["a", "b"], nbf=_DROP, iat=_DROP, scope=_DROP, **{"wlcg.ver": _DROP})
    )
    assert tok.audiences == ("a", "b")
    assert tok.not_before is None and tok.issued_at is None
    assert tok.scopes == () and not tok.has_scope_claim
    assert tok.wlcg_ver is None


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("", "not a JWT"),
        ("not-a-token", "not a JWT"),
        ("a.b", "not a JWT"),
        ("a b.c.d", "not a JWT"),
        ("x" * (MAX_TOKEN_CHARS + 1), "longer than"),
        ("e30.e30.", "no 'alg'"),
        ("!!!.e30.abc", "not a JWT"),
        ("Zm9v.e30.abc", "unreadable JWT header"),
    ],
)
def test_decode_refuses_non_jwts(raw, why):
    with pytest.raises(TokenCheckError, match=why):
        decode_access_token(raw)


def test_decode_refuses_alg_none():
    raw = handmade({"alg": "none", "typ": "JWT"}, _claims(), signature="")
    with pytest.raises(TokenCheckError, match="alg 'none'"):
        decode_access_token(raw)


def test_decode_refuses_hmac():
    raw = jwt.encode(_claims(), "s" * 32, algorithm="HS256")
    with pytest.raises(TokenCheckError, match="symmetric"):
        decode_access_token(raw)


def test_decode_refuses_unknown_algorithm():
    with pytest.raises(TokenCheckError, match="unsupported JWT algorithm"):
        decode_access_token(handmade({"alg": "XY999"}, _claims()))


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"exp": _DROP}, "no 'exp'"),
        ({"exp": "1800001200"}, "'exp' claim is not a number"),
        ({"exp": True}, "'exp' claim is not a number"),
        ({"iat": "yesterday"}, "'iat' claim is not a number"),
        ({"nbf": [1]}, "'nbf' claim is not a number"),
        ({"aud": 5}, "'aud' claim"),
        ({"scope": {"a": 1}}, "'scope' claim"),
        ({"iss": 7}, "'iss' claim is not a string"),
        ({"wlcg.ver": {"v": 1}}, "'wlcg.ver'"),
    ],
)
def test_decode_refuses_bad_claims(overrides, why):
    raw = handmade({"alg": "ES256", "kid": "k1"}, _claims(**overrides))
    with pytest.raises(TokenCheckError, match=why) as info:
        decode_access_token(raw)
    assert raw not in str(info.value)
    assert "\n" not in str(info.value)


def test_decode_refuses_non_object_payload():
    header = _b64({"alg": "ES256"})
    payload = base64.urlsafe_b64encode(b"[1,2]").rstrip(b"=").decode()
    with pytest.raises(TokenCheckError, match="unreadable JWT claims"):
        decode_access_token(f"{header}.{payload}.c2ln")


def test_decode_error_never_echoes_token():
    raw = handmade({"alg": "ES256"}, {"exp": "soon", "secret": "s3cr3t-marker"})
    with pytest.raises(TokenCheckError) as info:
        decode_access_token(raw)
    assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("aaa.bbb.ccc", True),
        ("aaa.bbb.ccc\n", True),
        ("aaa.bbb.", True),
        ("aaa.bbb", False),
        ("aaa.bbb.ccc.ddd", False),
        ("aa a.bbb.ccc", False),
        ("", False),
        (None, False),
    ],
)
def test_looks_like_jwt(raw, expected):
    assert looks_like_jwt(raw) is expected


def _prev(**claims) -> AccessToken:
    """The token being replaced (by default: the same claims as ``make_token``'s)."""
    return decode_access_token(make_token(**claims))


def _check(tok: AccessToken, **kwargs):
    args = {
        "requested_scopes": ("storage.create:/vo/jobs/42", "openid"),
        "requested_audiences": ("https://se.example.org",),
        "now": NOW,
    }
    args.update(kwargs)
    check_access_token(tok, **args)


def test_check_accepts_the_token_that_was_asked_for():
    _check(decode_access_token(make_token()))


def test_check_accepts_narrower_scopes_than_requested():
    tok = decode_access_token(make_token(scope="storage.create:/vo/jobs/42/out"))
    _check(tok)


def test_check_accepts_when_nothing_was_requested():
    tok = decode_access_token(make_token(scope=_DROP, aud=_DROP))
    _check(tok, requested_scopes=(), requested_audiences=())


@pytest.mark.parametrize(
    ("overrides", "kwargs", "why"),
    [
        ({"exp": int(NOW) - 1}, {}, "expired"),
        ({"exp": int(NOW)}, {}, "expired"),
        ({"exp": int(NOW) + 30}, {"min_valid_s": 60}, "valid for only 30s"),
        ({"nbf": int(NOW) + 301}, {}, "'nbf' .* in the future"),
        ({"iat": int(NOW) + 3600}, {}, "'iat' .* in the future"),
        ({"scope": "storage.create:/vo"}, {}, "beyond the request: storage.create:/vo"),
        ({"scope": "storage.modify:/vo/jobs/42"}, {}, "beyond the request"),
        ({"scope": "storage.create:/vo/jobs/42x"}, {}, "beyond the request"),
        ({"scope": _DROP}, {}, "has no scopes"),
        ({"scope": ""}, {}, "has no scopes"),
        ({"scope": "storage.create"}, {}, "invalid scopes"),
        ({"aud": _DROP}, {}, "lacks audience https://se.example.org"),
        ({"aud": ["https://se.example.org/"]}, {}, "lacks audience"),
        ({"aud": "https://wlcg.cern.ch/jwt/v1/any"}, {}, "lacks audience"),
        # exp did not move although the token is newer: a stale exp
        ({}, {"previous": _prev(exp=int(NOW) + 1200, iat=int(NOW) - 20)}, "did not extend"),
        ({}, {"previous": _prev(exp=int(NOW) + 5000)}, "did not extend"),
        # the very same token handed out again
        ({}, {"previous": _prev()}, "did not extend"),
    ],
)
def test_check_refuses(overrides, kwargs, why):
    raw = make_token(**overrides)
    tok = decode_access_token(raw)
    with pytest.raises(TokenCheckError, match=why) as info:
        _check(tok, **kwargs)
    assert raw not in str(info.value)
    assert "jti=jti-1" in str(info.value)


def test_check_tolerates_small_clock_skew():
    _check(decode_access_token(make_token(nbf=int(NOW) + 299, iat=int(NOW) + 200)))


def test_check_accepts_multiple_requested_audiences_and_moved_exp():
    tok = decode_access_token(make_token(aud=["x", "https://se.example.org"]))
    _check(
        tok,
        requested_audiences=("https://se.example.org", "x"),
        previous=_prev(exp=int(NOW) + 600),
        min_valid_s=1000,
    )


@pytest.mark.parametrize(
    ("aud", "why"),
    [
        (["x", "https://se.example.org"], "audiences beyond the request: x"),
        # the WLCG wildcard makes the token good at every relying party
        (["https://se.example.org", "https://wlcg.cern.ch/jwt/v1/any"], "beyond the request"),
    ],
)
def test_check_refuses_audiences_that_were_not_asked_for(aud, why):
    with pytest.raises(TokenCheckError, match=why):
        _check(decode_access_token(make_token(aud=aud)))


def test_check_accepts_the_wildcard_audience_when_asked_for():
    tok = decode_access_token(make_token(aud="https://wlcg.cern.ch/jwt/v1/any"))
    _check(tok, requested_audiences=("https://wlcg.cern.ch/jwt/v1/any",))


@pytest.mark.parametrize(
    "scope",
    [
        # what INDIGO IAM answers to the real Mytoken server's scoped refresh, which
        # always appends offline_access (oidc-mytoken/server oidcreqres/request.go)
        "storage.create:/vo/jobs/42 openid offline_access",
        "storage.create:/vo/jobs/42 profile email address phone wlcg wlcg:1.0",
    ],
)
def test_check_ignores_identity_scopes_that_grant_no_right(scope):
    tok = decode_access_token(make_token(scope=scope))
    _check(tok, requested_scopes=("storage.create:/vo/jobs/42",))


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"wlcg.groups": ["/vo"]}, "groups that were not requested: /vo"),
        ({"scp": "storage.modify:/"}, "'scp' claim granting beyond the request: storage.modify:/"),
        ({"scp": ["storage.read:/vo"]}, "'scp' claim"),
        ({"scope": "storage.create:/vo/jobs/42 compute.create"}, "beyond the request: compute"),
    ],
)
def test_check_refuses_unrequested_capabilities_and_groups(overrides, why):
    with pytest.raises(TokenCheckError, match=why):
        _check(decode_access_token(make_token(**overrides)))


def test_check_accepts_requested_groups_and_a_narrow_scp():
    requested = ("storage.create:/vo/jobs/42", "wlcg.groups:/vo/prod")
    tok = decode_access_token(
        make_token(**{"wlcg.groups": ["/vo/prod"], "scp": "storage.create:/vo/jobs/42/a"})
    )
    _check(tok, requested_scopes=requested)
    with pytest.raises(TokenCheckError, match="not requested: /vo/admin"):
        _check(
            decode_access_token(make_token(**{"wlcg.groups": ["/vo/prod", "/vo/admin"]})),
            requested_scopes=requested,
        )
    # the bare scope asks for the user's default groups, whatever they are
    _check(
        decode_access_token(make_token(**{"wlcg.groups": ["/vo", "/vo/x"]})),
        requested_scopes=("storage.create:/vo/jobs/42", "wlcg.groups"),
    )


def _with_payload(payload_json: str) -> str:
    header, _, signature = make_token().split(".")
    body = base64.urlsafe_b64encode(payload_json.encode()).rstrip(b"=").decode()
    return f"{header}.{body}.{signature}"


def test_decode_refuses_duplicate_claim_keys():
    # the wide value first: parsers that keep the first key would see it
    claims = json.dumps(_claims())[:-1]
    raw = _with_payload(claims + ', "scope": "storage.create:/vo/jobs/42"}')
    raw_wide = _with_payload(
        '{"scope": "storage.modify:/", ' + json.dumps(_claims())[1:]
    )
    for token in (raw, raw_wide):
        with pytest.raises(TokenCheckError, match="repeat the key 'scope'"):
            decode_access_token(token)
    nested = _with_payload(json.dumps(_claims())[:-1] + ', "x": {"a": 1, "a": 2}}')
    with pytest.raises(TokenCheckError, match="repeat the key 'a'"):
        decode_access_token(nested)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        # a 400-digit exp is valid JSON, and an OverflowError for float()
        (json.dumps(_claims())[:-1] + ', "exp": ' + "9" * 400 + "}", "not a finite number"),
        ("[" * 2000 + "]" * 2000, "unreadable JWT claims"),
    ],
)
def test_decode_refuses_unusable_values_with_a_one_line_error(payload, why):
    payload = payload.replace(f'"exp": {int(NOW) + 1200}, ', "", 1)
    with pytest.raises(TokenCheckError, match=why):
        decode_access_token(_with_payload(payload))


def test_check_accepts_a_new_token_from_the_same_second():
    # whole-second times: renewing in the second the current token was issued gives the
    # same iat and exp, and a token just as good (ensure right after prepare)
    _check(decode_access_token(make_token()), previous=_prev(jti="jti-0"))


def test_describe_is_a_non_secret_summary():
    raw = make_token(aud=["a", "b"])
    summary = describe(decode_access_token(raw))
    assert summary == {
        "iss": "https://op.example.org",
        "sub": "user-1",
        "jti": "jti-1",
        "scopes": ["storage.create:/vo/jobs/42", "openid"],
        "audiences": ["a", "b"],
        "iat": NOW - 10,
        "nbf": NOW - 70,
        "exp": NOW + 1200,
        "wlcg.ver": "1.0",
        "alg": "ES256",
        "kid": "k1",
    }
    assert raw not in json.dumps(summary)


def test_check_treats_a_string_request_as_the_space_separated_form():
    tok = decode_access_token(make_token())
    _check(
        tok,
        requested_scopes="storage.create:/vo/jobs/42 openid",
        requested_audiences="https://se.example.org",
    )
    wide = decode_access_token(make_token(scope="storage.create:/vo/jobs/42 storage.read:/vo"))
    with pytest.raises(TokenCheckError, match="beyond the request"):
        _check(wide, requested_scopes="storage.create:/vo/jobs/42")


@pytest.mark.parametrize(
    ("groups", "wanted", "unasked"),
    [
        (("/cms",), ("wlcg.groups",), []),
        (("/cms", "/cms/prod"), ("wlcg.groups:/cms",), ["/cms/prod"]),
        (("/cms",), ("storage.read:/",), ["/cms"]),
        ((), ("storage.read:/",), []),
    ],
)
def test_groups_the_request_did_not_name(groups, wanted, unasked):
    assert _tokens._unasked_groups(groups, wanted) == unasked


@pytest.mark.parametrize(("ver", "text"), [(None, None), ("1.0", "1.0"), (1.0, "1.0"), (1, "1")])
def test_wlcg_version_may_arrive_as_a_number(ver, text):
    assert _tokens._wlcg_version(ver) == text


@pytest.mark.parametrize("ver", [True, ["1.0"], {"v": 1}])
def test_wlcg_version_of_another_type_is_refused(ver):
    with pytest.raises(TokenCheckError, match="wlcg.ver"):
        _tokens._wlcg_version(ver)
