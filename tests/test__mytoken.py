from __future__ import annotations

import json
import logging

import httpx
import pytest

from jobtoken import _mytoken
from jobtoken._errors import (
    ConfigError,
    MytokenRejectedError,
    ProtocolError,
    ServerUnavailableError,
)
from jobtoken._mytoken import (
    DISCOVERY_PATH,
    MytokenClient,
    is_plausible_mytoken,
)
from tests.fakes import FakeClock

SERVER = "https://mytoken.example.org"
MT = "eyJhbGciOiJFUzUxMiJ9.parent-mytoken-secret-0123456789abcdef.sig"
NEW_MT = "eyJhbGciOiJFUzUxMiJ9.rotated-mytoken-secret-0123456789abcd.sig"
SUB_MT = "eyJhbGciOiJFUzUxMiJ9.child-mytoken-secret-0123456789abcdefg.sig"
AT = "eyJhbGciOiJFUzI1NiJ9.access-token-secret.sig"


def discovery_doc(base=SERVER, **overrides):
    doc = {
        "issuer": base,
        "access_token_endpoint": f"{base}/api/v0/token/access",
        "mytoken_endpoint": f"{base}/api/v0/token/my",
        "revocation_endpoint": f"{base}/api/v0/token/revoke",
        "tokeninfo_endpoint": f"{base}/api/v0/tokeninfo",
        "jwks_uri": f"{base}/jwks",
        "restriction_claims_supported": ["nbf", "exp", "scope", "audience", "usages_AT"],
        "response_types_supported": ["token", "short_token"],
        "version": "0.10.2",
    }
    for key, value in overrides.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


class FakeServer:
    """A MockTransport handler: discovery plus per-path canned answers."""

    def __init__(self, base=SERVER, discovery=None):
        self.base = base
        self.discovery = discovery if discovery is not None else discovery_doc(base)
        self.requests: list[httpx.Request] = []
        self.answers: dict[str, object] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path.endswith(DISCOVERY_PATH):
            if isinstance(self.discovery, httpx.Response):
                return self.discovery
            return httpx.Response(200, json=self.discovery)
        answer = self.answers[path]
        if callable(answer):
            return answer(request)
        assert isinstance(answer, httpx.Response)
        return answer

    def bodies(self, path):
        return [json.loads(r.content) for r in self.requests if r.url.path == path]

    def count(self, suffix):
        return sum(1 for r in self.requests if r.url.path.endswith(suffix))


@pytest.fixture
def server():
    return FakeServer()


@pytest.fixture
def clock():
    return FakeClock()


def client_for(server, clock=None, **kwargs):
    return MytokenClient(server.base, transport=httpx.MockTransport(server), clock=clock, **kwargs)


def at_ok(**extra):
    body = {
        "access_token": AT,
        "token_type": "Bearer",
        "expires_in": 1199,
        "scope": "storage.create:/vo/out",
        "audience": ["https://se.example.org"],
    }
    body.update(extra)
    return httpx.Response(200, json=body)


ACCESS = "/api/v0/token/access"
MYTOKEN = "/api/v0/token/my"
REVOKE = "/api/v0/token/revoke"
TOKENINFO = "/api/v0/tokeninfo"


# --- discovery --------------------------------------------------------------------------


def test_discovery_is_fetched_once_per_process_per_url(server):
    server.answers[ACCESS] = at_ok()
    with client_for(server) as c1, client_for(server) as c2:
        for client in (c1, c2, c1):
            client.get_access_token(MT, scopes=["storage.create:/vo/out"])
        assert c1.metadata() is c2.metadata()
    assert server.count(DISCOVERY_PATH) == 1
    assert server.count(ACCESS) == 3


def test_discovery_keeps_server_path_prefix():
    server = FakeServer(base="https://host.example.org/mytoken")
    with client_for(server) as client:
        found = client.metadata()
    assert str(server.requests[0].url) == (
        "https://host.example.org/mytoken/.well-known/mytoken-configuration"
    )
    assert found.access_token_endpoint == "https://host.example.org/mytoken/api/v0/token/access"
    assert found.version == "0.10.2"


def test_endpoints_come_from_discovery_not_built_by_hand(server):
    server.discovery = discovery_doc(access_token_endpoint=f"{SERVER}/elsewhere/at")
    server.answers["/elsewhere/at"] = at_ok()
    with client_for(server) as client:
        client.get_access_token(MT)
    assert server.requests[-1].url.path == "/elsewhere/at"


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (httpx.Response(200, text="<html>hello</html>"), "not JSON"),
        (httpx.Response(200, text='{"issuer": "x", '), "not JSON"),
        (httpx.Response(200, json=["a"]), "not a JSON object"),
        (httpx.Response(200, json=discovery_doc(access_token_endpoint=None)), "access_token"),
        (httpx.Response(200, json=discovery_doc(mytoken_endpoint=None)), "mytoken_endpoint"),
        (httpx.Response(200, json=discovery_doc(mytoken_endpoint=5)), "mytoken_endpoint"),
        (
            httpx.Response(
                200, json=discovery_doc(access_token_endpoint="http://mytoken.example.org/at")
            ),
            "unusable access_token_endpoint",
        ),
    ],
)
def test_bad_discovery_is_a_protocol_error_and_not_cached(server, answer, why):
    server.discovery = answer
    with client_for(server) as client:
        with pytest.raises(ProtocolError, match=why):
            client.metadata()
        with pytest.raises(ProtocolError):
            client.metadata()
    assert server.count(DISCOVERY_PATH) == 2


