"""`fetch_access_token`: a checked access token, and a rotated mytoken that is never lost.

The contract under test: the token handed back is what was asked for (scopes within the
request, the audience present, valid at the caller's ``now``, later than ``previous``);
a rotated mytoken is on disk, atomically, before anything can go wrong with the access
token; no error or log line ever carries a token.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List

import httpx
import pytest

from jobtoken._clock import utc_text
from jobtoken._errors import (
    ConfigError,
    ProtocolError,
    ServerUnavailableError,
    TokenCheckError,
    TokenFileError,
)
from jobtoken._exchange import TokenRequest, fetch_access_token
from jobtoken._mytoken import DISCOVERY_PATH, MytokenClient
from jobtoken._mytokenfile import MytokenSource
from jobtoken._tokenfile import write_secret_file
from jobtoken._tokens import AccessToken
from jobtoken.devserver import DevServer, DevServerConfig
from tests import jwtmint
from tests.devserver_fixtures import is_live
from tests.fakes import FakeClock

AUD = "https://se.example.org"
SCOPE = "storage.create:/vo/out"
LIFETIME_S = 1200
REQUEST = TokenRequest(scopes=(SCOPE,), audiences=(AUD,))


@pytest.fixture()
def srv() -> Iterator[DevServer]:
    with DevServer(DevServerConfig(at_lifetime_s=LIFETIME_S, op_scopes=("storage.create:/",),
                                   default_audience=AUD)) as server:
        yield server


@pytest.fixture()
def client(srv: DevServer) -> Iterator[MytokenClient]:
    with MytokenClient(srv.url, allow_http=True, timeout_s=5.0) as c:
        yield c


def mytoken_file(srv: DevServer, tmp_path: Path, *, restricted: bool = True,
                 **kw: Any) -> Path:
    """A job mytoken file; restricted to SCOPE/AUD so the server honours the request."""
    if restricted:
        kw.setdefault("restrictions", [{"scope": SCOPE, "audience": [AUD]}])
    kw.setdefault("capabilities", ["AT"])
    path = tmp_path / "mytoken"
    write_secret_file(path, srv.issue_mytoken(**kw), newline=False)
    return path


def fetch(client: MytokenClient, path: Path, request: TokenRequest = REQUEST,
          **kw: Any) -> AccessToken:
    kw.setdefault("now", time.time())
    return fetch_access_token(client, MytokenSource(path=path), request, **kw)


def secret_parts(raw: str) -> List[str]:
    # the payload and signature alone are as bad to leak as the whole token
    return [raw, *(part for part in raw.split(".")[1:] if len(part) >= 8)]


def leaks(text: str, *secrets: str) -> List[str]:
    return [p for s in secrets if s for p in secret_parts(s) if p in text]


def full_text(exc: BaseException) -> str:
    """Everything a traceback would show, chained causes included."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


# --- what comes back ----------------------------------------------------------------------


def test_token_is_what_was_asked_for(srv: DevServer, client: MytokenClient,
                                     tmp_path: Path) -> None:
    path = mytoken_file(srv, tmp_path)
    now = time.time()
    token = fetch(client, path, now=now)
    assert token.scopes == (SCOPE,)
    assert AUD in token.audiences
    assert token.issuer == srv.op_issuer
    assert now < token.expires_at <= now + LIFETIME_S + 1
    assert len(srv.requests("access")) == 1
    assert token.raw not in repr(token)


def test_server_handing_out_more_than_asked_is_refused(srv: DevServer, client: MytokenClient,
                                                       tmp_path: Path) -> None:
    # an unrestricted mytoken makes the server ask the OP for every scope it has
    path = mytoken_file(srv, tmp_path, restricted=False)
    with pytest.raises(TokenCheckError, match="beyond the request"):
        fetch(client, path, TokenRequest(scopes=("storage.create:/vo/out/sub",)))


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("wider_scope", "beyond the request"),
        ("wrong_audience", "lacks audience"),
        ("expired", "expired"),
        ("alg_none", "unsigned"),
        ("hs256", "symmetric"),
    ],
)
def test_bad_token_is_refused_without_a_trace_of_it(
    srv: DevServer, client: MytokenClient, tmp_path: Path, mocker: Any,
    caplog: pytest.LogCaptureFixture, fault: str, message: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="jobtoken")
    path = mytoken_file(srv, tmp_path)
    mytoken = path.read_text()
    srv.faults.add("access", token=fault)
    answer = mocker.spy(MytokenClient, "get_access_token")
    with pytest.raises(TokenCheckError, match=message) as info:
        fetch(client, path)
    raw = answer.spy_return.access_token
    assert leaks(full_text(info.value), raw, mytoken) == []
    assert leaks(caplog.text, raw, mytoken) == []
    assert "access token obtained" not in caplog.text


