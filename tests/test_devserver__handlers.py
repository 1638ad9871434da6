"""Mytoken API v0 behaviour of the dev server over real HTTP.

Every fact of section 9 of the Mytoken reference that a server must honour has its own
test here; the docstring names the fact number.
"""

from __future__ import annotations

from typing import Iterator

import httpx
import jwt
import pytest

from jobtoken.devserver import DevServer
from jobtoken.devserver._handlers import (
    cookie_mytoken,
    response_type_for_length,
    scopes_and_audience_to_use,
)
from jobtoken.devserver._restrictions import Restriction
from tests.devserver_fixtures import (
    access_token_request,
    client_for,
    decode_unverified,
    running_devserver,
    sub_mytoken_request,
)
from tests.fakes import FakeClock

VO = "storage.create:/vo"
SE = "https://se.example.org"
OP_SCOPES = ("openid", "storage.read:/", "storage.create:/vo")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def srv(clock: FakeClock) -> Iterator[DevServer]:
    with running_devserver(clock=clock, op_scopes=OP_SCOPES) as server:
        yield server


@pytest.fixture
def client(srv: DevServer) -> Iterator[httpx.Client]:
    with client_for(srv) as c:
        yield c


def restricted_mt(srv: DevServer, **extra: object) -> str:
    entry = {"scope": VO, "audience": [SE]}
    entry.update(extra)
    return srv.issue_mytoken(restrictions=[entry])


# --- discovery -----------------------------------------------------------------------------


def test_discovery_lists_api_v0_endpoints_and_provider(srv: DevServer, client: httpx.Client):
    """Fact 10: endpoints live under /api/v0 and are found through discovery."""
    doc = client.get("/.well-known/mytoken-configuration").json()
    assert doc["issuer"] == srv.url
    assert doc["access_token_endpoint"] == srv.url + "/api/v0/token/access"
    assert doc["mytoken_endpoint"] == srv.url + "/api/v0/token/my"
    assert doc["revocation_endpoint"] == srv.url + "/api/v0/token/revoke"
    assert doc["tokeninfo_endpoint"] == srv.url + "/api/v0/tokeninfo"
    assert doc["token_endpoint"] == doc["access_token_endpoint"]
    assert doc["jwks_uri"] == srv.url + "/jwks"
    assert doc["providers_supported"][0]["issuer"] == srv.op_issuer
    assert doc["token_signing_alg_value"] == "ES512"
    assert doc["access_token_endpoint_grant_types_supported"] == ["mytoken"]
    assert "mytoken" in doc["mytoken_endpoint_grant_types_supported"]
    assert "introspect" in doc["tokeninfo_endpoint_actions_supported"]
    assert "usages_AT" in doc["restriction_claims_supported"]
    assert client.get("/.well-known/openid-configuration").json() == doc


def test_mytoken_is_es512_jwt_verifiable_with_server_jwks(srv: DevServer, client: httpx.Client):
    mt = srv.issue_mytoken(rotation={"on_AT": True})
    header = jwt.get_unverified_header(mt)
    assert header["typ"] == "MT+JWT" and header["alg"] == "ES512" and header["kid"]
    jwks = jwt.PyJWKSet.from_dict(client.get("/jwks").json())
    claims = jwt.decode(
        mt,
        jwks[header["kid"]].key,
        algorithms=["ES512"],
        audience=srv.url,
        options={"verify_iat": False, "verify_nbf": False},
    )
    for key in (
        "ver",
        "token_type",
        "iss",
        "sub",
        "nbf",
        "iat",
        "jti",
        "seq_no",
        "aud",
        "oidc_sub",
        "oidc_iss",
        "capabilities",
        "rotation",
    ):
        assert key in claims
    assert claims["token_type"] == "mytoken" and claims["seq_no"] == 1
    assert claims["iss"] == claims["aud"] == srv.url
    assert claims["oidc_iss"] == srv.op_issuer


# --- access token endpoint ------------------------------------------------------------------