def test_discovery_without_optional_endpoints(server):
    server.discovery = discovery_doc(revocation_endpoint=None, tokeninfo_endpoint=None)
    with client_for(server) as client:
        with pytest.raises(MytokenRejectedError, match="no revocation endpoint"):
            client.revoke(MT)
        with pytest.raises(MytokenRejectedError, match="no tokeninfo endpoint"):
            client.introspect(MT)


def test_discovery_5xx_is_transient(server):
    server.discovery = httpx.Response(503, text="<html>down</html>")
    with client_for(server) as client:
        with pytest.raises(ServerUnavailableError) as info:
            client.metadata()
    assert info.value.retryable and info.value.status == 503


# --- URL rules --------------------------------------------------------------------------


def test_http_server_url_refused_unless_loopback_and_allowed():
    with pytest.raises(ConfigError, match="plain http"):
        MytokenClient("http://mytoken.example.org", allow_http=True)
    with pytest.raises(ConfigError, match="plain http"):
        MytokenClient("http://127.0.0.1:8000")
    MytokenClient("http://127.0.0.1:8000", allow_http=True).close()


def test_loopback_http_server_works_end_to_end():
    server = FakeServer(base="http://127.0.0.1:8000")
    server.answers[ACCESS] = at_ok()
    with MytokenClient(
        server.base, allow_http=True, transport=httpx.MockTransport(server)
    ) as client:
        assert client.get_access_token(MT).access_token == AT


# --- access tokens ----------------------------------------------------------------------


def test_access_token_request_shape(server):
    server.answers[ACCESS] = at_ok()
    with client_for(server) as client:
        client.get_access_token(
            MT,
            scopes=["storage.create:/vo/out", "openid"],
            audiences=["https://se.example.org", "https://se2.example.org"],
            comment="job 42",
        )
    request = server.requests[-1]
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("jobtoken/")
    assert json.loads(request.content) == {
        "grant_type": "mytoken",
        "mytoken": MT,
        "scope": "storage.create:/vo/out openid",
        "audience": "https://se.example.org https://se2.example.org",
        "comment": "job 42",
    }


def test_access_token_request_without_scope_or_audience(server):
    server.answers[ACCESS] = at_ok()
    with client_for(server) as client:
        client.get_access_token(MT, scopes="storage.read:/a  storage.read:/b")
    assert server.bodies(ACCESS)[-1] == {
        "grant_type": "mytoken",
        "mytoken": MT,
        "scope": "storage.read:/a storage.read:/b",
    }


@pytest.mark.parametrize("bad", ["", "a b", None])
def test_scope_items_must_be_single_words(server, bad):
    with client_for(server) as client:
        with pytest.raises(ConfigError, match="invalid scope"):
            client.get_access_token(MT, scopes=["openid", bad])
    assert server.requests == []


def test_empty_mytoken_is_refused_before_sending(server):
    with client_for(server) as client:
        with pytest.raises(ConfigError, match="no mytoken"):
            client.get_access_token("  \n")
    assert server.requests == []


def test_access_token_response_parsed(server):
    server.answers[ACCESS] = at_ok(
        token_update={
            "mytoken": NEW_MT,
            "mytoken_type": "token",
            "expires_in": 86399,
            "mom_id": "mom-1",
            "capabilities": ["AT"],
            "rotation": {"on_AT": True, "lifetime": 86400},
            "restrictions": [{"scope": "storage.create:/vo/out", "usages_AT": 10}],
        }
    )
    with client_for(server) as client:
        result = client.get_access_token(MT)
    assert result.access_token == AT
    assert result.token_type == "Bearer"
    assert result.expires_in == 1199
    assert result.scope == "storage.create:/vo/out"
    assert result.audience == ("https://se.example.org",)
    update = result.token_update
    assert update is not None
    assert update.mytoken == NEW_MT and update.mytoken_type == "token"
    assert update.expires_in == 86399 and update.mom_id == "mom-1"
    assert update.capabilities == ("AT",)
    assert update.rotation == {"on_AT": True, "lifetime": 86400}
    assert update.restrictions[0]["usages_AT"] == 10
    text = repr(result)
    assert AT not in text and NEW_MT not in text


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"expires_in": None}, None),
        ({"expires_in": 0}, None),
        ({"expires_in": "600"}, 600.0),
    ],
)
def test_expires_in_may_be_missing_or_zero(server, extra, expected):
    body = {"access_token": AT, "audience": ["a"]}
    body.update({k: v for k, v in extra.items() if v is not None})
    server.answers[ACCESS] = httpx.Response(200, json=body)
    with client_for(server) as client:
        result = client.get_access_token(MT)
    assert result.expires_in == expected
    assert result.token_update is None
    assert result.token_type == "Bearer"


def test_audience_missing_or_string(server):
    server.answers[ACCESS] = httpx.Response(200, json={"access_token": AT, "audience": "x"})
    with client_for(server) as client:
        assert client.get_access_token(MT).audience == ("x",)
    server.answers[ACCESS] = httpx.Response(200, json={"access_token": AT})
    with client_for(server) as client:
        assert client.get_access_token(MT).audience == ()


# --- error mapping ----------------------------------------------------------------------


