"""`jobtoken token` / `inspect` as library calls, and how clients and verifiers are built.

What users rely on: the token lands where WLCG discovery will look, private (0600) and
checked; a still-good token is kept without asking the server; the server is the
configured one, else the mytoken's own ``iss``; a mytoken never travels over plain http
except to loopback when allowed; ``inspect`` shows claims, never the token.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from jobtoken._config import Config, ServerConfig, TokenConfig
from jobtoken._errors import (
    ConfigError,
    JobtokenError,
    MytokenRejectedError,
    ServerUnavailableError,
    TokenCheckError,
    TokenFileError,
)
from jobtoken._mytoken import clear_discovery_cache
from jobtoken._mytokenfile import MytokenSource
from jobtoken._oneshot import (
    build_verifier,
    client_for,
    get_token,
    inspect_token,
    mytoken_client,
    mytoken_source,
    server_url_for,
    summarize,
    verifier_for,
)
from jobtoken._tokenfile import write_secret_file
from jobtoken._tokens import decode_access_token
from jobtoken.devserver import DevServer, DevServerConfig
from tests import jwtmint

AUD = "https://se.example.org"
SCOPE = "storage.create:/vo/out"
LIFETIME_S = 1200
DEVCONFIG = DevServerConfig(at_lifetime_s=LIFETIME_S, op_scopes=("storage.create:/",),
                            default_audience=AUD)


@pytest.fixture()
def srv() -> Iterator[DevServer]:
    with DevServer(DEVCONFIG) as server:
        yield server


def issue(srv: DevServer) -> str:
    return srv.issue_mytoken(capabilities=["AT"],
                             restrictions=[{"scope": SCOPE, "audience": [AUD]}])


def mytoken_file(srv: DevServer, tmp_path: Path) -> Path:
    path = tmp_path / "mytoken"
    write_secret_file(path, issue(srv), newline=False)
    return path


def config(srv: Optional[DevServer], mytoken: Optional[Path] = None, *,
           url: Optional[str] = "server", allow_http: bool = True, **token: Any) -> Config:
    token.setdefault("scopes", (SCOPE,))
    token.setdefault("audiences", (AUD,))
    if mytoken is not None:
        token["mytoken_file"] = str(mytoken)
    return Config(
        server=ServerConfig(url=srv.url if url == "server" and srv else url,
                            allow_http=allow_http, timeout_s=5.0),
        token=TokenConfig(**token),
    )


def secret_parts(raw: str) -> list:
    return [raw, *(p for p in raw.split(".")[1:] if len(p) >= 8)]


# --- get_token ---------------------------------------------------------------------------------


@pytest.fixture()
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def test_token_is_written_private_and_checked(srv: DevServer, tmp_path: Path,
                                              permissive_umask: None) -> None:
    out = tmp_path / "bt"
    result = get_token(config(srv, mytoken_file(srv, tmp_path)), out=str(out))
    assert result.path == out and result.reused is False
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text() == result.token.raw + "\n"
    assert result.token.scopes == (SCOPE,) and AUD in result.token.audiences
    assert len(srv.requests("access")) == 1
    shown = repr(result) + json.dumps(result.summary()) + result.human()
    assert not [p for p in secret_parts(result.token.raw) if p in shown]
    assert result.human().startswith(f"wrote {out} ")


@pytest.mark.parametrize(
    ("out", "env", "expected"),
    [
        ("given", {"BEARER_TOKEN_FILE": "named"}, "given"),
        (None, {"BEARER_TOKEN_FILE": "named", "XDG_RUNTIME_DIR": "."}, "named"),
        (None, {"XDG_RUNTIME_DIR": "."}, f"bt_u{os.geteuid()}"),
    ],
)
def test_token_goes_where_wlcg_discovery_looks(srv: DevServer, tmp_path: Path,
                                               out: Optional[str], env: dict,
                                               expected: str) -> None:
    env = {k: str(tmp_path / v) for k, v in env.items()}
    result = get_token(config(srv, mytoken_file(srv, tmp_path)),
                       out=str(tmp_path / out) if out else None, env=env)
    assert result.path == tmp_path / expected
    assert (tmp_path / expected).read_text().strip() == result.token.raw


def test_missing_directory_fails_before_any_request(srv: DevServer, tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="does not exist"):
        get_token(config(srv, mytoken_file(srv, tmp_path)), out=str(tmp_path / "no" / "bt"))
    assert srv.requests() == ()


def test_good_token_is_kept_without_a_request(srv: DevServer, tmp_path: Path) -> None:
    out = tmp_path / "bt"
    mt = mytoken_file(srv, tmp_path)
    first = get_token(config(srv, mt), out=str(out))
    before = out.read_bytes()
    again = get_token(config(srv, mt, min_valid_s=60.0), out=str(out))
    assert again.reused is True and again.token.jti == first.token.jti
    assert again.human().startswith(f"kept {out} ")
    assert out.read_bytes() == before
    assert len(srv.requests("access")) == 1


@pytest.mark.parametrize(
    "existing",
    [
        dict(lifetime_s=30),  # valid, but not for min_valid_s
        dict(lifetime_s=-60),  # expired
        dict(scope="storage.create:/vo"),  # wider than asked
        dict(aud="https://other.example.org"),  # not for our storage
        "not-a-token",
    ],
    ids=["short", "expired", "wider", "audience", "garbage"],
)
def test_unsuitable_token_is_replaced(srv: DevServer, tmp_path: Path, existing: Any) -> None:
    out = tmp_path / "bt"
    if isinstance(existing, dict):
        existing.setdefault("scope", SCOPE)
        existing.setdefault("aud", AUD)
        write_secret_file(out, jwtmint.access_token(**existing))
    else:
        write_secret_file(out, existing)
    result = get_token(config(srv, mytoken_file(srv, tmp_path), min_valid_s=60.0),
                       out=str(out))
    assert result.reused is False
    assert out.read_text().strip() == result.token.raw
    assert len(srv.requests("access")) == 1


def test_without_min_valid_a_token_is_always_fetched(srv: DevServer, tmp_path: Path) -> None:
    out = tmp_path / "bt"
    write_secret_file(out, jwtmint.access_token(scope=SCOPE, aud=AUD))
    result = get_token(config(srv, mytoken_file(srv, tmp_path)), out=str(out))
    assert result.reused is False and len(srv.requests("access")) == 1


def test_refused_token_leaves_the_old_file_alone(srv: DevServer, tmp_path: Path) -> None:
    out = tmp_path / "bt"
    write_secret_file(out, jwtmint.access_token(scope=SCOPE, aud=AUD, lifetime_s=10))
    before = out.read_bytes()
    srv.faults.add("access", token="wider_scope")
    with pytest.raises(TokenCheckError):
        get_token(config(srv, mytoken_file(srv, tmp_path)), out=str(out))
    assert out.read_bytes() == before


def test_server_is_taken_from_the_mytoken_when_not_configured(srv: DevServer,
                                                              tmp_path: Path) -> None:
    result = get_token(config(srv, mytoken_file(srv, tmp_path), url=None),
                       out=str(tmp_path / "bt"))
    assert result.token.scopes == (SCOPE,)
    assert len(srv.requests("access")) == 1


def test_configured_server_wins_over_the_mytoken_iss(srv: DevServer, tmp_path: Path) -> None:
    with DevServer(DEVCONFIG) as other:
        with pytest.raises(MytokenRejectedError):
            get_token(config(other, mytoken_file(srv, tmp_path)), out=str(tmp_path / "bt"))
        assert len(other.requests("access")) == 1
    assert srv.requests() == ()


def test_plain_http_is_refused_unless_allowed(srv: DevServer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plain http"):
        get_token(config(srv, mytoken_file(srv, tmp_path), allow_http=False),
                  out=str(tmp_path / "bt"))
    assert srv.requests() == ()


def test_mytoken_naming_a_remote_http_server_is_not_sent(tmp_path: Path) -> None:
    # allow_http is for loopback tests; a mytoken's iss must not lure it onto the network
    mt = tmp_path / "mytoken"
    write_secret_file(mt, jwtmint.mytoken_jwt(iss="http://mytoken.example.org"))
    with pytest.raises(ConfigError, match="loopback"):
        get_token(config(None, mt, url=None, allow_http=True), out=str(tmp_path / "bt"))
    assert not (tmp_path / "bt").exists()


def test_mytoken_from_a_variable(srv: DevServer, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYTOKEN_JOB", issue(srv))
    result = get_token(config(srv, mytoken_env="MYTOKEN_JOB"), out=str(tmp_path / "bt"))
    assert result.token.scopes == (SCOPE,)


def test_mytoken_from_a_variable_in_the_given_environment(
    srv: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``env`` stands in for os.environ: the server is found from env's mytoken, so that
    # same mytoken must be the one exchanged; a different one in the process environment
    # (another server's) must never be sent to this server
    with DevServer(DEVCONFIG) as other:
        monkeypatch.setenv("MYTOKEN_JOB", issue(other))
        env = {"MYTOKEN_JOB": issue(srv), "XDG_RUNTIME_DIR": str(tmp_path)}
        result = get_token(config(srv, url=None, mytoken_env="MYTOKEN_JOB"), env=env)
        assert other.requests() == ()
    assert result.path == tmp_path / f"bt_u{os.geteuid()}"
    assert len(srv.requests("access")) == 1


def test_no_mytoken_configured(srv: DevServer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--mytoken-file"):
        get_token(config(srv), out=str(tmp_path / "bt"))
    assert srv.requests() == ()


def test_signature_is_verified_for_trusted_issuers(srv: DevServer, tmp_path: Path) -> None:
    result = get_token(config(srv, mytoken_file(srv, tmp_path),
                              trusted_issuers=(srv.op_issuer,)), out=str(tmp_path / "bt"))
    assert result.token.issuer == srv.op_issuer
    assert len(srv.requests("op-jwks")) == 1


def test_token_from_an_untrusted_issuer_is_not_written(srv: DevServer, tmp_path: Path) -> None:
    with pytest.raises(TokenCheckError, match="untrusted issuer"):
        get_token(config(srv, mytoken_file(srv, tmp_path),
                         trusted_issuers=("https://op.example.org",)),
                  out=str(tmp_path / "bt"))
    assert not (tmp_path / "bt").exists()


# --- server_url_for / mytoken_source ------------------------------------------------------------

NO_URL = Config()


def fake_jwt(claims: dict) -> str:
    """A JWT-shaped string with claims pyjwt would refuse to sign (e.g. a numeric ``iss``)."""
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'ES256', 'typ': 'MT+JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("cfg", "mytoken", "expected"),
    [
        (config(None, url="https://configured.example.org"),
         jwtmint.mytoken_jwt(iss="https://iss.example.org"), "https://configured.example.org"),
        (config(None, url="https://configured.example.org"), None,
         "https://configured.example.org"),
        (NO_URL, jwtmint.mytoken_jwt(iss="https://iss.example.org"), "https://iss.example.org"),
    ],
)
def test_server_url(cfg: Config, mytoken: Optional[str], expected: str) -> None:
    assert server_url_for(cfg, mytoken) == expected


@pytest.mark.parametrize(
    "mytoken",
    [
        None,
        "o" * 64,  # a short (opaque) mytoken does not name its server
        jwtmint.mytoken_jwt(iss=""),
        fake_jwt({"token_type": "mytoken", "iss": 42}),
        "not.a.jwt-but-three-parts",
    ],
    ids=["none", "opaque", "empty-iss", "numeric-iss", "malformed"],
)
def test_server_url_cannot_be_found(mytoken: Optional[str]) -> None:
    with pytest.raises(ConfigError, match=r"server.url \(--server, \$JOBTOKEN_SERVER\)"):
        server_url_for(NO_URL, mytoken)


def test_mytoken_source_follows_the_config(tmp_path: Path) -> None:
    by_file = Config(token=TokenConfig(mytoken_file=str(tmp_path / "mt")))
    by_env = Config(token=TokenConfig(mytoken_env="MYTOKEN_JOB"))
    assert mytoken_source(by_file) == MytokenSource(path=tmp_path / "mt")
    assert mytoken_source(by_env) == MytokenSource(env_var="MYTOKEN_JOB")
    named = r"token.mytoken_file \(--mytoken-file, .*token.mytoken_env \(--mytoken-env"
    with pytest.raises(ConfigError, match=named):
        mytoken_source(Config())


# --- client_for / mytoken_client ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allow_http"),
    [
        ("http://127.0.0.1:8000", False),
        ("http://mytoken.example.org", True),
        ("http://10.0.0.1:8000", True),
        ("ftp://mytoken.example.org", True),
    ],
)
def test_client_refuses_to_send_a_mytoken_in_clear(url: str, allow_http: bool) -> None:
    with pytest.raises(ConfigError):
        client_for(ServerConfig(allow_http=allow_http), url)
    with pytest.raises(ConfigError):
        mytoken_client(Config(server=ServerConfig(allow_http=allow_http)), url)


def test_client_uses_the_configured_server(srv: DevServer) -> None:
    with mytoken_client(Config(server=ServerConfig(allow_http=True)), srv.url) as client:
        assert client.metadata().access_token_endpoint.startswith(srv.url + "/")
    assert len(srv.requests("discovery")) == 1


def test_client_honours_the_timeout(srv: DevServer) -> None:
    srv.faults.add("discovery", delay_s=10.0)
    start = time.monotonic()
    with client_for(ServerConfig(allow_http=True, timeout_s=0.2), srv.url) as client:
        with pytest.raises(ServerUnavailableError, match="timed out"):
            client.metadata()
    assert time.monotonic() - start < 5.0


def test_client_trusts_the_configured_ca(tmp_path: Path) -> None:
    with DevServer(DevServerConfig(tls_dir=str(tmp_path / "tls"))) as tls:
        assert tls.ca_file is not None
        with client_for(ServerConfig(ca_file=tls.ca_file), tls.url) as client:
            client.metadata()
        clear_discovery_cache()
        with client_for(ServerConfig(), tls.url) as client:
            with pytest.raises(ConfigError, match="TLS certificate verification failed"):
                client.metadata()


# --- verifier_for / build_verifier -------------------------------------------------------------


def devserver_token(srv: DevServer, tmp_path: Path) -> Any:
    return get_token(config(srv, mytoken_file(srv, tmp_path)), out=str(tmp_path / "bt")).token


def test_no_trusted_issuers_means_no_verification() -> None:
    assert verifier_for(ServerConfig(), ()) is None
    assert build_verifier(Config()) is None


def test_verifier_checks_signatures_of_trusted_issuers(srv: DevServer, tmp_path: Path) -> None:
    token = devserver_token(srv, tmp_path)
    verifier = build_verifier(config(srv, trusted_issuers=(srv.op_issuer,)))
    verifier.verify(token)
    forged = decode_access_token(jwtmint.access_token(iss=srv.op_issuer, scope=SCOPE, aud=AUD))
    with pytest.raises(TokenCheckError):
        verifier.verify(forged)  # right issuer, someone else's key
    stranger = decode_access_token(jwtmint.access_token(scope=SCOPE, aud=AUD))
    with pytest.raises(TokenCheckError, match="untrusted issuer"):
        verifier.verify(stranger)


def test_verifier_fetches_keys_under_the_same_http_rules(srv: DevServer,
                                                         tmp_path: Path) -> None:
    token = devserver_token(srv, tmp_path)
    srv.clear_requests()
    verifier = verifier_for(ServerConfig(allow_http=False), (srv.op_issuer,))
    with pytest.raises(ConfigError):
        verifier.verify(token)
    assert srv.requests() == ()


# --- inspect_token / summarize -------------------------------------------------------------------


def test_inspect_shows_claims_never_the_token(tmp_path: Path) -> None:
    raw = jwtmint.access_token(scope=SCOPE, aud=AUD, lifetime_s=600)
    path = tmp_path / "bt"
    write_secret_file(path, raw)
    data = inspect_token(str(path))
    claims = decode_access_token(raw)
    assert data["source"] == str(path)
    assert data["jti"] == claims.jti and data["sub"] == claims.subject
    assert data["scopes"] == [SCOPE] and data["audiences"] == [AUD]
    assert 0 < data["remaining_s"] <= 600
    shown = json.dumps(data)
    assert not [p for p in secret_parts(raw) if p in shown]


def test_inspect_shows_an_expired_token(tmp_path: Path) -> None:
    path = tmp_path / "bt"
    write_secret_file(path, jwtmint.access_token(lifetime_s=-120))
    data = inspect_token(str(path))
    assert data["remaining_s"] < 0
    assert data["remaining_human"].startswith("expired ")


def test_inspect_finds_the_token_as_payload_tools_would(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    named = tmp_path / "named"
    write_secret_file(named, jwtmint.access_token(sub="from-file"))
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(named))
    assert inspect_token()["source"] == str(named)
    monkeypatch.setenv("BEARER_TOKEN", jwtmint.access_token(sub="from-variable"))
    data = inspect_token()
    assert data["source"] == "BEARER_TOKEN" and data["sub"] == "from-variable"


def test_inspect_without_any_token(mocker: Any) -> None:
    mocker.patch("jobtoken._oneshot.discover_bearer_token", return_value=None)
    with pytest.raises(TokenFileError, match="no bearer token found"):
        inspect_token()


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, TokenFileError, "is empty"),
        (jwtmint.mytoken_jwt(), TokenCheckError, "holds a mytoken"),
        ("o" * 64, TokenCheckError, "not a JWT"),
    ],
    ids=["empty", "mytoken", "opaque"],
)
def test_inspect_refuses_what_is_no_access_token(tmp_path: Path, content: Optional[str],
                                                 error: type, message: str) -> None:
    path = tmp_path / "bt"
    path.write_text(content or "\n")
    with pytest.raises(error, match=message) as info:
        inspect_token(str(path))
    if content:
        assert content not in str(info.value)


def test_inspect_raises_only_documented_errors_for_a_far_future_exp(tmp_path: Path) -> None:
    # the CLI turns anything but a JobtokenError into "internal error"; an exp past what
    # the platform's gmtime handles must be shown or refused, not crash ``inspect``
    path = tmp_path / "bt"
    write_secret_file(path, jwtmint.access_token(exp=10**20))
    try:
        data = inspect_token(str(path))
    except JobtokenError:
        return
    assert data["exp"] == 10**20


T0 = 1_800_000_000  # 2027-01-15T08:00:00Z


@pytest.mark.parametrize(
    ("lifetime_s", "now", "remaining", "human"),
    [
        (3725, T0, 3725, "1h02m05s left"),
        (59, T0, 59, "0m59s left"),
        (600, T0 + 690, -90, "expired 1m30s ago"),
        (60, T0 + 3660 + 60, -3660, "expired 1h01m00s ago"),
    ],
)
def test_summary_tells_how_long_is_left(lifetime_s: int, now: float, remaining: int,
                                        human: str) -> None:
    token = decode_access_token(jwtmint.access_token(now=T0, lifetime_s=lifetime_s))
    data = summarize(token, now)
    assert data["remaining_s"] == remaining
    assert data["remaining_human"] == human
    expected_exp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + lifetime_s))
    assert data["exp_utc"] == expected_exp


def test_a_planted_default_token_file_is_refused_with_the_reason(
    srv: DevServer, tmp_path: Path
) -> None:
    # issue 12 item 9: another user creates /tmp/bt_u<uid> first (here: a shared 1777
    # directory standing in for /tmp via XDG_RUNTIME_DIR)
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    planted = shared / f"bt_u{os.geteuid()}"
    planted.write_text("the attacker's token")
    os.chown(planted, 4242, 4242)
    with pytest.raises(TokenFileError, match="belongs to uid 4242.*planted"):
        get_token(config(srv, mytoken_file(srv, tmp_path)), env={"XDG_RUNTIME_DIR": str(shared)})
    assert srv.requests() == ()


def test_scopes_asked_of_an_unrestricted_mytoken_get_the_reason(
    srv: DevServer, tmp_path: Path
) -> None:
    # issue 12 item 19: the server ignores requested scopes for a mytoken without a scope
    # restriction, so the token is always wider than asked; say why, not only "65"
    mt = tmp_path / "mt"
    write_secret_file(mt, srv.issue_mytoken(capabilities=["AT"]), newline=False)
    cfg = config(srv, mt)
    with pytest.raises(TokenCheckError) as info:
        get_token(cfg, out=str(tmp_path / "bt"))
    assert "has no scope restriction" in info.value.message
    assert "ignores the requested scopes" in info.value.message
