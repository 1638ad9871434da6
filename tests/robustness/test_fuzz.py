"""Bad-input fuzzing (hypothesis): Mytoken responses, JWTs, config files, job ads, CLI arguments.

Every case must end in a result or a ``JobtokenError`` with a one-line message and a
documented exit code; never another exception type, never a traceback, and never one
of the secrets involved (the mytoken sent, the tokens in the fuzzed input) in a message,
a repr, a log record or the terminal.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import secrets
import string
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobtoken import cli
from jobtoken._config import load_config
from jobtoken._errors import JobtokenError, exit_code_for
from jobtoken._mytoken import MytokenClient, clear_discovery_cache
from jobtoken._tokens import AccessToken, check_access_token, decode_access_token
from tests.jwtmint import access_token, mytoken_jwt
from tests.robustness._support import LONG

SCALE = 10 if LONG else 1


# Example counts: the suite's profile is derandomized (tests/conftest.py), so every run
# draws the same cases and a larger count adds fixed coverage, not exploration. Where a
# table of hand-picked cases proves the same property (tests/test__tokens.py for JWT
# checks, tests/test__config.py for config files, tests/test_cli.py for the CLI), the
# count here is what finds the cases nobody thought of in the time a run can spend;
# JOBTOKEN_LONG_TESTS=1 explores ten times as many fresh ones.
def fuzz(examples: int) -> Any:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


DOCUMENTED = {2, 65, 69, 74, 75, 76, 77, 78}

SERVER = "https://mytoken.example.org"
# distinctive secrets: nothing hypothesis generates can contain them by chance
MT = "MTSECRET" + secrets.token_hex(24)
AT = "ATSECRET" + secrets.token_hex(24)
ROTATED = "ROTSECRET" + secrets.token_hex(24)
SECRETS = (MT, AT, ROTATED)


def assert_clean_error(exc: JobtokenError, allowed: Sequence[int], secrets_: Sequence[str]) -> None:
    message = exc.message
    assert message and "\n" not in message and "\r" not in message, repr(message)
    assert exit_code_for(exc) in allowed, (exit_code_for(exc), message)
    for secret in secrets_:
        assert secret not in str(exc) and secret not in repr(exc), message


def assert_no_secret(text: str, secrets_: Sequence[str]) -> None:
    for secret in secrets_:
        assert secret not in text


# --- Mytoken responses ---------------------------------------------------------------------

printable_text = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30)


def _json(text: st.SearchStrategy) -> st.SearchStrategy:
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        text,
    )
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
        ),
        max_leaves=12,
    )


json_value = _json(st.text(max_size=40))
# no line breaks: they hit the bug pinned by test_discovery_error_is_one_line_...
json_value_one_line = _json(printable_text)


def _fields(**strategies: Any) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional=strategies)


mytoken_response = _fields(
    mytoken=st.one_of(st.just(ROTATED), json_value),
    mytoken_type=st.one_of(st.sampled_from(["token", "short_token"]), json_value),
    expires_in=st.one_of(st.integers(-5, 10**12), st.text(max_size=8), json_value),
    mom_id=json_value,
    restrictions=st.one_of(
        st.lists(
            st.fixed_dictionaries(
                {"scope": st.text(max_size=30), "audience": st.lists(st.text(max_size=20))}
            ),
            max_size=2,
        ),
        json_value,
    ),
    capabilities=st.one_of(st.lists(st.sampled_from(["AT", "create_mytoken"])), json_value),
    rotation=json_value,
    transfer_code=json_value,
)
access_response = _fields(
    access_token=st.one_of(st.just(AT), st.just(AT + " x"), json_value),
    token_type=st.one_of(st.just("Bearer"), json_value),
    expires_in=st.one_of(st.integers(-5, 10**12), st.text(max_size=8), json_value),
    scope=st.one_of(st.text(max_size=40), json_value),
    audience=st.one_of(st.lists(st.text(max_size=20), max_size=3), json_value),
    token_update=st.one_of(mytoken_response, json_value),
)
error_response = _fields(
    error=st.one_of(
        st.sampled_from(
            [
                "invalid_token",
                "usage_restricted",
                "oidc_error",
                "temporarily_unavailable",
                "invalid_request",
            ]
        ),
        json_value,
    ),
    # a server that echoes the mytoken back in its description
    error_description=st.one_of(
        st.text(max_size=60), st.just(f"bad token {MT}\nline two"), json_value
    ),
)
body_strategy = st.one_of(
    access_response.map(json.dumps),
    mytoken_response.map(json.dumps),
    error_response.map(json.dumps),
    json_value.map(json.dumps),
    access_response.map(lambda d: json.dumps(d)[: len(json.dumps(d)) // 2]),  # truncated
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.just("Too Many Requests"),
    st.just("x" * 200_000),  # oversize
)
status_strategy = st.one_of(
    st.sampled_from(
        [200, 200, 200, 201, 204, 301, 302, 400, 401, 403, 404, 408, 425, 429, 500, 502, 503]
    ),
    st.integers(100, 599),
)
headers_strategy = _fields(
    **{
        "content-type": st.sampled_from(
            [
                "application/json",
                "text/plain; charset=utf-8",
                "text/html",
                "application/json; charset=latin-1",
            ]
        ),
        "retry-after": st.one_of(
            st.sampled_from(["0", "30", "-1", "1e9", "soon", "", "Wed, 21 Oct 2015 07:28:00 GMT"]),
            st.text(max_size=12),
        ),
        "location": st.sampled_from(
            ["https://elsewhere.example.org/x", "/relative", "", "::bad::"]
        ),
    }
)


class _Canned:
    """A MockTransport handler: a valid discovery document, then whatever the test set."""

    DISCOVERY = {
        "issuer": SERVER,
        "access_token_endpoint": f"{SERVER}/api/v0/token/access",
        "mytoken_endpoint": f"{SERVER}/api/v0/token/my",
        "revocation_endpoint": f"{SERVER}/api/v0/token/revoke",
        "tokeninfo_endpoint": f"{SERVER}/api/v0/tokeninfo",
    }

    def __init__(self) -> None:
        self.discovery: Any = self.DISCOVERY
        self.answer = httpx.Response(200, json={"access_token": AT})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/.well-known/mytoken-configuration"):
            return httpx.Response(200, json=self.discovery)
        return self.answer


@pytest.fixture(scope="module")
def canned() -> Any:
    """One client for all examples (building its TLS context costs ~50 ms)."""
    handler = _Canned()
    with MytokenClient(SERVER, transport=httpx.MockTransport(handler)) as client:
        yield handler, client
    clear_discovery_cache()


@fuzz(300)
@given(
    call=st.sampled_from(["access", "create", "revoke", "introspect"]),
    status=status_strategy,
    body=body_strategy,
    headers=headers_strategy,
)
def test_mytoken_client_survives_any_response(
    call: str,
    status: int,
    body: str,
    headers: Dict[str, str],
    canned: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler, client = canned
    clear_discovery_cache()
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="jobtoken")
    handler.answer = httpx.Response(
        status,
        content=body.encode("utf-8", "surrogatepass"),
        headers={k: v.encode("latin-1", "replace") for k, v in headers.items()},
    )
    result: Any = None
    try:
        if call == "access":
            result = client.get_access_token(
                MT, scopes=["storage.read:/"], audiences=["https://se.example.org"]
            )
        elif call == "create":
            result = client.create_mytoken(
                MT, restrictions=[{"scope": "storage.read:/"}], capabilities=["AT"]
            )
        elif call == "revoke":
            result = client.revoke(MT, recursive=True)
        else:
            result = client.introspect(MT)
    except JobtokenError as exc:
        # an error answer's text/plain excerpt is quoted (first 100 characters); only the
        # mytoken we sent is known to the client and must be redacted from it
        assert_clean_error(exc, (75, 76, 77, 78), SECRETS if 200 <= status < 300 else (MT,))
    if call in ("access", "create", "revoke") and result is not None:
        assert_no_secret(repr(result), SECRETS)
    assert_no_secret(caplog.text, SECRETS)


def test_redirect_to_an_unparsable_location_is_a_protocol_error(canned: Any) -> None:
    handler, client = canned
    clear_discovery_cache()
    # 300/304/305/309...: httpx does not look at Location, jobtoken's redirect message does
    handler.answer = httpx.Response(309, headers={"location": "::bad::"})
    with pytest.raises(JobtokenError) as info:
        client.get_access_token(MT)
    assert_clean_error(info.value, (76,), SECRETS)


@fuzz(150)
@given(
    discovery=st.one_of(
        _fields(
            issuer=json_value_one_line,
            access_token_endpoint=st.one_of(
                st.sampled_from(
                    [
                        f"{SERVER}/api/v0/token/access",
                        "http://mytoken.example.org/x",
                        "ftp://x/y",
                        "https://exa mple.org/x",
                        "",
                        "/relative",
                    ]
                ),
                json_value_one_line,
            ),
            mytoken_endpoint=st.one_of(st.just(f"{SERVER}/api/v0/token/my"), printable_text),
            revocation_endpoint=st.one_of(printable_text, json_value_one_line),
            tokeninfo_endpoint=json_value_one_line,
            jwks_uri=json_value_one_line,
        ),
        json_value_one_line,
    )
)
def test_mytoken_client_survives_any_discovery_document(discovery: Any, canned: Any) -> None:
    handler, client = canned
    clear_discovery_cache()
    handler.discovery = discovery
    handler.answer = httpx.Response(200, json={"access_token": AT})
    try:
        client.get_access_token(MT)
    except JobtokenError as exc:
        assert_clean_error(exc, (75, 76, 77, 78), SECRETS)
    finally:
        handler.discovery = _Canned.DISCOVERY


def test_discovery_error_is_one_line_whatever_the_endpoint_holds(canned: Any) -> None:
    handler, client = canned
    clear_discovery_cache()
    handler.discovery = dict(_Canned.DISCOVERY, access_token_endpoint="https://x.org/\nevil")
    try:
        with pytest.raises(JobtokenError) as info:
            client.get_access_token(MT)
        assert_clean_error(info.value, (76,), SECRETS)
    finally:
        handler.discovery = _Canned.DISCOVERY


# --- JWTs ----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


claim_value = st.one_of(
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=30),
    st.lists(st.text(max_size=30), max_size=3),
    json_value,
)
headers_jwt = _fields(
    alg=st.one_of(
        st.sampled_from(["RS256", "ES256", "EdDSA", "none", "None", "HS256", "hs512", "PS999", ""]),
        json_value,
    ),
    kid=json_value,
    typ=st.one_of(st.just("JWT"), json_value),
)
claims_jwt = _fields(
    **{
        name: claim_value
        for name in ("exp", "iat", "nbf", "iss", "sub", "jti", "aud", "scope", "wlcg.ver")
    }
)
segment = st.one_of(
    st.binary(max_size=60).map(_b64),
    st.text(alphabet=string.ascii_letters + string.digits + "-_=+/.", max_size=40),
)


@st.composite
def jwt_text(draw: Any) -> str:
    kind = draw(st.sampled_from(["claims", "claims", "segments", "raw"]))
    if kind == "claims":
        header = draw(headers_jwt)
        claims = draw(claims_jwt)
        head = _b64(json.dumps(header).encode())
        body = _b64(json.dumps(claims).encode())  # NaN/Infinity included, as Python writes them
        sig = _b64(draw(st.binary(min_size=16, max_size=80)))
        text = f"{head}.{body}.{sig}"
    elif kind == "segments":
        text = ".".join(draw(st.lists(segment, min_size=1, max_size=5)))
    else:
        text = draw(st.text(max_size=80))
    return (
        draw(st.sampled_from(["", " ", "\n", "\t\v"]))
        + text
        + draw(st.sampled_from(["", "\n", " \f"]))
    )


@fuzz(300)
@given(
    raw=jwt_text(),
    scopes=st.lists(
        st.sampled_from(["storage.read:/", "storage.create:/vo", "openid", "storage.read"]),
        max_size=2,
    ),
    auds=st.lists(st.sampled_from(["https://se.example.org", "any"]), max_size=2),
    now=st.floats(0, 2**40),
    min_valid=st.floats(0, 10**6),
    previous=st.one_of(st.none(), st.floats(-(2**40), 2**40)),
)
def test_access_token_checks_survive_any_jwt(
    raw: str,
    scopes: List[str],
    auds: List[str],
    now: float,
    min_valid: float,
    previous: Optional[float],
) -> None:
    parts = [p for p in raw.strip().split(".") if len(p) >= 16]
    # a few characters are no secret: they may occur in any message ("base64url" has a 4)
    hidden = ([raw.strip()] if len(raw.strip()) >= 8 else []) + parts[2:]
    try:
        token = decode_access_token(raw)
        assert isinstance(token, AccessToken)
        assert_no_secret(repr(token), hidden)
        check_access_token(
            token,
            requested_scopes=scopes,
            requested_audiences=auds,
            now=now,
            min_valid_s=min_valid,
            previous=None if previous is None else dataclasses.replace(
                token, expires_at=previous, raw="x", jti="other"
            ),
        )
    except JobtokenError as exc:
        assert_clean_error(exc, (65,), hidden)


# --- config files --------------------------------------------------------------------------

KNOWN_KEYS = {
    "server": ["url", "ca_file", "ca_dir", "allow_http", "timeout_s"],
    "token": [
        "scopes",
        "audiences",
        "mytoken_file",
        "mytoken_env",
        "min_valid_s",
        "trusted_issuers",
    ],
    "site": [
        "parent_mytoken_file",
        "allowed_scopes",
        "allowed_audiences",
        "scope_templates",
        "vo",
        "default_walltime_s",
        "walltime_slack_s",
        "expected_at_lifetime_s",
        "hosts",
        "token_dir_base",
    ],
    "renewal": [
        "fraction",
        "margin_s",
        "max_backoff_s",
        "on_failure",
        "warn_signal",
        "warn_before_s",
        "stop_grace_s",
        "revoke_at_end",
        "metrics_dir",
        "log_json",
    ],
}


def _toml_key(name: str) -> str:
    bare = name and all(c.isalnum() and c.isascii() or c in "_-" for c in name)
    return name if bare else json.dumps(name)


toml_scalar = st.one_of(
    st.text(max_size=30).map(json.dumps),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(lambda f: repr(f).replace("e+", "e")),
    st.sampled_from(
        [
            "true",
            "false",
            "inf",
            "-inf",
            "nan",
            "1979-05-27T07:32:00Z",
            "'literal'",
            '"""multi\nline"""',
            "0x1F",
            "1_000",
            "+1.5e3",
        ]
    ),
)
toml_value = st.recursive(
    toml_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3).map(
            lambda d: "{" + ", ".join(f"{_toml_key(k)} = {v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=6,
)


@st.composite
def toml_text(draw: Any) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=200))
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        section = draw(
            st.one_of(st.sampled_from(list(KNOWN_KEYS)), st.text(min_size=1, max_size=10))
        )
        lines.append(f"[{_toml_key(section)}]")
        keys = KNOWN_KEYS.get(section, []) + ["unknown_key"]
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.one_of(st.sampled_from(keys), st.text(min_size=1, max_size=10)))
            lines.append(f"{_toml_key(key)} = {draw(toml_value)}")
    return "\n".join(lines) + "\n"


env_value = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["1e999", "-1", "nan", "inf", "true", "yes", "0", " ", "storage.read:/ x"]),
)


@fuzz(200)
@given(
    text=toml_text(),
    env=st.dictionaries(
        st.sampled_from(
            [
                "JOBTOKEN_TIMEOUT",
                "JOBTOKEN_ALLOW_HTTP",
                "JOBTOKEN_SCOPE",
                "JOBTOKEN_EXPECTED_AT_LIFETIME",
                "JOBTOKEN_ON_FAILURE",
                "JOBTOKEN_SERVER",
                "JOBTOKEN_MYTOKEN_FILE",
                "JOBTOKEN_MYTOKEN_ENV",
            ]
        ),
        env_value,
        max_size=3,
    ),
)
def test_config_loading_survives_any_file(
    text: str, env: Dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "jobtoken.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(str(path), env=env)
    except JobtokenError as exc:
        assert_clean_error(exc, (78,), ())


def test_config_number_too_large_for_a_float_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "jobtoken.toml"
    path.write_text("[server]\ntimeout_s = 1" + "0" * 400 + "\n")  # tomllib reads big ints
    with pytest.raises(JobtokenError) as info:
        load_config(str(path), env={})
    assert_clean_error(info.value, (78,), ())


# --- job ads -------------------------------------------------------------------------------

AD_ATTRS = [
    "GlobalJobId",
    "JobtokenScope",
    "JobtokenPath",
    "JobtokenAudience",
    "JobtokenMytokenFile",
    "JobtokenServer",
    "Environment",
    "Env",
    "EnvDelim",
    "Owner",
    "AcctGroup",
    "x509UserProxyVOName",
    "OAuthServicesNeeded",
    "MaxWallTimeMins",
    "JobMaxWalltime",
    "RequestWalltime",
    "MaxRuntime",
    "BatchRuntime",
]
classad_value = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30).map(
        lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    ),
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(
        [
            "true",
            "false",
            "undefined",
            "error",
            "1/0",
            '"a" + 1',
            "{1, 2}",
            "[a = 1]",
            "MY.Other",
            '"/vo/out"',
            '"storage.create:/vo a b"',
            '"one=1 two=2"',
            '"a=1;b=2"',
            '"../x"',
            '"x/y"',
            '""',
            "  ",
            "=",
            '"host#123.0#1700000000"',
        ]
    ),
    st.text(max_size=15),
)


@st.composite
def job_ad(draw: Any) -> str:
    lines = []
    if draw(st.booleans()):
        lines.append(f'GlobalJobId = "{draw(st.text(string.printable[:62] + "#.-", max_size=20))}"')
    for _ in range(draw(st.integers(0, 6))):
        attr = draw(st.one_of(st.sampled_from(AD_ATTRS), st.text(min_size=1, max_size=10)))
        lines.append(f"{attr} = {draw(classad_value)}")
    if draw(st.integers(0, 9)) == 0:
        lines.append(draw(st.text(max_size=40)))
    return "\n".join(lines) + "\n"


@fuzz(250)
@given(text=job_ad(), require_walltime=st.booleans())
def test_job_ad_parsing_survives_any_ad(text: str, require_walltime: bool) -> None:
    condor = pytest.importorskip("jobtoken.integrations.condor")
    pytest.importorskip("classad2")  # the HTCondor bindings (htcondor2 package)
    try:
        ad = condor.read_job_ad(text)
        condor.job_request_from_ad(ad, require_walltime=require_walltime)
    except JobtokenError as exc:
        assert_clean_error(exc, (78,), ())


# --- CLI arguments -------------------------------------------------------------------------

# never: run with a payload, sidecar, devserver (they start processes or serve forever)
SUBCOMMANDS = ["token", "inspect", "status", "ensure", "revoke", "prepare", "run", "nosuch", ""]
URLS = [
    "http://127.0.0.1:9",
    "https://127.0.0.1:9",
    "http://[::1]:9",
    "not a url",
    "",
    "http://127.0.0.1:notaport",
    "https://user@127.0.0.1:9/p?q#f",
    "file:///etc/passwd",
]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    d = tmp_path_factory.mktemp("cli")
    files = {
        "garbage": b"\x00\xff not a token \n",
        "empty": b"",
        "at": access_token().encode(),
        "mytoken": mytoken_jwt().encode(),
        "config_ok": b'[server]\nurl = "http://127.0.0.1:9"\nallow_http = true\ntimeout_s = 0.2\n',
        "config_bad": b"[server\nurl = ",
    }
    out = {"missing": str(d / "missing"), "dir": str(d)}
    for name, data in files.items():
        path = d / name
        path.write_bytes(data)
        path.chmod(0o600)
        out[name] = str(path)
    return out


@st.composite
def cli_argv(draw: Any, files: Dict[str, str]) -> List[str]:
    path = st.sampled_from(sorted(files.values()))
    number = st.one_of(
        st.sampled_from(["0", "-1", "nan", "inf", "1e999", "0.2", "x", ""]), st.floats().map(repr)
    )
    options = {
        "-v": None,
        "-q": None,
        "--json": None,
        "--allow-http": None,
        "--help": None,
        "--version": None,
        "--config": path,
        "--server": st.sampled_from(URLS),
        "--mytoken-file": path,
        "--mytoken-env": st.sampled_from(["MY_MT", "", "UNSET"]),
        "--scope": st.sampled_from(["storage.read:/", "storage.create:/vo", "", "a b", "x"]),
        "--audience": st.sampled_from(["https://se.example.org", "", " "]),
        "--timeout": number,
        "--min-valid": number,
        "--out": path,
        "--dir": path,
        "--parent-mytoken-file": path,
        "--walltime": number,
        "--job-id": st.text(max_size=10),
        "--job-scope": st.sampled_from(["storage.create:/vo/x", "storage.modify:/", ""]),
        "--ca-file": path,
        "--ca-dir": path,
        "--trusted-issuer": st.sampled_from(URLS),
    }
    argv = [draw(st.sampled_from(SUBCOMMANDS))]
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.one_of(st.sampled_from(sorted(options)), st.text(max_size=8)))
        argv.append(name)
        value = options.get(name)
        if value is not None and draw(st.integers(0, 9)) > 0:
            argv.append(draw(value))
    if draw(st.booleans()):
        argv.append(draw(path))
    return [a for a in argv if a != "--"]


@fuzz(150)
@given(data=st.data())
def test_cli_survives_any_arguments(
    data: st.DataObject,
    cli_files: Dict[str, str],
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = data.draw(cli_argv(cli_files))
    secret_values = [Path(cli_files["at"]).read_text(), Path(cli_files["mytoken"]).read_text()]
    monkeypatch.setenv("MY_MT", secret_values[1])
    root = logging.getLogger("jobtoken")
    saved = (list(root.handlers), root.level, root.propagate)
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own --help / --version
        assert exc.code in (0, None), exc.code
        assert {"--help", "-h", "--version"} & set(argv), argv
        code = 0
    finally:
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]
    out, err = capsys.readouterr()
    assert code == 0 or code in DOCUMENTED or code == 1 and "internal error" not in err, (
        code,
        argv,
        err,
    )
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if code != 0:
        lines = [ln for ln in err.splitlines() if ln.startswith("jobtoken: error:")]
        if "--json" in argv and lines == []:  # with --json the error is JSON on stdout
            reports = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
            assert len(reports) >= 1 and reports[-1]["ok"] is False, (argv, out, err)
            assert reports[-1]["exit_code"] == code and reports[-1]["error"], (argv, out)
        else:
            assert len(lines) == 1, (argv, err)
    assert_no_secret(out + err, secret_values)