def _json_error(status, error, description=None, headers=None):
    body = {"error": error}
    if description is not None:
        body["error_description"] = description
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(
    ("answer", "cls", "status", "error", "description"),
    [
        (
            _json_error(400, "invalid_grant", "Unsupported grant_type"),
            MytokenRejectedError,
            400,
            "invalid_grant",
            "Unsupported grant_type",
        ),
        (
            _json_error(400, "invalid_request", "token not valid"),
            MytokenRejectedError,
            400,
            "invalid_request",
            "token not valid",
        ),
        (_json_error(401, "invalid_token"), MytokenRejectedError, 401, "invalid_token", None),
        (_json_error(403, "usage_restricted"), MytokenRejectedError, 403, "usage_restricted", None),
        (
            _json_error(403, "insufficient_capabilities", "no AT"),
            MytokenRejectedError,
            403,
            "insufficient_capabilities",
            "no AT",
        ),
        (
            _json_error(400, "oidc_error", "invalid_grant: token revoked"),
            MytokenRejectedError,
            400,
            "oidc_error",
            "invalid_grant: token revoked",
        ),
        (
            _json_error(400, "oidc_error", "temporarily_unavailable: try later"),
            ServerUnavailableError,
            400,
            "oidc_error",
            "temporarily_unavailable: try later",
        ),
        (
            _json_error(502, "oidc_error", "server_error: boom"),
            ServerUnavailableError,
            502,
            "oidc_error",
            "server_error: boom",
        ),
        (
            _json_error(500, "internal_server_error", "db down"),
            ServerUnavailableError,
            500,
            "internal_server_error",
            "db down",
        ),
        (
            httpx.Response(
                503,
                text="<html><body>Service Unavailable</body></html>",
                headers={"content-type": "text/html"},
            ),
            ServerUnavailableError,
            503,
            None,
            None,
        ),
        (httpx.Response(504, text=""), ServerUnavailableError, 504, None, None),
        (
            httpx.Response(404, text="Cannot POST /api/v0/token/access"),
            MytokenRejectedError,
            404,
            None,
            None,
        ),
        (httpx.Response(401, json=["not", "an", "object"]), MytokenRejectedError, 401, None, None),
        (httpx.Response(408, text="timeout"), ServerUnavailableError, 408, None, None),
    ],
)
def test_error_mapping(server, answer, cls, status, error, description):
    server.answers[ACCESS] = answer
    with client_for(server) as client:
        with pytest.raises(cls) as info:
            client.get_access_token(MT)
    exc = info.value
    assert type(exc) is cls
    assert exc.status == status
    assert exc.error == error
    assert exc.error_description == description
    assert exc.url == f"{SERVER}{ACCESS}"
    assert exc.retryable is (cls is ServerUnavailableError)
    message = str(exc)
    assert "\n" not in message and MT not in message
    assert f"HTTP {status}" in message and SERVER in message


def test_usage_restricted_without_description_gets_a_hint(server):
    server.answers[ACCESS] = _json_error(403, "usage_restricted")
    with client_for(server) as client:
        with pytest.raises(MytokenRejectedError, match="exactly"):
            client.get_access_token(MT, scopes=["storage.create:/vo/out/job42"])


@pytest.mark.parametrize("description", [None, "token is expired by 12s", "token not valid"])
def test_a_revoked_or_expired_mytoken_says_what_to_do(server, description):
    """The server's own words, and the next step: this mytoken is not coming back."""
    server.answers[ACCESS] = _json_error(401, "invalid_token", description)
    with client_for(server) as client:
        with pytest.raises(MytokenRejectedError, match="create a new mytoken") as raised:
            client.get_access_token(MT, scopes=["storage.create:/vo/out/job42"])
    assert description is None or description in raised.value.message


def test_429_plain_text_with_retry_after_seconds(server, clock):
    server.answers[ACCESS] = httpx.Response(
        429, text="Too Many Requests", headers={"Retry-After": "30"}
    )
    with client_for(server, clock=clock) as client:
        with pytest.raises(ServerUnavailableError, match="rate limited") as info:
            client.get_access_token(MT)
    assert info.value.retry_after_s == 30.0
    assert info.value.status == 429 and info.value.retryable
    assert not isinstance(info.value, ProtocolError)


def test_429_with_retry_after_http_date(server):
    clock = FakeClock(start=1_800_000_000.0)  # 2027-01-15T08:00:00Z
    server.answers[ACCESS] = httpx.Response(
        429, text="Too Many Requests", headers={"Retry-After": "Fri, 15 Jan 2027 08:02:00 GMT"}
    )
    with client_for(server, clock=clock) as client:
        with pytest.raises(ServerUnavailableError) as info:
            client.get_access_token(MT)
    assert info.value.retry_after_s == pytest.approx(120.0, abs=1e-6)


def test_429_without_retry_after(server):
    server.answers[ACCESS] = httpx.Response(429, text="Too Many Requests")
    with client_for(server) as client:
        with pytest.raises(ServerUnavailableError) as info:
            client.get_access_token(MT)
    assert info.value.retry_after_s is None


