"""``jobtoken credmon`` against a credential directory laid out as the credd lays it out.

``<cred dir>/<user>/<name>.top`` as the storer stores it (and foreign Vault/scitokens
``.top`` files), ``<user>.mark`` sweep markers; the credmon must keep an *access token*
in each jobtoken ``.use`` (never the mytoken), renew it in time, never delete it, leave
other credmons' files alone, and keep scanning for everyone when one credential is bad.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from jobtoken._config import Config, ServerConfig
from jobtoken._errors import ConfigError, ServerUnavailableError
from jobtoken._tokens import decode_access_token
from jobtoken.devserver import DevServer
from jobtoken.integrations.condor_credmon import (
    COMPLETE_MARKER,
    PID_FILE,
    check_cred_dir,
    credmon_log_path,
    json_depth_within,
    read_top,
    refresh_reason,
    run_credmon,
    scan_credentials,
    site_runs_oauth_credmon,
    token_minter,
)
from jobtoken.integrations.condor_storer import SubmissionToken, top_content

from .conftest import AUDIENCE, base_env, toml_config

SCOPE = "storage.create:/dteam"


def top_json(mytoken: str, server: str, expires_at: Optional[float] = None) -> bytes:
    return top_content(
        SubmissionToken(
            mytoken,
            server,
            "m-1",
            expires_at if expires_at is not None else time.time() + 3600,
            (SCOPE,),
            (AUDIENCE,),
        )
    )


@pytest.fixture
def cred_dir(tmp_path: Path) -> Path:
    d = tmp_path / "oauth_credentials"
    d.mkdir(mode=0o2770)
    os.chmod(d, 0o2770)
    (d / "alice").mkdir(mode=0o700)
    (d / "bob").mkdir(mode=0o700)
    (d / "bob.mark").write_text("")
    return d


@pytest.fixture
def mint(srv: DevServer) -> Any:
    return token_minter(Config(server=ServerConfig(url=srv.url, allow_http=True, timeout_s=5.0)))


def put(path: Path, data: Any) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, data if isinstance(data, bytes) else data.encode())
    os.close(fd)
    return path


def user_mytoken(srv: DevServer) -> str:
    return srv.issue_mytoken(
        capabilities=["AT", "create_mytoken"],
        restrictions=[{"scope": SCOPE, "audience": [AUDIENCE]}],
    )


def test_use_holds_an_access_token_never_the_mytoken(
    srv: DevServer, cred_dir: Path, mint: Any
) -> None:
    mt = user_mytoken(srv)
    put(cred_dir / "alice" / "jobtoken_prod.top", top_json(mt, srv.url))
    vault = put(cred_dir / "alice" / "dune.top", '{"vault_token": "hvs.x", "vault_url": "u"}')
    put(cred_dir / "alice" / "scitokens.top", "alice")  # the local issuer's marker
    report = scan_credentials(cred_dir, now=time.time(), mint=mint)
    assert report.written == ("alice/jobtoken_prod",)
    assert set(report.foreign) == {"alice/dune", "alice/scitokens"}
    use = cred_dir / "alice" / "jobtoken_prod.use"
    assert stat.S_IMODE(use.stat().st_mode) == 0o600
    text = use.read_text()
    assert mt not in text and text.endswith("\n") and text.count("\n") == 1
    token = decode_access_token(text)  # a bare bearer token, as BEARER_TOKEN_FILE wants
    assert token.scopes == (SCOPE,) and token.audiences == (AUDIENCE,)
    assert not (cred_dir / "alice" / "dune.use").exists()
    assert not (cred_dir / "alice" / "scitokens.use").exists()
    assert vault.read_text().startswith('{"vault_token"')
    # a fresh token is not minted again
    inode = use.stat().st_ino
    again = scan_credentials(cred_dir, now=time.time(), mint=mint)
    assert again.unchanged == ("alice/jobtoken_prod",) and use.stat().st_ino == inode


def test_a_newer_top_gets_a_new_token(srv: DevServer, cred_dir: Path, mint: Any) -> None:
    top = put(cred_dir / "bob" / "jobtoken.top", top_json(user_mytoken(srv), srv.url))
    scan_credentials(cred_dir, now=time.time(), mint=mint)
    use = cred_dir / "bob" / "jobtoken.use"
    first = use.read_text()
    later = use.stat().st_mtime + 5
    put(top, top_json(user_mytoken(srv), srv.url))
    os.utime(top, (later, later))  # the storer stored a new submission mytoken
    report = scan_credentials(cred_dir, now=time.time(), mint=mint)
    assert report.written == ("bob/jobtoken",) and use.read_text() != first


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(use_mtime=None, issued_at=None, expires_at=None), "missing"),
        (dict(top_mtime=110.0), "new credential"),
        (dict(expires_at=1000.0 + 420.0), "expiring"),  # inside min_remaining_s
        (dict(issued_at=0.0, expires_at=1000.0 + 900.0), "expiring"),  # past half its life
        (dict(), None),
    ],
)
def test_refresh_reason(kwargs: Any, expected: Optional[str]) -> None:
    base = dict(
        now=1000.0,
        top_mtime=90.0,
        use_mtime=100.0,
        issued_at=900.0,
        expires_at=1000.0 + 1100.0,
        min_remaining_s=420.0,
    )
    base.update(kwargs)
    assert refresh_reason(**base) == expected  # type: ignore[arg-type]


def test_expired_mytoken_never_deletes_the_use(srv: DevServer, cred_dir: Path, mint: Any) -> None:
    top = put(cred_dir / "alice" / "jobtoken.top", top_json(user_mytoken(srv), srv.url))
    scan_credentials(cred_dir, now=time.time(), mint=mint)
    use = cred_dir / "alice" / "jobtoken.use"
    before = use.read_text()
    put(top, top_json(user_mytoken(srv), srv.url, expires_at=time.time() - 1))
    later = use.stat().st_mtime + 5
    os.utime(top, (later, later))
    report = scan_credentials(cred_dir, now=time.time(), mint=mint)
    assert report.expired == ("alice/jobtoken",)
    assert use.read_text() == before  # a running job's shadow would hold it otherwise


def test_failed_renewal_keeps_the_old_use_and_serves_the_others(
    srv: DevServer, cred_dir: Path, mint: Any
) -> None:
    alice_mt = user_mytoken(srv)
    put(cred_dir / "alice" / "jobtoken.top", top_json(alice_mt, srv.url))
    scan_credentials(cred_dir, now=time.time(), mint=mint)
    alice_use = cred_dir / "alice" / "jobtoken.use"
    before = alice_use.read_text()
    put(cred_dir / "bob" / "jobtoken.top", top_json(user_mytoken(srv), srv.url))

    def flaky(now: float, cred: Any) -> Any:
        if cred.mytoken == alice_mt:
            raise ServerUnavailableError("server down")
        return mint(now, cred)

    # alice's token must be renewed (far in the future), and the server is down for her
    report = scan_credentials(cred_dir, now=time.time() + 1000, mint=flaky)
    assert "alice/jobtoken" in report.errors
    assert alice_use.read_text() == before
    assert (cred_dir / "bob" / "jobtoken.use").exists()


def deeply_nested_top(depth: int) -> bytes:
    return ('{"mytoken": ' + "[" * depth + "]" * depth + "}").encode()


def test_poisoned_credential_does_not_stop_the_scan(
    srv: DevServer, cred_dir: Path, mint: Any
) -> None:
    """Issue 12.1: any AP user can store arbitrary bytes as their jobtoken.top."""
    put(cred_dir / "alice" / "jobtoken.top", deeply_nested_top(30000))  # RecursionError bait
    put(cred_dir / "alice" / "jobtoken_big.top", b'{"mytoken": "' + b"a" * 200_000 + b'"}')
    put(cred_dir / "bob" / "jobtoken.top", top_json(user_mytoken(srv), srv.url))
    assert run_credmon(cred_dir, mint=mint, once=True) == 0
    assert (cred_dir / "bob" / "jobtoken.use").exists()
    assert (cred_dir / COMPLETE_MARKER).exists()
    report = scan_credentials(cred_dir, now=time.time(), mint=mint)
    assert set(report.errors) == {"alice/jobtoken", "alice/jobtoken_big"}


def test_one_log_line_per_bad_credential(
    srv: DevServer, cred_dir: Path, mint: Any, caplog: pytest.LogCaptureFixture
) -> None:
    put(cred_dir / "alice" / "jobtoken.top", deeply_nested_top(30000))
    remembered: dict = {}
    with caplog.at_level("INFO", logger="jobtoken"):
        for _ in range(3):
            scan_credentials(cred_dir, now=time.time(), mint=mint, remembered=remembered)
    lines = [r.getMessage() for r in caplog.records if "alice/jobtoken" in r.getMessage()]
    assert len(lines) == 1 and "nests JSON deeper" in lines[0] and "\n" not in lines[0]


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth_within('{"a": "[[[[[[[[[[[[", "b": [1, {"c": 2}]}', 3)
    assert not json_depth_within("[[[[1]]]]", 3)
    assert json_depth_within('{"a": "\\"[[[["}', 1)


def test_top_round_trip() -> None:
    cred = read_top(top_json("m" * 40, "https://mytoken.example"), "x.top")
    assert cred is not None and cred.scopes == (SCOPE,) and cred.audiences == (AUDIENCE,)
    assert read_top(b"not json", "x.top") is None
    with pytest.raises(ConfigError, match="larger than"):
        read_top(b"{" + b" " * 70_000 + b"}", "x.top")


def test_the_site_server_only(srv: DevServer, cred_dir: Path, mint: Any) -> None:
    put(cred_dir / "alice" / "jobtoken.top", top_json(user_mytoken(srv), "https://evil.example"))
    report = scan_credentials(cred_dir, now=time.time(), mint=mint)
    assert report.errors == ("alice/jobtoken",)  # root never follows a user's server choice


def test_cred_dir_open_to_others_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o755)
    with pytest.raises(ConfigError, match="accessible by others"):
        check_cred_dir(d)


def test_primary_owns_pid_and_complete_a_guest_does_not(
    srv: DevServer, cred_dir: Path, mint: Any
) -> None:
    put(cred_dir / "alice" / "jobtoken.top", top_json(user_mytoken(srv), srv.url))
    put(cred_dir / PID_FILE, "4242")  # the site's CREDMON_OAUTH
    assert run_credmon(cred_dir, mint=mint, once=True, primary=False) == 0
    assert (cred_dir / PID_FILE).read_text() == "4242"
    assert not (cred_dir / COMPLETE_MARKER).exists()
    assert (cred_dir / "alice" / "jobtoken.use").exists()
    ready = []
    assert run_credmon(cred_dir, mint=mint, once=True, on_ready=lambda: ready.append(1)) == 0
    assert (cred_dir / PID_FILE).read_text() == str(os.getpid())
    assert (cred_dir / COMPLETE_MARKER).exists() and ready == [1]


@pytest.mark.parametrize(
    "daemon_list, expected",
    [
        ("MASTER, SCHEDD, CREDD, CREDMON_OAUTH, JOBTOKEN_CREDMON", True),
        ("MASTER SCHEDD CREDD JOBTOKEN_CREDMON", False),
        (None, False),
    ],
)
def test_guest_when_the_site_runs_credmon_oauth(daemon_list: Any, expected: bool) -> None:
    assert site_runs_oauth_credmon(daemon_list) is expected


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@contextlib.contextmanager
def credmon_daemon(
    config: Path, cred_dir: Path, role: str, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``jobtoken credmon`` as condor_master runs it; stopped with SIGTERM, which must exit 0.

    Its log goes where ``JOBTOKEN_CREDMON_LOG`` says, here beside ``config`` unless given.
    """
    env.setdefault("_CONDOR_JOBTOKEN_CREDMON_LOG", str(config.parent / "JobtokenCredmonLog"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobtoken", "credmon", "--config", str(config)]
        + ["--cred-dir", str(cred_dir), "--interval", "3600", "--role", role],
        env=base_env(**env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("role", ["primary", "guest"])
def test_credmon_daemon_notices_a_new_top_and_stops_on_term(
    srv: DevServer, cred_dir: Path, tmp_path: Path, role: str
) -> None:
    """A primary is woken by the credd's SIGHUP; a guest (no pid file) notices by polling."""
    config = toml_config(tmp_path / "jobtoken.toml", server=srv.url)
    with credmon_daemon(config, cred_dir, role) as proc:
        if role == "primary":
            wait_for(lambda: (cred_dir / COMPLETE_MARKER).exists())
            assert int((cred_dir / PID_FILE).read_text()) == proc.pid
        put(cred_dir / "bob" / "jobtoken.top", top_json(user_mytoken(srv), srv.url))
        if role == "primary":
            os.kill(int((cred_dir / PID_FILE).read_text()), signal.SIGHUP)
        wait_for(lambda: (cred_dir / "bob" / "jobtoken.use").exists())
        decode_access_token((cred_dir / "bob" / "jobtoken.use").read_text())
        if role == "guest":
            assert not (cred_dir / PID_FILE).exists()


def test_credd_chain_storer_credmon_starter_hook(
    srv: DevServer, cred_dir: Path, mint: Any, tmp_path: Path
) -> None:
    """AP storer → credd (.top) → credmon (.use: an AT) → starter → BEARER_TOKEN_FILE."""
    from jobtoken._config import TokenConfig
    from jobtoken.integrations.condor_storer import run_storer

    from .test_condor import run_hook, standard_ad
    from .test_condor_storer import FakeCredd

    user_mt = tmp_path / "mt_user"
    put(user_mt, user_mytoken(srv))
    credd = FakeCredd()
    ap_config = Config(
        server=ServerConfig(url=srv.url, allow_http=True),
        token=TokenConfig(mytoken_file=str(user_mt)),
    )
    run_storer(
        ap_config,
        [f"jobtoken&handle=out&scopes={SCOPE}&audience={AUDIENCE}"],
        env={},
        lifetime_s=3600,
        credd=credd,
    )
    parent, stored = credd.stored
    put(cred_dir / "alice" / "jobtoken.top", parent["credential"])
    top = put(cred_dir / "alice" / "jobtoken_out.top", stored["credential"])
    mytoken = json.loads(stored["credential"])["mytoken"]
    assert scan_credentials(cred_dir, now=time.time(), mint=mint).written == ("alice/jobtoken_out",)
    scratch = tmp_path / "execute" / "dir_1"
    scratch.mkdir(parents=True)
    creds = scratch.parent / ".condor_creds"  # what the starter does with the .use
    creds.mkdir()
    put(creds / "jobtoken_out.use", top.with_suffix(".use").read_bytes())

    config = toml_config(tmp_path / "site.toml", server=srv.url)  # no site mytoken
    ad = standard_ad(OAuthServicesNeeded="jobtoken*out")
    out, _ = run_hook(scratch, config, ad, env={"_CONDOR_CREDS": str(creds)})
    assert out["HookStatusCode"] == 0, out.get("HookStatusMessage")
    env = out["Environment"]
    assert f"BEARER_TOKEN_FILE={creds / 'jobtoken_out.use'}" in env
    assert "BEARER_TOKEN=stale" not in env  # it would win over the file in WLCG discovery
    assert not (scratch / ".jobtoken").exists()  # no job mytoken, no sidecar on the EP
    sandbox = b"".join(p.read_bytes() for p in scratch.parent.rglob("*") if p.is_file())
    assert mytoken.encode() not in sandbox


def test_hook_requeues_an_expired_creds_token(srv: DevServer, tmp_path: Path) -> None:
    """The AP's credmon has not renewed it (server down there): requeue, never run blind."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    from .test_condor import run_hook, standard_ad

    scratch = tmp_path / "execute" / "dir_1"
    scratch.mkdir(parents=True)
    creds = scratch.parent / ".condor_creds"
    creds.mkdir()
    now = int(time.time())
    claims = {
        "iss": srv.url,
        "sub": "alice",
        "jti": "j-1",
        "iat": now - 1300,
        "exp": now - 100,
        "scope": SCOPE,
        "aud": AUDIENCE,
        "wlcg.ver": "1.0",
    }
    expired = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    put(creds / "jobtoken.use", expired + "\n")
    config = toml_config(tmp_path / "site.toml", server=srv.url)
    out, _ = run_hook(scratch, config, standard_ad(), env={"_CONDOR_CREDS": str(creds)})
    assert 300 <= out["HookStatusCode"] < 400, out
    assert "expired" in out["HookStatusMessage"]


def test_job_wrapper_execs_a_creds_token_job_unchanged(tmp_path: Path) -> None:
    """The credd path leaves no job mytoken on the EP: nothing to renew, no sidecar."""
    from jobtoken.integrations.condor import run_job_wrapper

    creds = tmp_path / ".condor_creds"
    creds.mkdir()
    scratch = tmp_path / "dir_1"
    scratch.mkdir()
    env = {
        "_CONDOR_SCRATCH_DIR": str(scratch),
        "_CONDOR_CREDS": str(creds),
        "BEARER_TOKEN_FILE": str(creds / "jobtoken_out.use"),
    }
    ran = []
    assert run_job_wrapper(["/bin/true"], env, execute=lambda *a: ran.append(a)) == 127
    assert ran == [("/bin/true", ["/bin/true"], env)]
    assert not (scratch / ".jobtoken").exists()
    # a job that points BEARER_TOKEN_FILE elsewhere gets the usual path (no job.json: fails)
    env["BEARER_TOKEN_FILE"] = str(tmp_path / "mine")
    ran.clear()
    assert run_job_wrapper(["/bin/true"], env, execute=lambda *a: ran.append(a)) == 1
    assert ran == []


def test_tokens_shorter_than_the_refresh_chain_are_reported_once(
    srv: DevServer, cred_dir: Path, mint: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A job reads a .use up to SEC_CREDENTIAL_REFRESH + one scan after it was written."""
    put(cred_dir / "alice" / "jobtoken.top", top_json(user_mytoken(srv), srv.url))
    remembered: dict = {}
    with caplog.at_level("WARNING", logger="jobtoken"):
        for _ in range(2):  # 1200 s tokens < 2000 s: renewed at every scan, warned once
            scan_credentials(
                cred_dir, now=time.time(), mint=mint, min_remaining_s=2000, remembered=remembered
            )
    warned = [r.getMessage() for r in caplog.records if "SEC_CREDENTIAL_REFRESH" in r.getMessage()]
    assert len(warned) == 1 and "live 1200 s" in warned[0]


# --- its log: HTCondor's knob, UTC times, logrotate (issue 14 item 5) -------------------------


def test_credmon_log_knob_as_htcondors_credmons_read_theirs() -> None:
    knobs = {"LOG": "/var/log/condor"}
    assert credmon_log_path(knobs.get) == "/var/log/condor/JobtokenCredmonLog"
    knobs["JOBTOKEN_CREDMON_LOG"] = "/srv/logs/credmon.log"
    assert credmon_log_path(knobs.get) == "/srv/logs/credmon.log"
    assert credmon_log_path({}.get) is None  # no HTCondor configuration: stderr only


ISO_LINE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR) "


def _utc_stamps(text: str) -> list:
    import calendar
    import re

    lines = text.splitlines()
    assert lines and all(re.match(ISO_LINE, line) for line in lines), text
    return [calendar.timegm(time.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%SZ"))
            for line in lines]


def test_credmon_daemon_logs_through_the_htcondor_knob_and_survives_logrotate(
    srv: DevServer, cred_dir: Path, tmp_path: Path
) -> None:
    """The file JOBTOKEN_CREDMON_LOG names (read through the real bindings), UTC times on a
    host in UTC+14, and lines after a logrotate-style rename land in the new file."""
    log = tmp_path / "log" / "JobtokenCredmonLog"
    log.parent.mkdir()
    config = toml_config(tmp_path / "jobtoken.toml", server=srv.url)
    started = time.time()
    with credmon_daemon(config, cred_dir, "primary", _CONDOR_JOBTOKEN_CREDMON_LOG=str(log),
                        TZ="Pacific/Kiritimati") as proc:
        wait_for(lambda: (cred_dir / COMPLETE_MARKER).exists())
        wait_for(lambda: "credmon starting" in log.read_text())
        os.rename(log, log.with_name("JobtokenCredmonLog.1"))
        put(cred_dir / "bob" / "jobtoken.top", top_json(user_mytoken(srv), srv.url))
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: log.exists() and "cred=bob/jobtoken" in log.read_text())
    before = log.with_name("JobtokenCredmonLog.1").read_text()
    assert "role=primary" in before and "cred=bob" not in before
    for stamp in _utc_stamps(before) + _utc_stamps(log.read_text()):
        assert started - 5 <= stamp <= time.time() + 5  # UTC, not UTC+14
    assert re.search(r"exp=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", log.read_text())


def test_credmon_says_in_its_log_why_it_stopped(cred_dir: Path, tmp_path: Path) -> None:
    """condor_master records only the exit code: the reason must be in the log."""
    log = tmp_path / "JobtokenCredmonLog"
    os.chmod(cred_dir, 0o2775)  # open to others: refused
    result = subprocess.run(
        [sys.executable, "-m", "jobtoken", "credmon", "--cred-dir", str(cred_dir),
         "--server", "https://mytoken.example.org", "--log-file", str(log), "--once"],
        env=base_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 78
    assert re.search(ISO_LINE + r"credmon stopped: credential directory .* accessible by others",
                     log.read_text(), re.M)
    assert result.stderr.count("accessible by others") == 1  # once, from the CLI


# --- waiting between scans (pure, on a fake clock) -------------------------------------------


def _wait(clock: Any, *, stop: Any = None, wake: Any = None, deadline_in: float = 60.0,
          signatures: Any = None) -> None:
    import threading

    from jobtoken.integrations import condor_credmon

    seen = iter(signatures or [])
    condor_credmon._wait_for_next_scan(
        clock, stop or threading.Event(), wake or threading.Event(),
        clock.monotonic() + deadline_in, 2.0, since=(("a.top", 1),),
        current=lambda: next(seen, (("a.top", 1),)),
    )


def test_between_scans_the_credmon_waits_out_the_interval_in_polls() -> None:
    from tests.fakes import FakeClock

    clock = FakeClock()
    _wait(clock, deadline_in=5.0)
    assert clock.waits == [2.0, 2.0, 1.0]


def test_a_changed_top_ends_the_wait_at_the_next_poll() -> None:
    from tests.fakes import FakeClock

    clock = FakeClock()
    _wait(clock, signatures=[(("a.top", 1),), (("a.top", 2),)])
    assert clock.waits == [2.0, 2.0]


def test_sighup_or_stop_ends_the_wait_at_once() -> None:
    import threading

    from tests.fakes import FakeClock

    clock, woken = FakeClock(), threading.Event()
    woken.set()
    _wait(clock, wake=woken)
    _wait(clock, stop=woken)
    assert clock.waits == []


def test_a_top_field_of_the_wrong_type_counts_as_absent() -> None:
    doc = {"mytoken": "m" * 40, "expires_at": True, "mytoken_server": "", "mom_id": 7,
           "jobtoken_scopes": "storage.read:/"}
    cred = read_top(json.dumps(doc).encode(), "x.top")
    assert cred is not None
    assert (cred.expires_at, cred.server_url, cred.mom_id, cred.scopes) == (None, None, None, ())
