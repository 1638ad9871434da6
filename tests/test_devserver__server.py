"""Dev server lifecycle, loopback policy, rate limit, TLS, keys and the request log."""

from __future__ import annotations

import os
import ssl
import stat

import httpx
import jwt
import pytest

from jobtoken._errors import ConfigError, UsageError
from jobtoken.devserver import DevServer, DevServerConfig
from tests.devserver_fixtures import access_token_request, client_for, running_devserver
from tests.fakes import FakeClock


def test_binds_loopback_port_zero_and_context_manager_stops() -> None:
    with running_devserver() as srv:
        assert srv.url == f"http://127.0.0.1:{srv.port}" and srv.port > 0
        assert srv.op_issuer == srv.url + "/op"
        with client_for(srv) as c:
            assert c.get("/jwks").status_code == 200
    with pytest.raises(httpx.ConnectError), client_for(srv, timeout_s=2) as c:
        c.get("/jwks")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "example.org"])
def test_refuses_non_loopback_host(host: str) -> None:
    with pytest.raises(ConfigError, match="not loopback"):
        DevServer(DevServerConfig(host=host))


def test_allow_remote_accepts_any_host() -> None:
    DevServerConfig(host="0.0.0.0", allow_remote=True).validate()


@pytest.mark.parametrize(
    "kwargs",
    [{"at_alg": "HS256"}, {"mt_alg": "none"}, {"at_lifetime_s": 0}, {"rate_limit": (0, 10)}],
)
def test_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        DevServer(DevServerConfig(**kwargs))


def test_ipv6_loopback() -> None:
    if not _ipv6_available():
        pytest.fail("IPv6 loopback not available on this host")
    with running_devserver(host="::1") as srv, client_for(srv) as c:
        assert srv.url.startswith("http://[::1]:")
        assert c.get("/.well-known/mytoken-configuration").json()["issuer"] == srv.url


def _ipv6_available() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_python_api_needs_start() -> None:
    with pytest.raises(UsageError):
        DevServer().issue_mytoken()


def test_es256_access_tokens_and_short_lifetime() -> None:
    with running_devserver(at_alg="ES256", at_lifetime_s=3) as srv, client_for(srv) as c:
        body = access_token_request(c, srv.issue_mytoken()).json()
        assert body["expires_in"] == 3
        header = jwt.get_unverified_header(body["access_token"])
        assert header["alg"] == "ES256" and header["kid"]
        jwks = jwt.PyJWKSet.from_dict(c.get("/op/jwks").json())
        claims = jwt.decode(
            body["access_token"],
            jwks[header["kid"]].key,
            algorithms=["ES256"],
            audience="https://wlcg.cern.ch/jwt/v1/any",
        )
        assert claims["exp"] - claims["iat"] == 3


def test_at_lifetime_can_change_while_running() -> None:
    with pytest.raises(UsageError):
        DevServer().set_at_lifetime(60)
    with running_devserver(at_lifetime_s=30) as srv, client_for(srv) as c:
        mt = srv.issue_mytoken()
        assert access_token_request(c, mt).json()["expires_in"] == 30
        srv.set_at_lifetime(900)
        assert access_token_request(c, mt).json()["expires_in"] == 900
        with pytest.raises(UsageError):
            srv.set_at_lifetime(0)


def test_rate_limit_counts_every_request_per_ip() -> None:
    """Fact 11: per client IP, discovery included; 429 is plain text with Retry-After."""
    clock = FakeClock()
    with running_devserver(clock=clock, rate_limit=(3, 60)) as srv, client_for(srv) as c:
        assert c.get("/.well-known/mytoken-configuration").status_code == 200
        assert c.get("/jwks").status_code == 200
        r = c.get("/op/jwks")
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining"] == "0"
        r = c.post("/api/v0/token/access", json={})
        assert r.status_code == 429
        assert r.text == "Too Many Requests"
        assert r.headers["content-type"].startswith("text/plain")
        assert r.headers["retry-after"] == "60"
        owner = {"Authorization": f"Bearer {srv.control_token}"}
        assert c.delete("/_devserver/faults", headers=owner).status_code == 204  # exempt
        clock.advance(61)
        assert c.get("/jwks").status_code == 200