def test_redirect_is_not_followed(server):
    server.answers[ACCESS] = httpx.Response(
        307, headers={"Location": "https://evil.example.org/steal"}
    )
    with client_for(server) as client:
        with pytest.raises(ProtocolError, match="redirect to 'evil.example.org'") as info:
            client.get_access_token(MT)
    assert info.value.status == 307
    assert [r.url.host for r in server.requests] == ["mytoken.example.org"] * 2


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (httpx.Response(200, text="<html>ok</html>"), "not JSON"),
        (httpx.Response(200, text='{"access_token": "abc'), "not JSON"),
        (httpx.Response(200, content=b"\xff\xfe\x00garbage"), "not JSON"),
        (httpx.Response(200, json=[AT]), "not a JSON object"),
        (httpx.Response(200, json={"token_type": "Bearer"}), "no access_token"),
        (httpx.Response(200, json={"access_token": ""}), "no access_token"),
        (httpx.Response(200, json={"access_token": 12345}), "no access_token"),
        (httpx.Response(200, json={"access_token": "a b"}), "whitespace"),
        (httpx.Response(200, json={"access_token": AT, "audience": 5}), "audience"),
        (httpx.Response(200, json={"access_token": AT, "audience": [1]}), "audience"),
        (httpx.Response(200, json={"access_token": AT, "scope": ["a"]}), "scope"),
        (httpx.Response(200, json={"access_token": AT, "token_type": 1}), "token_type"),
        (httpx.Response(200, json={"access_token": AT, "expires_in": "soon"}), "expires_in"),
        (httpx.Response(200, json={"access_token": AT, "expires_in": -5}), "expires_in"),
        (httpx.Response(200, json={"access_token": AT, "expires_in": True}), "expires_in"),
        (httpx.Response(200, json={"access_token": AT, "token_update": NEW_MT}), "token_update"),
        (httpx.Response(200, json={"access_token": AT, "token_update": {}}), "token_update"),
        (
            httpx.Response(200, json={"access_token": AT, "token_update": {"mytoken": ""}}),
            "token_update has no plausible mytoken",
        ),
        (
            httpx.Response(200, json={"access_token": AT, "token_update": {"mytoken": "   "}}),
            "no plausible mytoken",
        ),
        (
            httpx.Response(200, json={"access_token": AT, "token_update": {"mytoken": "short"}}),
            "no plausible mytoken",
        ),
        (
            httpx.Response(200, json={"access_token": AT, "token_update": {"mytoken": "ä" * 40}}),
            "no plausible mytoken",
        ),
        (
            httpx.Response(
                200,
                json={"access_token": AT, "token_update": {"mytoken": NEW_MT[:40] + " x" * 5}},
            ),
            "no plausible mytoken",
        ),
        (
            httpx.Response(
                200,
                json={
                    "access_token": AT,
                    "updated_token": {"mytoken": NEW_MT},
                    "token_update": {"mytoken": NEW_MT, "capabilities": "AT"},
                },
            ),
            "capabilities",
        ),
    ],
)
def test_bad_success_bodies_are_protocol_errors(server, answer, why):
    server.answers[ACCESS] = answer
    with client_for(server) as client:
        with pytest.raises(ProtocolError, match=why) as info:
            client.get_access_token(MT)
    # ProtocolError is a ServerUnavailableError, retryable unless a rotation was at stake
    assert info.value.retryable is ("token_update" not in answer.text)
    assert MT not in str(info.value) and AT not in str(info.value)
    assert "\n" not in str(info.value)


def test_updated_token_field_from_the_docs_is_not_mistaken_for_rotation(server):
    server.answers[ACCESS] = at_ok(updated_token={"mytoken": NEW_MT})
    with client_for(server) as client:
        assert client.get_access_token(MT).token_update is None


def _raiser(exc_type, message):
    def handler(request):
        raise exc_type(message, request=request)

    return handler


@pytest.mark.parametrize(
    ("exc_type", "why"),
    [
        (httpx.ConnectError, "Connection refused"),
        (httpx.ConnectTimeout, "timed out"),
        (httpx.ReadTimeout, "timed out"),
        (httpx.ReadError, "Connection reset by peer"),
        (httpx.RemoteProtocolError, "Server disconnected"),
    ],
)
def test_transport_failures_are_transient(server, exc_type, why):
    server.answers[ACCESS] = _raiser(exc_type, why)
    with client_for(server) as client:
        with pytest.raises(ServerUnavailableError, match="access token request failed") as info:
            client.get_access_token(MT)
    assert type(info.value) is ServerUnavailableError
    assert info.value.retryable
    assert info.value.url == f"{SERVER}{ACCESS}"


def test_connect_error_during_discovery(server):
    server.discovery = None

    def handler(request):
        raise httpx.ConnectError("Connection refused", request=request)

    with MytokenClient(SERVER, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ServerUnavailableError, match="mytoken discovery failed"):
            client.metadata()


def test_server_echoing_the_mytoken_is_redacted(server):
    server.answers[ACCESS] = _json_error(400, "invalid_request", f"bad token {MT}\nline two")
    with client_for(server) as client:
        with pytest.raises(MytokenRejectedError) as info:
            client.get_access_token(MT)
    assert MT not in str(info.value)
    assert MT not in (info.value.error_description or "")
    assert "[redacted]" in str(info.value)
    assert "\n" not in str(info.value)


def test_logs_carry_url_and_status_but_never_tokens(server, caplog):
    server.answers[ACCESS] = at_ok(token_update={"mytoken": NEW_MT})
    caplog.set_level(logging.DEBUG, logger="jobtoken")
    with client_for(server) as client:
        client.get_access_token(MT)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"url={SERVER}{ACCESS}" in text and "status=200" in text
    assert "mytoken rotated" in text
    for secret in (MT, NEW_MT, AT):
        assert secret not in text


# --- sub-mytokens -----------------------------------------------------------------------


