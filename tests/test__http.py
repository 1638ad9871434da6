from __future__ import annotations

import datetime
import http.server
import ipaddress
import ssl
import threading

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jobtoken._errors import ConfigError, ProtocolError, ServerUnavailableError
from jobtoken._http import (
    DEFAULT_USER_AGENT,
    create_ssl_context,
    http_client,
    is_loopback_host,
    parse_retry_after,
    proxy_for,
    translate_http_error,
    url_problem,
)

_ENV = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "X509_CERT_DIR",
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "HTTP_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("128.0.0.1", False),
        ("10.0.0.1", False),
        ("example.org", False),
        ("localhost.example.org", False),
    ],
)
def test_is_loopback_host(host, loopback):
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    ("url", "allow_http", "ok"),
    [
        ("https://mytoken.example.org", False, True),
        ("https://mytoken.example.org/sub/path", False, True),
        ("http://127.0.0.1:8080", True, True),
        ("http://[::1]:8080", True, True),
        ("http://localhost:8080", True, True),
        ("http://127.0.0.1:8080", False, False),
        ("http://mytoken.example.org", True, False),
        ("http://10.1.2.3", True, False),
        ("ftp://mytoken.example.org", True, False),
        ("mytoken.example.org", False, False),
        ("https://", False, False),
    ],
)
def test_url_problem_http_only_on_loopback(url, allow_http, ok):
    assert (url_problem(url, allow_http=allow_http) is None) is ok


def test_http_client_refuses_http_to_remote_host():
    with pytest.raises(ConfigError, match="loopback") as info:
        http_client("http://mytoken.example.org", timeout_s=5, allow_http=True)
    assert "http://mytoken.example.org" in str(info.value)


def test_http_client_refuses_http_unless_allowed():
    with pytest.raises(ConfigError, match="plain http is not allowed"):
        http_client("http://127.0.0.1:1", timeout_s=5)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), True, "5"])
def test_http_client_refuses_bad_timeouts(timeout):
    with pytest.raises(ConfigError, match="timeout"):
        http_client("https://mytoken.example.org", timeout_s=timeout)


def test_http_client_settings():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["ua"] = request.headers["user-agent"]
        seen["timeout"] = request.extensions["timeout"]
        return httpx.Response(302, headers={"Location": "https://evil.example.org/"})

    with http_client(
        "https://mytoken.example.org", timeout_s=7, transport=httpx.MockTransport(handler)
    ) as client:
        assert client.follow_redirects is False
        assert client.trust_env is False
        response = client.get("/x")
    assert response.status_code == 302  # not followed
    assert seen["ua"] == DEFAULT_USER_AGENT
    assert DEFAULT_USER_AGENT.startswith("jobtoken/")
    assert seen["timeout"] == {"connect": 7.0, "read": 7.0, "write": 7.0, "pool": 7.0}


def test_http_client_custom_user_agent():
    with http_client(
        "https://mytoken.example.org",
        timeout_s=1,
        user_agent="pilot/1.0",
        transport=httpx.MockTransport(lambda r: httpx.Response(200, text=r.headers["user-agent"])),
    ) as client:
        assert client.get("/").text == "pilot/1.0"


# --- CA options -------------------------------------------------------------------------


def _make_cert(tmp_path, name="ca"):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"jobtoken test {name}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = tmp_path / f"{name}.pem"
    key_path = tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _subjects(context):
    return [dict(x[0] for x in c["subject"])["commonName"] for c in context.get_ca_certs()]


def test_ca_file_is_the_only_trust_anchor(tmp_path):
    cert, _ = _make_cert(tmp_path)
    context = create_ssl_context(ca_file=str(cert))
    assert _subjects(context) == ["jobtoken test ca"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_ssl_cert_file_env_replaces_defaults(tmp_path, monkeypatch):
    cert, _ = _make_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert _subjects(create_ssl_context()) == ["jobtoken test ca"]


def test_explicit_ca_wins_over_env(tmp_path, monkeypatch):
    env_cert, _ = _make_cert(tmp_path, "env")
    cfg_cert, _ = _make_cert(tmp_path, "cfg")
    monkeypatch.setenv("SSL_CERT_FILE", str(env_cert))
    assert _subjects(create_ssl_context(ca_file=str(cfg_cert))) == ["jobtoken test cfg"]


def test_ca_dir_and_x509_cert_dir_are_accepted(tmp_path, monkeypatch):
    _make_cert(tmp_path)
    assert create_ssl_context(ca_dir=str(tmp_path)).verify_mode == ssl.CERT_REQUIRED
    monkeypatch.setenv("X509_CERT_DIR", str(tmp_path))
    assert create_ssl_context().verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("kwargs", "env", "why"),
    [
        ({"ca_file": "/nonexistent/ca.pem"}, {}, "CA file .* not found"),
        ({"ca_dir": "/nonexistent/dir"}, {}, "CA directory .* not found"),
        ({}, {"SSL_CERT_FILE": "/nonexistent/ca.pem"}, "SSL_CERT_FILE"),
        ({}, {"X509_CERT_DIR": "/nonexistent/certificates"}, "X509_CERT_DIR"),
    ],
)
def test_missing_ca_locations_are_config_errors(kwargs, env, why, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=why):
        create_ssl_context(**kwargs)