def test_token_is_judged_at_the_callers_now(tmp_path: Path) -> None:
    # server and caller agree on a time ten days ahead of this host's clock: were the
    # system clock used instead of ``now``, the token would look issued in the future
    clock = FakeClock(start=time.time() + 10 * 86400)
    with DevServer(DevServerConfig(at_lifetime_s=LIFETIME_S, op_scopes=("storage.create:/",),
                                   default_audience=AUD), clock=clock) as srv, \
            MytokenClient(srv.url, allow_http=True) as client:
        path = mytoken_file(srv, tmp_path)
        token = fetch(client, path, now=clock.now())
        assert token.expires_at == int(clock.now()) + LIFETIME_S
        with pytest.raises(TokenCheckError, match="expired"):
            fetch(client, path, now=clock.now() + LIFETIME_S + 1)


def test_token_too_short_for_min_valid_is_refused(srv: DevServer, client: MytokenClient,
                                                  tmp_path: Path) -> None:
    path = mytoken_file(srv, tmp_path)
    with pytest.raises(TokenCheckError, match="valid for only"):
        fetch(client, path, TokenRequest(scopes=(SCOPE,), audiences=(AUD,),
                                         min_valid_s=LIFETIME_S + 60))


def test_renewal_must_extend_the_previous_token(tmp_path: Path) -> None:
    clock = FakeClock(start=time.time())
    with DevServer(DevServerConfig(at_lifetime_s=LIFETIME_S, op_scopes=("storage.create:/",),
                                   default_audience=AUD), clock=clock) as srv, \
            MytokenClient(srv.url, allow_http=True) as client:
        path = mytoken_file(srv, tmp_path)
        first = fetch(client, path, now=clock.now())
        clock.advance(60)
        second = fetch(client, path, now=clock.now(), previous=first)
        assert second.expires_at > first.expires_at
        clock.advance(60)
        srv.faults.add("access", token="stale_exp", count=1)  # new iat, old exp
        with pytest.raises(TokenCheckError, match="did not extend"):
            fetch(client, path, now=clock.now(), previous=second)


# --- the request sent ----------------------------------------------------------------------

BASE = "https://mytoken.example.org"