def test_create_mytoken_request_shape_and_response(server):
    server.answers[MYTOKEN] = httpx.Response(
        200,
        json={
            "mytoken": SUB_MT,
            "mytoken_type": "token",
            "expires_in": 3600,
            "mom_id": "child",
            "capabilities": ["AT"],
            "restrictions": [{"scope": "storage.create:/vo/out", "audience": ["https://se"]}],
            "token_update": {"mytoken": NEW_MT, "mytoken_type": "token"},
        },
    )
    with client_for(server) as client:
        result = client.create_mytoken(
            MT,
            restrictions=[
                {
                    "scope": ["storage.create:/vo/out", "openid"],
                    "audience": "https://se",
                    "exp": 1_800_003_600,
                    "usages_AT": 20,
                }
            ],
            capabilities=["AT"],
            rotation={"on_AT": False},
            name="job 42",
            max_token_len=1000,
        )
    assert server.bodies(MYTOKEN) == [
        {
            "grant_type": "mytoken",
            "mytoken": MT,
            "response_type": "token",
            "error_on_restrictions": True,
            "restrictions": [
                {
                    "scope": "storage.create:/vo/out openid",
                    "audience": ["https://se"],
                    "exp": 1_800_003_600,
                    "usages_AT": 20,
                }
            ],
            "capabilities": ["AT"],
            "rotation": {"on_AT": False},
            "name": "job 42",
            "max_token_len": 1000,
        }
    ]
    assert result.mytoken == SUB_MT and result.mom_id == "child"
    assert result.capabilities == ("AT",)
    assert result.restrictions[0]["audience"] == ["https://se"]
    # the parent's replacement (rotation on_other) is handed back, not dropped
    assert result.token_update is not None and result.token_update.mytoken == NEW_MT
    assert SUB_MT not in repr(result)


def test_create_mytoken_minimal_inherits_parent(server):
    server.answers[MYTOKEN] = httpx.Response(200, json={"mytoken": SUB_MT})
    with client_for(server) as client:
        result = client.create_mytoken(MT, error_on_restrictions=False)
    assert server.bodies(MYTOKEN)[-1] == {
        "grant_type": "mytoken",
        "mytoken": MT,
        "response_type": "token",
        "error_on_restrictions": False,
    }
    assert result.mytoken_type == "token" and result.token_update is None


def test_create_mytoken_transfer_code(server):
    server.answers[MYTOKEN] = httpx.Response(
        200, json={"transfer_code": "ABCD1234", "expires_in": 300, "mytoken_type": "transfer_code"}
    )
    with client_for(server) as client:
        result = client.create_mytoken(MT, response_type="transfer_code")
    assert result.transfer_code == "ABCD1234" and result.mytoken == ""
    assert "ABCD1234" not in repr(result)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"response_type": "jwt"}, "response_type"),
        ({"max_token_len": "100"}, "max_token_len"),
        ({"restrictions": ["scope=x"]}, "restriction"),
        ({"capabilities": ["A T"]}, "capability"),
    ],
)
def test_create_mytoken_bad_arguments(server, kwargs, why):
    with client_for(server) as client:
        with pytest.raises(ConfigError, match=why):
            client.create_mytoken(MT, **kwargs)


def test_create_mytoken_rejected(server):
    server.answers[MYTOKEN] = _json_error(
        400, "invalid_request", "requested restrictions are not subset of original restrictions"
    )
    with client_for(server) as client:
        with pytest.raises(MytokenRejectedError, match="not subset"):
            client.create_mytoken(MT, restrictions=[{"scope": "storage.create:/x"}])


def test_create_mytoken_implausible_result(server):
    server.answers[MYTOKEN] = httpx.Response(200, json={"mytoken": "x"})
    with client_for(server) as client:
        with pytest.raises(ProtocolError, match="created mytoken has no plausible mytoken"):
            client.create_mytoken(MT)


# --- revoke and introspect --------------------------------------------------------------


def test_revoke_204(server):
    server.answers[REVOKE] = httpx.Response(204)
    with client_for(server) as client:
        assert client.revoke(SUB_MT, recursive=True) is None
    assert server.bodies(REVOKE) == [{"token": SUB_MT, "recursive": True}]


def test_revoke_by_mom_id_with_rotation(server):
    server.answers[REVOKE] = httpx.Response(
        200, json={"token_update": {"mytoken": NEW_MT, "mytoken_type": "token"}}
    )
    with client_for(server) as client:
        update = client.revoke(MT, mom_id="child")
    assert server.bodies(REVOKE) == [{"token": MT, "recursive": False, "mom_id": "child"}]
    assert update is not None and update.mytoken == NEW_MT


def test_revoke_200_without_update(server):
    server.answers[REVOKE] = httpx.Response(200, json={})
    with client_for(server) as client:
        assert client.revoke(MT) is None


def test_revoke_errors(server):
    server.answers[REVOKE] = _json_error(403, "insufficient_capabilities")
    with client_for(server) as client:
        with pytest.raises(MytokenRejectedError, match="mytoken revocation failed"):
            client.revoke(MT, mom_id="other")
    server.answers[REVOKE] = httpx.Response(200, json={"token_update": {"mytoken": "tiny"}})
    with client_for(server) as client:
        with pytest.raises(ProtocolError, match="token_update"):
            client.revoke(MT, mom_id="other")


def test_introspect(server):
    info = {"valid": True, "token_type": "token", "token": {"jti": "j", "restrictions": []}}
    server.answers[TOKENINFO] = httpx.Response(200, json=info)
    with client_for(server) as client:
        assert client.introspect(MT) == info
    assert server.bodies(TOKENINFO) == [{"action": "introspect", "mytoken": MT}]


def test_introspect_invalid_token_is_rejected(server):
    server.answers[TOKENINFO] = _json_error(401, "invalid_token")
    with client_for(server) as client:
        with pytest.raises(MytokenRejectedError) as info:
            client.introspect(MT)
    assert info.value.status == 401 and info.value.error_description is None