def test_at_is_wlcg_profile_jwt_verified_by_op_jwks(srv: DevServer, client: httpx.Client):
    """Fact 16: aud, iat, jti, wlcg.ver "1.0" present; signed by the OP key with a kid."""
    r = access_token_request(client, restricted_mt(srv), scope=VO, audience=SE)
    assert r.status_code == 200
    at = r.json()["access_token"]
    op_doc = client.get("/op/.well-known/openid-configuration").json()
    assert op_doc["issuer"] == srv.op_issuer
    jwks = jwt.PyJWKSet.from_dict(client.get(op_doc["jwks_uri"].replace(srv.url, "")).json())
    kid = jwt.get_unverified_header(at)["kid"]
    claims = jwt.decode(
        at,
        jwks[kid].key,
        algorithms=["RS256"],
        audience=SE,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims["wlcg.ver"] == "1.0"
    assert claims["iss"] == srv.op_issuer and claims["sub"] == "dev-user"
    assert claims["scope"] == VO
    assert claims["exp"] - claims["iat"] == 1200
    assert claims["jti"] and claims["client_id"]


def test_at_request_strings_and_response_audience_array(srv: DevServer, client: httpx.Client):
    """Fact 4: scope/audience are space-separated strings in; audience is a JSON array out."""
    mt = srv.issue_mytoken(restrictions=[{"scope": f"{VO} openid", "audience": [SE, "b"]}])
    r = access_token_request(client, mt, scope=f"{VO} openid", audience=f"{SE} b")
    assert r.status_code == 200
    body = r.json()
    assert body["audience"] == [SE, "b"]
    assert body["scope"] == f"{VO} openid"
    assert body["token_type"] == "Bearer" and body["expires_in"] == 1200  # fact 19
    bad = access_token_request(client, mt, scope=[VO])
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"


def test_form_body_and_issuer_form_field(srv: DevServer, client: httpx.Client):
    """Fact 9: the AT endpoint takes form bodies; there the issuer field is ``issuer``."""
    mt = restricted_mt(srv)
    ok = access_token_request(client, mt, form=True, scope=VO, audience=SE, issuer=srv.op_issuer)
    assert ok.status_code == 200
    wrong = access_token_request(client, mt, form=True, issuer="https://other-op")
    assert wrong.status_code == 400
    assert wrong.json() == {
        "error": "invalid_request",
        "error_description": "token not for specified issuer",
    }
    wrong_json = access_token_request(client, mt, oidc_issuer="https://other-op")
    assert wrong_json.status_code == 400


def test_no_restrictions_ignores_requested_scope_and_audience(srv: DevServer, client):
    """Fact 5: without restrictions the server asks the OP for all provider scopes."""
    mt = srv.issue_mytoken()
    r = access_token_request(client, mt, scope="storage.read:/x", audience=SE)
    assert r.status_code == 200
    assert r.json()["scope"].split() == list(OP_SCOPES)
    assert r.json()["audience"] == ["https://wlcg.cern.ch/jwt/v1/any"]


def test_restriction_scope_is_exact_token_match(srv: DevServer, client: httpx.Client):
    """Fact 6: a narrower path than the restriction's scope is 403 usage_restricted."""
    mt = restricted_mt(srv)
    r = access_token_request(client, mt, scope=VO + "/jobs/42", audience=SE)
    assert r.status_code == 403
    assert r.json()["error"] == "usage_restricted"


def test_unrestricted_scope_entry_lets_op_grant_narrower_path(srv: DevServer, client):
    """The OP itself applies WLCG path semantics (per path component)."""
    mt = srv.issue_mytoken(restrictions=[{"audience": [SE]}])
    r = access_token_request(client, mt, scope=VO + "/jobs/42", audience=SE)
    assert r.status_code == 200 and r.json()["scope"] == VO + "/jobs/42"
    denied = access_token_request(client, mt, scope="storage.create:/vobargain", audience=SE)
    assert denied.status_code == 400 and denied.json()["error"] == "oidc_error"  # fact 8


def test_no_requested_audience_gets_op_default_not_restriction_audience(srv, client):
    """Fact 21: the used restriction's audience is not forwarded when none is requested."""
    r = access_token_request(client, restricted_mt(srv))
    assert r.status_code == 200
    assert r.json()["audience"] == ["https://wlcg.cern.ch/jwt/v1/any"]
    assert r.json()["scope"] == VO  # the restriction's scope is used when none is requested


def test_unknown_grant_type_is_invalid_grant(srv: DevServer, client: httpx.Client):
    """Fact 7: unknown grant_type is 400 invalid_grant "Unsupported grant_type"."""
    mt = restricted_mt(srv)
    for grant in ("urn:ietf:params:oauth:grant-type:token-exchange", ""):
        r = client.post("/api/v0/token/access", json={"grant_type": grant, "mytoken": mt})
        assert r.status_code == 400
        assert r.json() == {"error": "invalid_grant", "error_description": "Unsupported grant_type"}


def test_refresh_token_alias_field_and_bearer_header(srv: DevServer, client: httpx.Client):
    mt = restricted_mt(srv)
    r = client.post(
        "/api/v0/token/access", json={"grant_type": "refresh_token", "refresh_token": mt}
    )
    assert r.status_code == 200
    r = client.post(
        "/api/v0/token/access",
        json={"grant_type": "mytoken"},
        headers={"Authorization": f"Bearer {mt}"},
    )
    assert r.status_code == 200
    r = client.post("/api/v0/token/access", json={"grant_type": "mytoken"})
    assert r.status_code == 401
    assert r.json() == {
        "error": "invalid_token",
        "error_description": "no mytoken found in request",
    }


def test_unknown_short_token_and_short_string_are_invalid_request(srv, client):
    """Fact 7: unknown/revoked short token (and < 32 chars) is 400 invalid_request."""
    for token in ("x" * 64, "tooshort"):
        r = access_token_request(client, token)
        assert r.status_code == 400
        assert r.json() == {"error": "invalid_request", "error_description": "token not valid"}
    short = srv.issue_mytoken(response_type="short_token")
    assert len(short) >= 32 and "." not in short
    assert access_token_request(client, short).status_code == 200
    assert client.post("/api/v0/token/revoke", json={"token": short}).status_code == 204
    r = access_token_request(client, short)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_revoked_jwt_is_401_invalid_token_without_description(srv, client):
    """Fact 7: a revoked JWT mytoken gives 401 invalid_token; description may be absent."""
    mt = restricted_mt(srv)
    assert client.post("/api/v0/token/revoke", json={"token": mt}).status_code == 204
    r = access_token_request(client, mt)
    assert r.status_code == 401 and r.json() == {"error": "invalid_token"}


def test_bad_signature_is_401(srv: DevServer, client: httpx.Client):
    mt = restricted_mt(srv)
    head, payload, sig = mt.split(".")
    tampered = f"{head}.{payload}.{sig[:-4]}AAAA"
    r = access_token_request(client, tampered)
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"


def test_jwt_expiry_401_but_entry_time_window_403(srv, client, clock: FakeClock):
    """Fact 8: JWT exp failure is 401 invalid_token; an entry's window failing is 403."""
    now = int(clock.now())
    expiring = srv.issue_mytoken(restrictions=[{"scope": VO, "exp": now + 60}])
    two_windows = srv.issue_mytoken(
        restrictions=[{"scope": VO, "exp": now + 60}, {"scope": VO, "nbf": now + 600}]
    )
    clock.advance(120)
    r = access_token_request(client, expiring)
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    assert "expired" in r.json()["error_description"]
    # JWT exp of two_windows is unlimited (one entry has no exp); no entry usable right now
    r = access_token_request(client, two_windows)
    assert r.status_code == 403 and r.json()["error"] == "usage_restricted"
    clock.advance(600)
    assert access_token_request(client, two_windows).status_code == 200


def test_missing_at_capability_is_403(srv: DevServer, client: httpx.Client):
    mt = srv.issue_mytoken(capabilities=["tokeninfo"])
    r = access_token_request(client, mt)
    assert r.status_code == 403 and r.json()["error"] == "insufficient_capabilities"


def test_usages_at_counted_per_entry_used_lt_limit(srv: DevServer, client: httpx.Client):
    mt = srv.issue_mytoken(
        restrictions=[{"scope": VO, "usages_AT": 2}, {"scope": "storage.read:/", "usages_AT": 1}]
    )
    assert access_token_request(client, mt, scope=VO).status_code == 200
    assert access_token_request(client, mt, scope=VO).status_code == 200
    r = access_token_request(client, mt, scope=VO)
    assert r.status_code == 403 and r.json()["error"] == "usage_restricted"
    assert access_token_request(client, mt, scope="storage.read:/").status_code == 200
    entries = srv.introspect(mt)["token"]["restrictions"]
    assert [e.get("usages_AT_done") for e in entries] == [2, 1]


def test_failed_at_request_does_not_count_usage(srv: DevServer, client: httpx.Client):
    mt = srv.issue_mytoken(restrictions=[{"audience": [SE], "usages_AT": 1}])
    r = access_token_request(client, mt, scope="storage.modify:/x", audience=SE)
    assert r.status_code == 400 and r.json()["error"] == "oidc_error"
    assert access_token_request(client, mt, audience=SE).status_code == 200


def test_hosts_restriction(srv: DevServer, client: httpx.Client):
    allowed = srv.issue_mytoken(restrictions=[{"hosts": ["127.0.0.0/8"]}])
    other = srv.issue_mytoken(restrictions=[{"hosts": ["192.0.2.0/24"]}])
    this = srv.issue_mytoken(restrictions=[{"hosts": ["this"]}])
    assert access_token_request(client, allowed).status_code == 200
    assert access_token_request(client, this).status_code == 200
    r = access_token_request(client, other)
    assert r.status_code == 403 and r.json()["error"] == "usage_restricted"


# --- rotation ------------------------------------------------------------------------------


def test_rotation_returns_token_update_and_kills_old_token(srv, client):
    """Facts 1 and 2: token_update.mytoken / mytoken_type; old MT dead at once."""
    mt = srv.issue_mytoken(rotation={"on_AT": True}, restrictions=[{"scope": VO}])
    r = access_token_request(client, mt, scope=VO)
    assert r.status_code == 200
    update = r.json()["token_update"]
    assert update["mytoken_type"] == "token"
    assert update["rotation"] == {"on_AT": True}
    assert "mytoken" not in r.json() and "refresh_token" not in r.json()
    new = update["mytoken"]
    assert decode_unverified(new)["seq_no"] == 2
    stale = access_token_request(client, mt, scope=VO)
    assert stale.status_code == 401 and stale.json() == {"error": "invalid_token"}
    assert access_token_request(client, new, scope=VO).status_code == 200


def test_short_token_rotates_to_new_short_token(srv: DevServer, client: httpx.Client):
    short = srv.issue_mytoken(rotation={"on_AT": True}, response_type="short_token")
    update = access_token_request(client, short).json()["token_update"]
    assert update["mytoken_type"] == "short_token" and update["mytoken"] != short
    assert access_token_request(client, short).status_code == 401
    assert access_token_request(client, update["mytoken"]).status_code == 200


def test_auto_revoke_kills_chain_and_descendants_on_stale_use(srv, client):
    """Fact 2: with auto_revoke one stale retry revokes the chain and its descendants."""
    mt = srv.issue_mytoken(
        capabilities=["AT", "create_mytoken"],
        rotation={"on_AT": True, "auto_revoke": True},
    )
    child = sub_mytoken_request(client, mt, capabilities=["AT"]).json()["mytoken"]
    new = access_token_request(client, mt).json()["token_update"]["mytoken"]
    assert access_token_request(client, mt).status_code == 401  # stale retry
    assert access_token_request(client, new).json() == {"error": "invalid_token"}
    assert access_token_request(client, child).status_code == 401


def test_rotation_lifetime_kills_unused_chain(srv, client, clock: FakeClock):
    mt = srv.issue_mytoken(rotation={"on_AT": True, "lifetime": 100})
    new = access_token_request(client, mt).json()["token_update"]
    assert new["expires_in"] == 100
    clock.advance(90)
    newer = access_token_request(client, new["mytoken"]).json()["token_update"]["mytoken"]
    clock.advance(101)
    assert access_token_request(client, newer).status_code == 401


# --- sub-mytokens ---------------------------------------------------------------------------


def test_sub_mytoken_tightens_and_intersects(srv: DevServer, client: httpx.Client):
    parent = srv.issue_mytoken(
        capabilities=["AT", "create_mytoken", "tokeninfo"],
        restrictions=[{"scope": VO, "audience": [SE], "usages_AT": 10}],
    )
    r = sub_mytoken_request(
        client,
        parent,
        capabilities=["AT", "settings"],
        name="job 42",
        restrictions=[{"scope": VO, "audience": [SE], "usages_AT": 3}],
    )
    assert r.status_code == 200
    body = r.json()
    assert body["mytoken_type"] == "token" and body["mom_id"]
    assert body["capabilities"] == ["AT"]
    assert body["restrictions"] == [{"scope": VO, "audience": [SE], "usages_AT": 3}]
    child = decode_unverified(body["mytoken"])
    assert child["name"] == "job 42" and child["seq_no"] == 1
    assert access_token_request(client, body["mytoken"], scope=VO, audience=SE).status_code == 200


def test_sub_mytoken_wider_restrictions_dropped_or_400(srv: DevServer, client: httpx.Client):
    parent = srv.issue_mytoken(
        capabilities=["AT", "create_mytoken"], restrictions=[{"scope": VO, "usages_AT": 5}]
    )
    wider = [{"scope": "storage.read:/", "usages_AT": 5}]
    lenient = sub_mytoken_request(client, parent, restrictions=wider)
    assert lenient.status_code == 200
    assert lenient.json()["restrictions"] == [{"scope": VO, "usages_AT": 5}]
    strict = sub_mytoken_request(client, parent, restrictions=wider, error_on_restrictions=True)
    assert strict.status_code == 400
    assert strict.json() == {
        "error": "invalid_request",
        "error_description": "requested restrictions are not subset of original restrictions",
    }


def test_sub_mytoken_empty_capability_intersection_is_400(srv, client):
    parent = srv.issue_mytoken(capabilities=["AT", "create_mytoken"])
    r = sub_mytoken_request(client, parent, capabilities=["settings"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_sub_mytoken_needs_create_mytoken(srv: DevServer, client: httpx.Client):
    parent = srv.issue_mytoken(capabilities=["AT"])
    r = sub_mytoken_request(client, parent, capabilities=["AT"])
    assert r.status_code == 403 and r.json()["error"] == "insufficient_capabilities"


def test_sub_mytoken_counts_usages_other_on_parent(srv: DevServer, client: httpx.Client):
    parent = srv.issue_mytoken(
        capabilities=["AT", "create_mytoken"], restrictions=[{"usages_other": 1}]
    )
    assert sub_mytoken_request(client, parent).status_code == 200
    r = sub_mytoken_request(client, parent)
    assert r.status_code == 403 and r.json()["error"] == "usage_restricted"
    assert srv.introspect(parent)["token"]["restrictions"][0]["usages_other_done"] == 1


def test_sub_mytoken_rotates_parent_on_other(srv: DevServer, client: httpx.Client):
    """Fact 3: token_update in a sub-MT response is the PARENT's replacement."""
    parent = srv.issue_mytoken(capabilities=["AT", "create_mytoken"], rotation={"on_other": True})
    body = sub_mytoken_request(client, parent, capabilities=["AT"]).json()
    update = body["token_update"]
    new_parent = decode_unverified(update["mytoken"])
    assert new_parent["jti"] == decode_unverified(parent)["jti"]
    assert new_parent["seq_no"] == 2
    assert decode_unverified(body["mytoken"])["jti"] != new_parent["jti"]
    assert update["capabilities"] == ["AT", "create_mytoken"]
    assert sub_mytoken_request(client, parent).status_code == 401
    assert access_token_request(client, body["mytoken"]).status_code == 200


def test_mytoken_endpoint_requires_json(srv: DevServer, client: httpx.Client):
    """Fact 9: the mytoken endpoint needs a JSON body; form is 400 invalid_request."""
    parent = srv.issue_mytoken()
    r = client.post("/api/v0/token/my", data={"grant_type": "mytoken", "mytoken": parent})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = client.post("/api/v0/token/my?grant_type=mytoken", json={"mytoken": parent})
    assert r.status_code == 200
    r = client.post("/api/v0/token/my", json={"grant_type": "polling_code", "mytoken": parent})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


def test_sub_mytoken_short_token_response(srv: DevServer, client: httpx.Client):
    parent = srv.issue_mytoken()
    body = sub_mytoken_request(client, parent, response_type="short_token").json()
    assert body["mytoken_type"] == "short_token" and len(body["mytoken"]) >= 32
    assert access_token_request(client, body["mytoken"]).status_code == 200


# --- revocation ----------------------------------------------------------------------------


def test_revocation_204_recursive_and_form(srv: DevServer, client: httpx.Client):
    """Fact 9: revocation answers 204 and accepts form bodies."""
    parent = srv.issue_mytoken()
    child = sub_mytoken_request(client, parent).json()["mytoken"]
    grandchild = sub_mytoken_request(client, child).json()["mytoken"]
    other_child = sub_mytoken_request(client, parent).json()["mytoken"]
    r = client.post("/api/v0/token/revoke", data={"token": child, "recursive": "true"})
    assert r.status_code == 204 and r.content == b""
    assert access_token_request(client, child).status_code == 401
    assert access_token_request(client, grandchild).status_code == 401
    assert access_token_request(client, other_child).status_code == 200
    assert access_token_request(client, parent).status_code == 200


def test_non_recursive_revocation_keeps_children(srv: DevServer, client: httpx.Client):
    parent = srv.issue_mytoken()
    child = sub_mytoken_request(client, parent).json()["mytoken"]
    assert client.post("/api/v0/token/revoke", json={"token": parent}).status_code == 204
    assert access_token_request(client, parent).status_code == 401
    assert access_token_request(client, child).status_code == 200


def test_revocation_by_mom_id_and_errors(srv: DevServer, client: httpx.Client):
    parent = srv.issue_mytoken()
    child = sub_mytoken_request(client, parent).json()
    stranger = srv.issue_mytoken(capabilities=["AT"])
    r = client.post("/api/v0/token/revoke", json={"token": stranger, "mom_id": child["mom_id"]})
    assert r.status_code == 403 and r.json()["error"] == "insufficient_capabilities"
    r = client.post("/api/v0/token/revoke", json={"token": parent, "mom_id": child["mom_id"]})
    assert r.status_code == 204
    assert access_token_request(client, child["mytoken"]).status_code == 401
    r = client.post("/api/v0/token/revoke", json={})
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_request", "error_description": "no token given"}
    assert client.post("/api/v0/token/revoke", json={"token": "x" * 40}).status_code == 204


# --- tokeninfo -----------------------------------------------------------------------------


def test_introspect(srv: DevServer, client: httpx.Client):
    mt = srv.issue_mytoken(restrictions=[{"scope": VO, "usages_AT": 3}])
    access_token_request(client, mt)
    r = client.post("/api/v0/tokeninfo", json={"action": "introspect", "mytoken": mt})
    assert r.status_code == 200
    body = r.json()
    assert body["valid"] is True and body["token_type"] == "token" and body["mom_id"]
    assert body["token"]["jti"] == decode_unverified(mt)["jti"]
    assert body["token"]["restrictions"] == [{"scope": VO, "usages_AT": 3, "usages_AT_done": 1}]


def test_introspect_needs_capability_and_valid_token(srv: DevServer, client: httpx.Client):
    no_cap = srv.issue_mytoken(capabilities=["AT"])
    r = client.post("/api/v0/tokeninfo", json={"action": "introspect", "mytoken": no_cap})
    assert r.status_code == 403 and r.json()["error"] == "insufficient_capabilities"
    mt = srv.issue_mytoken()
    srv.revoke_all()
    r = client.post("/api/v0/tokeninfo", json={"action": "introspect", "mytoken": mt})
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"


def test_tokeninfo_unknown_action_and_subtokens(srv: DevServer, client: httpx.Client):
    mt = srv.issue_mytoken(capabilities=["AT", "create_mytoken", "tokeninfo"])
    r = client.post("/api/v0/tokeninfo", json={"action": "bogus", "mytoken": mt})
    assert r.status_code == 400 and r.json()["error_description"] == "unknown action 'bogus'"
    created = int(srv.clock.now())
    sub_mytoken_request(client, mt, name="kid")
    sub_mytoken_request(client, mt)
    tree = client.post("/api/v0/tokeninfo", json={"action": "subtokens", "mytoken": mt}).json()
    kids = [c["token"] for c in tree["mytokens"]["children"]]
    # the API's MytokenEntry: mom_id, created (creation time), name only when set
    assert [k.get("name") for k in kids] == ["kid", None]
    assert all(k["created"] == created and k["mom_id"] for k in kids)


# --- framework errors ----------------------------------------------------------------------


def test_404_and_405_shapes(client: httpx.Client):
    r = client.get("/api/v0/nothing")
    assert r.status_code == 404
    assert r.json()["error"] == "Not Found"
    r = client.get("/api/v0/token/access")
    assert r.status_code == 405
    assert r.json()["error"] == "Method Not Allowed"
    assert r.headers["allow"] == "POST"


def test_expires_in_is_present_and_matches_at_exp(srv: DevServer, client: httpx.Client):
    """Fact 19: ``expires_in`` comes from the OP; here it always matches the AT's exp."""
    body = access_token_request(client, srv.issue_mytoken()).json()
    claims = decode_unverified(body["access_token"])
    assert body["expires_in"] == claims["exp"] - claims["iat"] == 1200


def test_op_refusal_is_oidc_error(srv: DevServer, client: httpx.Client):
    """Fact 8: OP-side failures are ``oidc_error`` with the OP's status, description prefixed."""
    mt = srv.issue_mytoken(restrictions=[{"audience": [SE]}])
    r = access_token_request(client, mt, scope="compute.create", audience=SE)
    assert r.status_code == 400
    assert r.json()["error"] == "oidc_error"
    assert r.json()["error_description"].startswith("invalid_scope: ")


def test_parallel_use_of_rotating_mytoken_lets_exactly_one_win(srv, client):
    """Fact 2 / design note: two workers sharing one rotating MT cannot both succeed."""
    import threading

    mt = srv.issue_mytoken(rotation={"on_AT": True})
    barrier = threading.Barrier(4, timeout=10)
    statuses: list = []

    def use() -> None:
        with client_for(srv) as own:
            barrier.wait()
            statuses.append(access_token_request(own, mt).status_code)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(statuses) == [200, 401, 401, 401]


def test_maximum_mytoken_lifetime_is_enforced_as_the_real_server_does(clock: FakeClock) -> None:
    # oidc-mytoken/server EnforceMaxLifetime: refused (400 invalid_request) under
    # error_on_restrictions, else every entry's exp is capped (no entries: one with exp)
    with running_devserver(clock=clock, op_scopes=OP_SCOPES, max_mytoken_lifetime_s=3600) as s:
        parent = s.issue_mytoken(capabilities=["AT", "create_mytoken"])
        now = int(clock.now())
        with client_for(s) as c:
            long = [{"scope": VO, "exp": now + 7200}]
            refused = sub_mytoken_request(c, parent, restrictions=long, capabilities=["AT"],
                                          error_on_restrictions=True)
            assert refused.status_code == 400
            assert refused.json() == {
                "error": "invalid_request",
                "error_description": "requested restrictions do not respect maximum mytoken "
                                     "lifetime",
            }
            within = sub_mytoken_request(c, parent, capabilities=["AT"], error_on_restrictions=True,
                                         restrictions=[{"scope": VO, "exp": now + 600}])
            assert within.status_code == 200
            capped = sub_mytoken_request(c, parent, restrictions=long, capabilities=["AT"])
            assert capped.json()["restrictions"][0]["exp"] == now + 3600
            bare = sub_mytoken_request(c, parent, capabilities=["AT"])
            assert bare.json()["restrictions"] == [{"exp": now + 3600}]


# --- the pure rules behind the handlers ---------------------------------------------------

PROVIDER_SCOPES = ("openid", "storage.read:/")


@pytest.mark.parametrize(
    ("used", "scope", "audience", "expected"),
    [
        (None, "compute.read", "x", (list(PROVIDER_SCOPES), [])),
        (Restriction(scope="a b", audience=("x",)), "", "", (["a", "b"], [""])),
        (Restriction(scope="a b"), "a", "y", (["a"], ["y"])),
        (Restriction(), "", "", (list(PROVIDER_SCOPES), [""])),
    ],
)
def test_scopes_and_audience_the_op_is_asked_for(used, scope, audience, expected) -> None:
    assert scopes_and_audience_to_use(used, scope, audience, PROVIDER_SCOPES) == expected


@pytest.mark.parametrize(
    ("requested", "max_len", "expected"),
    [
        ("transfer_code", 0, "transfer_code"),
        ("short_token", 0, "short_token"),
        ("short_token", 500, "token"),  # the JWT fits
        ("token", 100, "short_token"),  # only a short token fits
        ("token", 10, "token"),  # nothing fits: the JWT anyway
    ],
)
def test_max_token_len_picks_the_form(requested: str, max_len: int, expected: str) -> None:
    assert response_type_for_length(requested, max_len, jwt_len=400, short_len=64) == expected


@pytest.mark.parametrize(
    ("header", "token"),
    [("", ""), ("a=b; mytoken=abc", "abc"), ("mytoken=; x=1", ""),
     ("mytoken=one; mytoken=two", "two"), ("mytokens=abc", "")],
)
def test_revocation_reads_the_mytoken_cookie(header: str, token: str) -> None:
    assert cookie_mytoken(header) == token