class RecordingServer:
    """A MockTransport handler that answers discovery and the AT endpoint, keeping bodies."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.bodies: List[Dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == DISCOVERY_PATH:
            return httpx.Response(200, json={
                "issuer": BASE,
                "access_token_endpoint": f"{BASE}/api/v0/token/access",
                "mytoken_endpoint": f"{BASE}/api/v0/token/my",
            })
        self.bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"access_token": self.token, "token_type": "Bearer",
                                         "expires_in": 1200})


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (TokenRequest(scopes=("storage.read:/vo", "storage.create:/vo/out"),
                      audiences=(AUD, "https://other.example.org"), comment="job 42"),
         {"scope": "storage.read:/vo storage.create:/vo/out",
          "audience": f"{AUD} https://other.example.org", "comment": "job 42"}),
        # nothing asked: the server's defaults apply and nothing is sent in their place
        (TokenRequest(), {}),
    ],
)
def test_request_carries_scopes_audiences_and_comment(
    tmp_path: Path, request_: TokenRequest, expected: Dict[str, str]
) -> None:
    mytoken = jwtmint.mytoken_jwt(iss=BASE)
    path = tmp_path / "mytoken"
    path.write_text(mytoken + "\n")  # as an editor or `echo` leaves it
    path.chmod(0o600)
    server = RecordingServer(jwtmint.access_token(scope="storage.read:/vo",
                                                  aud=[AUD, "https://other.example.org"]))
    with MytokenClient(BASE, transport=httpx.MockTransport(server)) as client:
        fetch(client, path, request_)
    [body] = server.bodies
    assert body.pop("mytoken") == mytoken
    assert body.pop("grant_type") == "mytoken"
    assert body == expected


# --- mytoken loading ------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["missing", "world-readable", "access token"])
def test_unusable_mytoken_is_never_sent(srv: DevServer, client: MytokenClient,
                                        tmp_path: Path, problem: str) -> None:
    path = tmp_path / "mytoken"
    if problem == "world-readable":
        path = mytoken_file(srv, tmp_path)
        path.chmod(0o644)
    elif problem == "access token":
        write_secret_file(path, jwtmint.access_token(scope=SCOPE, aud=AUD))
    with pytest.raises(ConfigError):
        fetch(client, path)
    assert srv.requests("access") == ()


# --- rotation ---------------------------------------------------------------------------------


def test_rotated_mytoken_replaces_the_file_atomically(srv: DevServer, client: MytokenClient,
                                                      tmp_path: Path, mocker: Any) -> None:
    path = mytoken_file(srv, tmp_path, rotation={"on_AT": True})
    path.chmod(0o640)  # group-readable is allowed for a site's robot mytoken
    old = path.read_text()
    old_inode = path.stat().st_ino
    answer = mocker.spy(MytokenClient, "get_access_token")
    with open(path) as reader:  # a reader that had the file open must see it whole
        fetch(client, path)
        assert reader.read() == old
    new = answer.spy_return.token_update.mytoken
    assert path.read_text() == new != old
    assert path.stat().st_ino != old_inode  # renamed over, never rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mytoken"]  # no temp file left
    assert is_live(srv, new) and not is_live(srv, old)


def test_rotated_mytoken_is_saved_before_the_token_is_judged(
    srv: DevServer, client: MytokenClient, tmp_path: Path
) -> None:
    path = mytoken_file(srv, tmp_path, rotation={"on_AT": True})
    old = path.read_text()
    seen: List[str] = []

    class Recorder:
        def verify(self, token: AccessToken) -> None:
            seen.append(path.read_text())

    fetch(client, path, verifier=Recorder())
    assert seen and seen[0] != old and is_live(srv, seen[0])


def test_rotated_mytoken_survives_a_refused_token(srv: DevServer, client: MytokenClient,
                                                  tmp_path: Path) -> None:
    # the old mytoken is dead once the server rotated it: losing the new one loses the job
    path = mytoken_file(srv, tmp_path, rotation={"on_AT": True})
    old = path.read_text()
    srv.faults.add("access", token="wider_scope", count=1)
    with pytest.raises(TokenCheckError):
        fetch(client, path)
    assert path.read_text() != old and is_live(srv, path.read_text())
    fetch(client, path)  # the chain goes on from the saved mytoken


def test_implausible_rotation_keeps_the_old_mytoken(srv: DevServer, client: MytokenClient,
                                                    tmp_path: Path) -> None:
    path = mytoken_file(srv, tmp_path)
    before = path.read_bytes()
    srv.faults.add("access", status=200, body=json.dumps({
        "access_token": jwtmint.access_token(scope=SCOPE, aud=AUD),
        "token_type": "Bearer",
        "expires_in": 1200,
        "token_update": {"mytoken": "short"},
    }))
    with pytest.raises(ProtocolError):
        fetch(client, path)
    assert path.read_bytes() == before


def test_rotation_that_cannot_be_saved_stops_before_the_token_is_used(
    srv: DevServer, client: MytokenClient, tmp_path: Path, mocker: Any
) -> None:
    path = mytoken_file(srv, tmp_path, rotation={"on_AT": True})
    before = path.read_bytes()
    mocker.patch("jobtoken._tokenfile.os.rename",
                 side_effect=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    verifier = mocker.Mock()
    with pytest.raises(TokenFileError, match=str(path)):
        fetch(client, path, verifier=verifier)
    verifier.verify.assert_not_called()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mytoken"]


def test_rotation_of_a_mytoken_from_a_variable_is_an_error(
    srv: DevServer, client: MytokenClient, monkeypatch: pytest.MonkeyPatch, mocker: Any
) -> None:
    mytoken = srv.issue_mytoken(capabilities=["AT"], rotation={"on_AT": True},
                                restrictions=[{"scope": SCOPE, "audience": [AUD]}])
    monkeypatch.setenv("MYTOKEN_JOB", mytoken)
    answer = mocker.spy(MytokenClient, "get_access_token")
    with pytest.raises(ConfigError, match=r"\$MYTOKEN_JOB.*--mytoken-file") as info:
        fetch_access_token(client, MytokenSource(env_var="MYTOKEN_JOB"), REQUEST,
                           now=time.time())
    rotated = answer.spy_return.token_update.mytoken
    assert leaks(full_text(info.value), mytoken, rotated,
                 answer.spy_return.access_token) == []


# --- verifier ----------------------------------------------------------------------------------


def test_verifier_sees_the_token_that_is_returned(srv: DevServer, client: MytokenClient,
                                                  tmp_path: Path) -> None:
    seen: List[AccessToken] = []

    class Recorder:
        def verify(self, token: AccessToken) -> None:
            seen.append(token)

    token = fetch(client, mytoken_file(srv, tmp_path), verifier=Recorder())
    assert seen == [token]


@pytest.mark.parametrize(
    "refusal",
    [TokenCheckError("access token jti=x has a bad signature"),
     ServerUnavailableError("jwks fetch failed at https://op.example.org/jwks")],
)
def test_verifier_refusal_propagates(srv: DevServer, client: MytokenClient, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture,
                                     refusal: Exception) -> None:
    caplog.set_level(logging.INFO, logger="jobtoken")

    class Refuser:
        def verify(self, token: AccessToken) -> None:
            raise refusal

    with pytest.raises(type(refusal)) as info:
        fetch(client, mytoken_file(srv, tmp_path), verifier=Refuser())
    assert info.value is refusal
    assert "access token obtained" not in caplog.text


# --- audit log ------------------------------------------------------------------------------------


def test_audit_line_names_the_token_never_shows_it(srv: DevServer, client: MytokenClient,
                                                   tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="jobtoken")
    path = mytoken_file(srv, tmp_path, rotation={"on_AT": True})
    old = path.read_text()
    token = fetch(client, path)
    [line] = [r.getMessage() for r in caplog.records
              if r.name == "jobtoken._exchange" and r.levelno == logging.INFO]
    assert f"jti={token.jti}" in line and token.jti
    assert f"sub={token.subject}" in line and token.subject
    assert f"scope={SCOPE}" in line
    assert f"exp={utc_text(token.expires_at)}" in line  # UTC, as every logged time
    assert leaks(caplog.text, token.raw, old, path.read_text()) == []