def test_subtokens_lists_every_descendant_but_not_the_token_itself(server):
    tree = {
        "token": {"mom_id": "root", "name": "site parent", "created": 1},
        "children": [
            {"token": {"mom_id": "a", "name": "jobtoken 1", "created": 100},
             "children": [{"token": {"mom_id": "a1", "created": 150}}]},
            {"token": {"mom_id": "b", "name": "jobtoken 2", "created": 200}},
        ],
    }
    server.answers[TOKENINFO] = httpx.Response(200, json={"mytokens": tree})
    with client_for(server) as client:
        listing = client.subtokens(MT)
    assert server.bodies(TOKENINFO) == [{"action": "subtokens", "mytoken": MT}]
    assert sorted((e.mom_id, e.name, e.created) for e in listing.entries) == [
        ("a", "jobtoken 1", 100.0), ("a1", "", 150.0), ("b", "jobtoken 2", 200.0)]
    assert listing.token_update is None


def test_subtokens_with_rotation_returns_the_replacement(server):
    server.answers[TOKENINFO] = httpx.Response(200, json={
        "mytokens": {"token": {"mom_id": "root", "created": 1}},
        "token_update": {"mytoken": NEW_MT, "mytoken_type": "token"},
    })
    with client_for(server) as client:
        listing = client.subtokens(MT)
    assert listing.entries == () and listing.token_update.mytoken == NEW_MT


@pytest.mark.parametrize(
    "body",
    [
        {"mytokens": []},
        {"mytokens": {"token": {}, "children": [{"token": {"name": "no mom_id"}}]}},
        {"mytokens": {"token": {}, "children": [{"token": {"mom_id": "x"}, "children": 3}]}},
        {"mytokens": {"token": {}, "children": ["text"]}},
        {"mytokens": {"token": {}}, "token_update": "tiny"},
    ],
)
def test_subtokens_malformed_tree(server, body):
    server.answers[TOKENINFO] = httpx.Response(200, json=body)
    with client_for(server) as client:
        with pytest.raises(ProtocolError):
            client.subtokens(MT)


def test_subtokens_without_capability(server):
    server.answers[TOKENINFO] = _json_error(403, "insufficient_capabilities")
    with client_for(server) as client:
        with pytest.raises(MytokenRejectedError, match="insufficient_capabilities"):
            client.subtokens(MT)


# --- misc -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "plausible"),
    [
        (MT, True),
        ("a" * 32, True),
        ("a" * 31, False),
        ("", False),
        (" " * 40, False),
        ("a" * 20 + " " + "a" * 20, False),
        ("é" * 40, False),
        (None, False),
        (12345, False),
    ],
)
def test_is_plausible_mytoken(value, plausible):
    assert is_plausible_mytoken(value) is plausible


def test_client_repr_and_close(server):
    client = client_for(server)
    assert SERVER in repr(client)
    client.close()
    with pytest.raises(RuntimeError, match="after close"):
        client.get_access_token(MT)


def test_plain_text_error_bodies_are_quoted_briefly_and_redacted(server):
    server.answers[ACCESS] = httpx.Response(
        404, text=f"Cannot POST /api/v0/token/access {MT}", headers={"content-type": "text/plain"}
    )
    with client_for(server) as client:
        with pytest.raises(MytokenRejectedError, match="Cannot POST") as info:
            client.get_access_token(MT)
    assert MT not in str(info.value)


def test_html_error_bodies_are_not_quoted(server):
    server.answers[ACCESS] = httpx.Response(
        502, text="<html><title>Bad Gateway</title></html>", headers={"content-type": "text/html"}
    )
    with client_for(server) as client:
        with pytest.raises(ServerUnavailableError) as info:
            client.get_access_token(MT)
    assert "<html>" not in str(info.value)


def test_unusable_body_with_rotation_is_not_retryable(server):
    server.answers[ACCESS] = httpx.Response(
        200, json={"token_update": {"mytoken": NEW_MT}, "access_token": ""}
    )
    with client_for(server) as client:
        with pytest.raises(ProtocolError, match="rotated") as info:
            client.get_access_token(MT)
    assert info.value.retryable is False
    assert NEW_MT not in str(info.value)


@pytest.mark.parametrize(
    ("exc_type", "reached"),
    [(httpx.ConnectError, False), (httpx.ConnectTimeout, False), (httpx.ReadTimeout, True),
     (httpx.ReadError, True), (httpx.RemoteProtocolError, True)],
)
def test_a_transport_failure_says_whether_the_request_reached_the_server(
    server, exc_type, reached
):
    # prepare decides from this whether a job mytoken may have been minted unseen
    server.answers[ACCESS] = _raiser(exc_type, "boom")
    with client_for(server) as client:
        with pytest.raises(ServerUnavailableError) as info:
            client.get_access_token(MT)
    assert info.value.reached_server is reached


# --- limits: size, time, and values no float holds (issue 12, items 6 and 7) -----------


def test_a_body_past_the_cap_is_refused_without_reading_it_all(server):
    from jobtoken._mytoken import MAX_RESPONSE_BYTES

    sent = []

    def huge():  # 400 MB if read to the end
        for _ in range(400 * 16):
            sent.append(1)
            yield b"x" * 65536

    server.answers[ACCESS] = lambda request: httpx.Response(200, content=huge())
    with client_for(server) as client, pytest.raises(ProtocolError) as info:
        client.get_access_token(MT)
    assert f"larger than {MAX_RESPONSE_BYTES} bytes" in info.value.message
    assert len(sent) * 65536 <= MAX_RESPONSE_BYTES + 65536