def test_garbage_ca_file_is_config_error(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="cannot load CA"):
        http_client("https://mytoken.example.org", timeout_s=1, ca_file=str(bad))


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def tls_server(tmp_path):
    cert, key = _make_cert(tmp_path, "server")
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", cert
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_tls_with_configured_ca_succeeds(tls_server):
    url, cert = tls_server
    with http_client(url, timeout_s=5, ca_file=str(cert)) as client:
        assert client.get("/").json() == {"ok": True}


def test_tls_verification_failure_is_a_non_retryable_config_error(tls_server, tmp_path):
    url, _ = tls_server
    other, _ = _make_cert(tmp_path, "other")
    with http_client(url, timeout_s=5, ca_file=str(other)) as client:
        with pytest.raises(httpx.ConnectError) as info:
            client.get("/")
    error = translate_http_error(info.value, url=url, action="discovery")
    assert isinstance(error, ConfigError)
    assert error.retryable is False
    assert "TLS certificate verification failed" in str(error) and url in str(error)


# --- proxies ----------------------------------------------------------------------------


def test_https_proxy_is_honoured_for_https_targets_only(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.site:3128")
    monkeypatch.setenv("http_proxy", "http://proxy.site:3128")
    assert proxy_for("https://mytoken.example.org") == "http://proxy.site:3128"
    assert proxy_for("http://127.0.0.1:8080") is None
    assert proxy_for("https://localhost:8443") is None


def test_no_proxy_is_respected(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.site:3128")
    monkeypatch.setenv("NO_PROXY", ".example.org")
    assert proxy_for("https://mytoken.example.org") is None
    assert proxy_for("https://mytoken.other.org") == "http://proxy.site:3128"


def test_no_proxy_without_variables():
    assert proxy_for("https://mytoken.example.org") is None


def test_socks_proxy_is_a_config_error(monkeypatch):
    monkeypatch.setenv("https_proxy", "socks5://proxy.site:1080")
    with pytest.raises(ConfigError, match="https_proxy"):
        http_client("https://mytoken.example.org", timeout_s=1)


def test_http_client_with_proxy_constructs(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.site:3128")
    http_client("https://mytoken.example.org", timeout_s=1).close()


# --- Retry-After and error translation ---------------------------------------------------

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("Fri, 99 Foo 2027 08:00:30", None),
    ],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_http_date():
    now = datetime.datetime(2027, 1, 15, 8, 0, 0, tzinfo=datetime.timezone.utc).timestamp()
    assert parse_retry_after("Fri, 15 Jan 2027 08:00:30 GMT", now) == pytest.approx(30.0, abs=1e-6)
    assert parse_retry_after("Fri, 15 Jan 2027 07:00:00 GMT", now) == 0.0


_REQUEST = httpx.Request("POST", "https://mytoken.example.org/api/v0/token/access")


@pytest.mark.parametrize(
    ("exc", "cls", "retryable"),
    [
        (httpx.ConnectTimeout("t", request=_REQUEST), ServerUnavailableError, True),
        (httpx.ReadTimeout("t", request=_REQUEST), ServerUnavailableError, True),
        (httpx.ConnectError("refused", request=_REQUEST), ServerUnavailableError, True),
        (httpx.ReadError("reset by peer", request=_REQUEST), ServerUnavailableError, True),
        (httpx.RemoteProtocolError("closed", request=_REQUEST), ServerUnavailableError, True),
        (httpx.DecodingError("gzip", request=_REQUEST), ProtocolError, True),
        (httpx.UnsupportedProtocol("x", request=_REQUEST), ConfigError, False),
    ],
)
def test_translate_http_error(exc, cls, retryable):
    error = translate_http_error(exc, url=str(_REQUEST.url), action="access token request")
    assert type(error) is cls
    assert error.retryable is retryable
    assert "access token request failed at https://mytoken.example.org" in str(error)
    assert "\n" not in str(error)


def test_retry_after_with_non_ascii_digits_is_ignored() -> None:
    from jobtoken._http import parse_retry_after

    assert parse_retry_after("\u00b9", now=0.0) is None  # '¹' passes str.isdigit()
    assert parse_retry_after("30", now=0.0) == 30.0