def test_rate_limit_off_by_default() -> None:
    with running_devserver() as srv, client_for(srv) as c:
        assert all(c.get("/jwks").status_code == 200 for _ in range(120))


def test_tls_serves_https_trusting_ca_pem(tmp_path) -> None:
    tls_dir = tmp_path / "tls"
    with running_devserver(tls_dir=str(tls_dir)) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        assert srv.ca_file == str(tls_dir / "ca.pem")
        assert stat.S_IMODE(os.stat(tls_dir / "server.key").st_mode) == 0o600
        ctx = ssl.create_default_context(cafile=srv.ca_file)
        with httpx.Client(verify=ctx, timeout=5) as c:
            doc = c.get(srv.url + "/.well-known/mytoken-configuration").json()
            assert doc["issuer"] == srv.url
            op = c.get(srv.op_issuer + "/.well-known/openid-configuration").json()
            jwks = jwt.PyJWKSet.from_dict(c.get(op["jwks_uri"]).json())
            at = access_token_request(
                httpx.Client(base_url=srv.url, verify=ctx, timeout=5), srv.issue_mytoken()
            ).json()["access_token"]
            kid = jwt.get_unverified_header(at)["kid"]
            claims = jwt.decode(
                at,
                jwks[kid].key,
                algorithms=["RS256"],
                audience="https://wlcg.cern.ch/jwt/v1/any",
                issuer=srv.op_issuer,
            )
            assert claims["wlcg.ver"] == "1.0"
        with httpx.Client(timeout=5) as untrusting, pytest.raises(httpx.ConnectError):
            untrusting.get(srv.url + "/jwks")
        with client_for(srv) as c:  # localhost is in the SAN too
            assert c.get(srv.url.replace("127.0.0.1", "localhost") + "/jwks").status_code == 200


def test_request_log_never_holds_tokens() -> None:
    with running_devserver() as srv, client_for(srv) as c:
        mt = srv.issue_mytoken(response_type="short_token")
        access_token_request(c, mt)
        c.post(
            "/api/v0/token/access",
            json={"grant_type": "mytoken"},
            headers={"Authorization": f"Bearer {mt}"},
        )
        c.get(f"/jwks?token={mt}")
        log = srv.requests()
        assert [r.endpoint for r in log] == ["access", "access", "jwks"]
        assert all(r.client_ip == "127.0.0.1" and r.time > 0 for r in log)
        assert mt not in repr(log)
        srv.clear_requests()
        assert srv.requests() == ()


def test_revoke_all_and_introspect_helpers() -> None:
    with running_devserver() as srv:
        mt = srv.issue_mytoken(restrictions=[{"usages_AT": 5}])
        assert srv.introspect(mt)["token"]["restrictions"] == [{"usages_AT": 5}]
        assert srv.revoke_all() == 1
        with pytest.raises(UsageError, match="401 invalid_token"):
            srv.introspect(mt)


def test_issue_mytoken_rejects_bad_input() -> None:
    with running_devserver() as srv:
        with pytest.raises(UsageError):
            srv.issue_mytoken(restrictions=[{"scope": ["a"]}])
        with pytest.raises(UsageError):
            srv.issue_mytoken(response_type="transfer_code")


def test_handler_bug_answers_500_and_keeps_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    with running_devserver() as srv, client_for(srv) as c:
        api = srv._require_api()

        def broken(req, fault):
            raise RuntimeError("boom")

        monkeypatch.setitem(api.routes, "/jwks", ("jwks", {"GET": broken}))
        r = c.get("/jwks")
        assert r.status_code == 500 and r.json()["error"] == "internal_server_error"
        assert c.get("/op/jwks").status_code == 200


def test_fresh_keys_give_distinct_op_keys() -> None:
    with running_devserver() as a, running_devserver(fresh_keys=True) as b:
        with client_for(a) as ca, client_for(b) as cb:
            kid_a = ca.get("/op/jwks").json()["keys"][0]["kid"]
            kid_b = cb.get("/op/jwks").json()["keys"][0]["kid"]
    assert kid_a != kid_b