def test_a_dripping_body_stops_at_the_overall_deadline(server, clock):
    # one byte every 2 s never trips the per-read timeout; the deadline must
    def drip(request):
        def body():
            for byte in json.dumps({"access_token": AT}).encode():
                clock.advance(2.0)
                yield bytes([byte])

        return httpx.Response(200, content=body())

    server.answers[ACCESS] = drip
    start = clock.monotonic()
    with client_for(server, clock, deadline_s=60, timeout_s=100) as client:
        with pytest.raises(ServerUnavailableError, match="overall deadline of 60 s") as info:
            client.get_access_token(MT)
        assert info.value.retryable
        assert clock.monotonic() - start <= 62
        # revocation cleans up after the deadline, so it still gets its own time
        server.answers[REVOKE] = httpx.Response(204)
        assert client.revoke(SUB_MT) is None
        # anything else is refused without a request
        before = len(server.requests)
        with pytest.raises(ServerUnavailableError, match="overall deadline"):
            client.get_access_token(MT)
        assert len(server.requests) == before
    # without a deadline a body still has to arrive within timeout_s in all
    server.answers[ACCESS] = drip
    with client_for(server, clock, timeout_s=10) as client:
        with pytest.raises(ServerUnavailableError, match="not received within 10 s"):
            client.get_access_token(MT)


def test_a_dripping_server_on_a_real_socket_is_cut_off(tmp_path):
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()
    doc = json.dumps(discovery_doc(f"http://127.0.0.1:{port}")).encode()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(65536)
                if DISCOVERY_PATH.encode() in request:
                    # "Connection: close": the client must not reuse a socket this
                    # server closes right after (a race that reset the next request)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Connection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(doc), doc))
                    continue
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while not stop.wait(0.3):
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with MytokenClient(f"http://127.0.0.1:{port}", allow_http=True, timeout_s=5,
                           deadline_s=1.5) as client:
            with pytest.raises(ServerUnavailableError, match="overall deadline"):
                client.get_access_token(MT)
        # per-read timeout alone (5 s, never tripped by a 0.3 s drip) would wait ~forever
        assert time.monotonic() - started < 1.5 + 5
    finally:
        stop.set()
        listener.close()
        thread.join(10)


@pytest.mark.parametrize(
    "body",
    [
        '{"access_token": ' + "[" * 100000 + "]" * 100000 + "}",
        '{"access_token": "' + AT + '", "expires_in": ' + "9" * 400 + "}",
        '{"access_token": "' + AT + '", "expires_in": 1e999}',
    ],
    ids=["deeply-nested", "400-digit-expires_in", "infinite-expires_in"],
)
def test_unusable_server_values_are_a_one_line_protocol_error(server, body):
    server.answers[ACCESS] = httpx.Response(
        200, content=body.encode(), headers={"content-type": "application/json"}
    )
    with client_for(server) as client, pytest.raises(ProtocolError) as info:
        client.get_access_token(MT)
    assert info.value.retryable  # the sidecar tries again
    assert "\n" not in info.value.message and len(info.value.message) < 400


@pytest.mark.parametrize(
    "exp", ['"tomorrow"', "9" * 400, "1e300", "-1", "true", str(1 << 60)]
)
def test_a_minted_mytoken_with_unusable_restrictions_is_revoked(server, exp):
    body = (
        '{"mytoken": "' + SUB_MT + '", "mytoken_type": "token", "capabilities": ["AT"], '
        '"restrictions": [{"scope": "storage.create:/vo/out", "exp": ' + exp + "}]}"
    )
    server.answers[MYTOKEN] = httpx.Response(
        200, content=body.encode(), headers={"content-type": "application/json"}
    )
    server.answers[REVOKE] = httpx.Response(204)
    with client_for(server) as client, pytest.raises(ProtocolError) as info:
        client.create_mytoken(MT, capabilities=["AT"])
    assert "restriction exp is not a plausible integer" in info.value.message
    assert "the minted mytoken was revoked" in info.value.message
    assert server.bodies(REVOKE) == [{"token": SUB_MT, "recursive": False}]
    assert SUB_MT not in info.value.message


def _rotating_mytoken(**rotation):
    import jwt as pyjwt

    claims = {"iss": SERVER, "sub": "s", "jti": "j", "rotation": rotation}
    return pyjwt.encode(claims, "k" * 32, algorithm="HS256")


@pytest.mark.parametrize(
    ("rotation", "says"),
    [
        ({"on_AT": True, "auto_revoke": True}, "revokes it and every mytoken made from it"),
        ({"on_AT": True}, "the mytoken we hold is dead and using it again fails"),
    ],
)
def test_a_lost_answer_for_a_rotating_mytoken_says_it_may_be_dead(server, rotation, says):
    # issue 12 item 17: the server committed the rotation, the answer never arrived
    def lost(request):
        raise httpx.ReadTimeout("read timed out", request=request)

    server.answers[ACCESS] = lost
    mytoken = _rotating_mytoken(**rotation)
    with client_for(server) as client, pytest.raises(ServerUnavailableError) as info:
        client.get_access_token(mytoken)
    assert "rotates on use" in info.value.message and says in info.value.message
    assert mytoken not in info.value.message


@pytest.mark.parametrize(
    ("rotation", "failure"),
    [
        ({}, httpx.ReadTimeout),  # no rotation: retrying is harmless
        ({"on_AT": True, "auto_revoke": True}, httpx.ConnectError),  # never sent
        ({"on_other": True}, httpx.ReadTimeout),  # rotates on other uses, not on AT
    ],
)
def test_a_lost_answer_without_rotation_risk_keeps_the_plain_message(server, rotation, failure):
    def lost(request):
        raise failure("broken", request=request)

    server.answers[ACCESS] = lost
    with client_for(server) as client, pytest.raises(ServerUnavailableError) as info:
        client.get_access_token(_rotating_mytoken(**rotation))
    assert "rotates on use" not in info.value.message


def test_a_fixed_scope_parent_refusal_explains_exact_matching(server):
    # issue 12 item 19: the real server's words alone do not say what to change
    server.answers[MYTOKEN] = _json_error(
        400, "invalid_request", "requested restrictions are not subset of original restrictions"
    )
    with client_for(server) as client, pytest.raises(MytokenRejectedError) as info:
        client.create_mytoken(MT, restrictions=[{"scope": "storage.create:/vo/jobs/7"}])
    assert "not subset of original restrictions" in info.value.message
    assert "compares scope strings exactly" in info.value.message
    assert "leave 'scope' open or list the exact scope string" in info.value.message


# --- the pure readers behind the response parsers (one rule each) ---------------------


def _bad(problem):
    return ProtocolError(problem)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, ()), ("", ()), ("a", ("a",)), (["a", "", "b", "a"], ("a", "b")), ([], ())],
)
def test_audience_may_be_absent_one_string_or_an_array(value, expected):
    assert _mytoken._audiences(value, _bad) == expected


@pytest.mark.parametrize("value", [3, {"a": 1}, ["a", 1]])
def test_audience_of_another_shape_is_malformed(value):
    with pytest.raises(ProtocolError, match="audience is not an array of strings"):
        _mytoken._audiences(value, _bad)


@pytest.mark.parametrize(
    ("data", "expected"), [({}, "Bearer"), ({"token_type": None}, "Bearer"),
                           ({"token_type": "DPoP"}, "DPoP")]
)
def test_absent_or_null_text_field_means_the_default(data, expected):
    assert _mytoken._text_field(data, "token_type", "Bearer", _bad, "no") == expected


def test_text_field_of_another_type_is_malformed():
    with pytest.raises(ProtocolError, match="token_type is not a string"):
        _mytoken._text_field({"token_type": 1}, "token_type", "Bearer", _bad,
                             "token_type is not a string")


@pytest.mark.parametrize(
    ("status", "error", "description", "retry_later"),
    [
        (500, None, None, True),
        (503, "invalid_token", None, True),
        (408, None, None, True),
        (425, None, None, True),
        (429, None, None, True),
        (400, "temporarily_unavailable", None, True),
        (400, "oidc_error", "server_error: the OP is down", True),
        (400, "oidc_error", "invalid_grant: refresh token revoked", False),
        (401, "invalid_token", None, False),
        (403, "usage_restricted", None, False),
        (404, None, None, False),
    ],
)
def test_which_answers_are_worth_retrying(status, error, description, retry_later):
    cls = _mytoken._error_class_for(status, error, description)
    assert cls is (ServerUnavailableError if retry_later else MytokenRejectedError)


def test_status_hint_prefers_what_the_description_reveals():
    description = "restrictions: not subset of original restrictions"
    assert "exact scope string" in _mytoken._status_hint("usage_restricted", description)
    assert "no restriction" in _mytoken._status_hint("usage_restricted", "other")
    assert _mytoken._status_hint("unknown_error", None) is None


@pytest.mark.parametrize(
    "tree",
    [
        None,
        [],
        {"children": [{"token": {}}]},
        {"children": [{"token": {"mom_id": ""}}]},
        {"children": [{"token": {"mom_id": "m"}, "children": {"not": "a list"}}]},
        {"children": ["node"]},
    ],
)
def test_malformed_subtoken_tree_is_refused(tree):
    with pytest.raises(ValueError):
        _mytoken._descendants(tree)


def test_subtoken_tree_lists_every_descendant_but_not_the_root():
    tree = {
        "token": {"mom_id": "root"},
        "children": [
            {"token": {"mom_id": "a", "name": "job a", "created": 5},
             "children": [{"token": {"mom_id": "a1", "name": 7}}]},
            {"token": {"mom_id": "b"}},
        ],
    }
    entries = {e.mom_id: e for e in _mytoken._descendants(tree)}
    assert set(entries) == {"a", "a1", "b"}
    assert (entries["a"].name, entries["a"].created) == ("job a", 5.0)
    assert (entries["a1"].name, entries["a1"].created) == ("", None)


def test_creation_body_leaves_out_what_is_inherited():
    body = _mytoken._creation_body(
        MT, restrictions=None, capabilities=None, rotation=None, name=None,
        response_type="token", error_on_restrictions=True, max_token_len=None,
    )
    assert body == {"grant_type": "mytoken", "mytoken": MT, "response_type": "token",
                    "error_on_restrictions": True}


@pytest.mark.parametrize(("response_type", "max_len"), [("jwt", None), ("token", True),
                                                        ("token", "64")])
def test_creation_body_refuses_bad_options(response_type, max_len):
    with pytest.raises(ConfigError):
        _mytoken._creation_body(
            MT, restrictions=None, capabilities=None, rotation=None, name=None,
            response_type=response_type, error_on_restrictions=True, max_token_len=max_len,
        )
