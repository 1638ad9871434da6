"""`jobtoken run` as a real process against the dev server: a long job never sees an
expired, empty or torn token, faults during renewal are ridden out, and the payload's
end looks to the caller exactly as without jobtoken."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from jobtoken.devserver import DevServer, DevServerConfig
from tests.runhelpers import (
    AUD,
    PAYLOADS,
    checker,
    jobtoken_argv,
    prepare,
    readline_within,
    run,
    state,
    summary,
)

pytestmark = pytest.mark.process

OP_SCOPES = ("storage.read:/", "storage.create:/")


@pytest.fixture()
def server(request: pytest.FixtureRequest) -> Iterator[DevServer]:
    lifetime = getattr(request, "param", 4)
    with DevServer(
        DevServerConfig(at_lifetime_s=lifetime, op_scopes=OP_SCOPES, default_audience=AUD)
    ) as srv:
        yield srv


def at_requests(srv: DevServer) -> int:
    return len(srv.requests("access"))


@pytest.mark.parametrize("server", [12], indirect=True)
def test_payload_reading_across_many_renewals_never_sees_a_bad_token(
    server: DevServer, tmp_path: Path
) -> None:
    # Renewing early (fraction 0.3: every 2.4-3.6 s) gives each renewal 8 s of slack before
    # its token expires, so a loaded machine that delays a renewal child by seconds cannot
    # fail this; 3 s tokens renewed at 2/3 left 1 s and did. Three or four renewals in 15 s.
    job = prepare(server, tmp_path, lifetime_s=12, margin_s=4.0, fraction=0.3)
    result = run(jobtoken_argv("run", "--dir", str(job.tokendir.path), "--", *checker(15)))
    s = summary(result.stdout)
    assert result.returncode == 0, result.stderr
    assert s["bad"] == 0 and s["reads"] > 100  # read all along (every 20 ms when idle)
    assert s["tokens"] >= 3  # renewed again and again
    st = state(job.tokendir.path)
    assert st["renewals"] >= 2 and st["failures_total"] == 0
    # renewals close to the rule's minimum interval ((0.3 - jitter) x lifetime): no waste
    assert at_requests(server) <= 2 + 15 / (12 * (0.3 - 0.1))


FAULTS = {
    "503 burst": dict(endpoint="access", status=503, count=2),
    "500": dict(endpoint="access", status=500, count=1),
    "502 html": dict(endpoint="access", status=502, body="<html>bad gateway</html>", count=1),
    "429 retry-after": dict(endpoint="access", status=429, retry_after_s=1, count=1),
    "slow beyond timeout": dict(endpoint="access", delay_s=3.0, count=1),
    "connection reset": dict(endpoint="access", drop=True, count=2),
    "garbage body": dict(endpoint="access", garbage=True, count=2),
    "wider scope": dict(endpoint="access", token="wider_scope", count=1),
    "exp not moved": dict(endpoint="access", token="stale_exp", count=1),
    "wrong audience": dict(endpoint="access", token="wrong_audience", count=1),
    "unsigned": dict(endpoint="access", token="alg_none", count=1),
}


def _fault_batch(names: list, tmp_path: Path) -> dict:
    procs = {}
    scenarios = {}
    problems = {}
    with contextlib.ExitStack() as stack:
        for name in names:
            srv = stack.enter_context(DevServer(DevServerConfig(
                at_lifetime_s=30, op_scopes=OP_SCOPES, default_audience=AUD)))
            # Renew early (6-9 s after issue): each retry is a child process that a loaded
            # machine slows by seconds (4 s seen: 3 attempts took 18 s), and the token must
            # outlast them all. The payload reads through the faults and the recovery.
            job = prepare(srv, tmp_path / name.replace(" ", "_"), lifetime_s=30, margin_s=10.0,
                          timeout_s=1.0, fraction=0.3)
            scenarios[name] = (srv, job)
            proc = subprocess.Popen(
                jobtoken_argv("run", "--dir", str(job.tokendir.path), "--",
                              *checker(25, interval=0.05)),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs[name] = proc
            assert readline_within(proc.stdout).strip() == "ready"  # first token in place
            srv.faults.add(**FAULTS[name])  # so the fault hits the renewal, not the start
        for name, (srv, job) in scenarios.items():
            proc = procs[name]
            out, err = proc.communicate(timeout=120)
            s = summary(out)
            st = state(job.tokendir.path)
            checks = {
                "exit 0": proc.returncode == 0,
                "no bad read": s["bad"] == 0,
                "fault hit a renewal": st["failures_total"] >= 1,
                "recovered": st["consecutive_failures"] == 0 and st["renewals"] >= 1,
                # a refused answer (e.g. "exp not moved") was not taken for a renewal
                "token extended": st["expires_at"] > job.token.expires_at,
                "logged": "renewal failed" in err,
                "no token in log": "eyJ" not in err,
            }
            failed = [k for k, ok in checks.items() if not ok]
            if failed:
                times = [(round(r.time - job.token.expires_at, 2), r.status)
                         for r in srv.requests("access")]
                problems[name] = (failed, s, times, err[-600:])
    return problems


_NAMES = list(FAULTS)
# a few side by side: each scenario waits on real time, but renewal children need CPU
_BATCHES = [_NAMES[i : i + 6] for i in range(0, len(_NAMES), 6)]


@pytest.mark.parametrize("names", _BATCHES, ids=["+".join(b) for b in _BATCHES])
def test_renewal_faults_are_ridden_out(names: list, tmp_path: Path) -> None:
    """Every fault kind during renewal, each against its own dev server: the payload,
    reading its token 20 times a second, never sees a bad one, and renewal recovers."""
    assert _fault_batch(names, tmp_path) == {}


@pytest.mark.parametrize("server", [9], indirect=True)
def test_outage_longer_than_margin_shorter_than_lifetime(server: DevServer,
                                                         tmp_path: Path) -> None:
    job = prepare(server, tmp_path, lifetime_s=9, margin_s=1.5, fraction=0.5)
    exp = job.token.expires_at
    outage_end = exp - 2.0  # renewal falls due at about exp - 4.5 s, inside the outage
    assert outage_end - time.time() > 1.5  # longer than the margin
    for endpoint in ("access", "discovery"):
        server.faults.add(endpoint, drop=True, until=outage_end)
    result = run(jobtoken_argv("run", "--dir", str(job.tokendir.path), "--", *checker(12)))
    s = summary(result.stdout)
    assert result.returncode == 0, result.stderr
    assert s["bad"] == 0 and s["tokens"] >= 2, s
    assert state(job.tokendir.path)["failures_total"] >= 1


@pytest.mark.parametrize("server", [4], indirect=True)
def test_revoked_job_mytoken_escalates_at_once_and_stops_the_payload(
    server: DevServer, tmp_path: Path
) -> None:
    job = prepare(server, tmp_path, lifetime_s=4, margin_s=1.5, on_failure="stop")
    mytoken = job.tokendir.mytoken.read_text()
    with httpx.Client() as client:
        client.post(f"{server.url}/api/v0/token/revoke", json={"token": mytoken}).raise_for_status()
    before = at_requests(server)
    started = time.monotonic()
    result = run(jobtoken_argv("run", "--dir", str(job.tokendir.path), "--", *checker(60)))
    elapsed = time.monotonic() - started
    assert result.returncode == 69, result.stderr
    assert elapsed < 20  # stopped when the token expired, not after 60 s
    assert at_requests(server) - before == 1  # permanent: no retry storm
    assert "credential lost" in result.stderr
    st = state(job.tokendir.path)
    assert st["credential_lost"] is True and st["last_error_permanent"] is True


@pytest.mark.parametrize("server", [3], indirect=True)
def test_mytoken_rotating_on_every_access_token(server: DevServer, tmp_path: Path) -> None:
    mt_file = tmp_path / "user.mt"
    mt_file.write_text(server.issue_mytoken(
        capabilities=["AT"],
        restrictions=[{"scope": "storage.create:/vo/out", "audience": [AUD]}],
        rotation={"on_AT": True, "auto_revoke": True},
    ))
    mt_file.chmod(0o600)
    first = mt_file.read_text()
    result = run(jobtoken_argv(
        "run", "--server", server.url, "--allow-http", "--mytoken-file", str(mt_file),
        "--scope", "storage.create:/vo/out", "--audience", AUD, "--margin", "1", "--",
        *checker(8)))
    s = summary(result.stdout)
    assert result.returncode == 0, result.stderr
    assert s["bad"] == 0 and s["tokens"] >= 3
    latest = mt_file.read_text()
    assert latest != first and (mt_file.stat().st_mode & 0o777) == 0o600
    # the mytoken on disk is the live one: the server accepts it, the first is dead
    with httpx.Client() as client:
        ok = client.post(f"{server.url}/api/v0/token/access", json={
            "grant_type": "mytoken", "mytoken": latest, "scope": "storage.create:/vo/out",
            "audience": AUD})
        assert ok.status_code == 200
        assert server.introspect(ok.json()["token_update"]["mytoken"])["valid"] is True


# --- the payload's end, as the caller sees it -------------------------------------------------


@pytest.fixture()
def long_job(tmp_path: Path) -> Iterator[Path]:
    with DevServer(DevServerConfig(at_lifetime_s=300, op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as srv:
        job = prepare(srv, tmp_path, lifetime_s=300)
        yield job.tokendir.path


@pytest.mark.parametrize("code", [0, 1, 2, 255])
def test_exit_status_is_passed_on(long_job: Path, code: int) -> None:
    result = run(jobtoken_argv("run", "--dir", str(long_job), "--", "sh", "-c", f"exit {code}"))
    assert result.returncode == code, result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_death_by_signal_is_reproduced(long_job: Path, sig: int) -> None:
    result = run(jobtoken_argv("run", "--dir", str(long_job), "--", "sh", "-c",
                               f"kill -{int(sig)} $$"))
    assert result.returncode == -sig, result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1])
def test_signals_reach_the_payload(long_job: Path, sig: int) -> None:
    proc = subprocess.Popen(
        jobtoken_argv("run", "--dir", str(long_job), "--", sys.executable,
                      str(PAYLOADS / "print_signals.py")),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert readline_within(proc.stdout).startswith("ready")
        proc.send_signal(sig)
        assert readline_within(proc.stdout).strip() == f"signal {int(sig)}"
        proc.stdin.write("exit 7\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 7
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_payload_not_found(long_job: Path) -> None:
    result = run(jobtoken_argv("run", "--dir", str(long_job), "--", "/no/such/payload"))
    assert result.returncode == 127 and "not found" in result.stderr


def test_payload_not_executable(long_job: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("not a program")
    result = run(jobtoken_argv("run", "--dir", str(long_job), "--", str(plain)))
    assert result.returncode == 126


def test_payload_environment(long_job: Path) -> None:
    env = dict(os.environ, BEARER_TOKEN="stale-token-from-the-job-environment")
    result = run(jobtoken_argv("run", "--dir", str(long_job), "--", *checker(0.2)), env=env)
    s = summary(result.stdout)
    assert result.returncode == 0 and s["has_bearer_token"] is False
    assert s["bad"] == 0


def test_second_sidecar_for_one_directory_is_refused(long_job: Path) -> None:
    first = subprocess.Popen(
        jobtoken_argv("run", "--dir", str(long_job), "--", *checker(6)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert readline_within(first.stdout).strip() == "ready"
        second = run(jobtoken_argv("run", "--dir", str(long_job), "--", "true"))
        assert second.returncode == 1
        assert "another jobtoken sidecar is already running" in second.stderr
    finally:
        first.kill()
        first.communicate()


def test_token_files_removed_and_job_mytoken_revoked_at_the_end(tmp_path: Path) -> None:
    with DevServer(DevServerConfig(at_lifetime_s=300, op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as srv:
        job = prepare(srv, tmp_path, lifetime_s=300)
        mytoken = job.tokendir.mytoken.read_text()
        result = run(jobtoken_argv("run", "--dir", str(job.tokendir.path), "--", "true"))
        assert result.returncode == 0, result.stderr
        assert not job.tokendir.bearer_token.exists()
        assert not job.tokendir.mytoken.exists()
        with httpx.Client() as client:
            r = client.post(f"{srv.url}/api/v0/token/access",
                            json={"grant_type": "mytoken", "mytoken": mytoken})
        assert r.status_code == 401 and r.json()["error"] == "invalid_token"


def test_standalone_run_with_mytoken_in_a_variable(tmp_path: Path) -> None:
    with DevServer(DevServerConfig(at_lifetime_s=300, op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as srv:
        mt = srv.issue_mytoken(capabilities=["AT"], restrictions=[
            {"scope": "storage.create:/vo/out", "audience": [AUD]}])
        env = dict(os.environ, MY_MT=mt, TMPDIR=str(tmp_path))
        result = run(jobtoken_argv(
            "run", "--server", srv.url, "--allow-http", "--mytoken-env", "MY_MT",
            "--scope", "storage.create:/vo/out", "--audience", AUD, "--", *checker(0.2)),
            env=env)
        s = summary(result.stdout)
        assert result.returncode == 0, result.stderr
        assert s["bad"] == 0 and s["env_mytoken"] == []  # the mytoken stays out of the payload
        assert list(tmp_path.iterdir()) == []  # its private token directory is gone


def test_first_token_failure_is_a_documented_exit_before_the_payload(tmp_path: Path) -> None:
    with DevServer(DevServerConfig(at_lifetime_s=300, op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as srv:
        job = prepare(srv, tmp_path, lifetime_s=300)
        job.tokendir.bearer_token.unlink()
        srv.faults.add("access", status=503)
        marker = tmp_path / "payload-ran"
        result = run(jobtoken_argv("run", "--dir", str(job.tokendir.path), "--", "touch",
                                   str(marker)))
    assert result.returncode == 75, result.stderr
    assert not marker.exists()
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_and_ensure(tmp_path: Path) -> None:
    with DevServer(DevServerConfig(at_lifetime_s=300, op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as srv:
        job = prepare(srv, tmp_path, lifetime_s=300)
        d = str(job.tokendir.path)
        before = len(srv.requests("access"))
        r = run(jobtoken_argv("ensure", "--dir", d, "--min-valid", "60", "--json"))
        assert r.returncode == 0 and json.loads(r.stdout)["renewed"] is False
        assert len(srv.requests("access")) == before  # valid long enough: no request
        r = run(jobtoken_argv("ensure", "--dir", d, "--min-valid", "1000"))
        assert r.returncode == 65 and "less than the 1000 s" in r.stderr  # 300 s tokens
        # that renewed the token; the payload's "--min-valid 299" must find it older than
        # the second a whole-second exp can hide (run reaches its payload in under 1 s)
        renewed_at = srv.requests("access")[-1].time
        while time.time() < renewed_at + 2.0:
            time.sleep(0.05)
        # while a job runs: status sees the sidecar; ensure renews and the sidecar keeps up
        script = (f"jobtoken status --json {d} > {tmp_path}/status.json; "
                  f"jobtoken ensure --min-valid 299 --json > {tmp_path}/ensure.json")
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        r = run(jobtoken_argv("run", "--dir", d, "--", "sh", "-c", script), env=env)
        assert r.returncode == 0, r.stderr
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["sidecar_alive"] is True and status["scopes"] == list(job.token.scopes)
        assert status["remaining_s"] > 250 and "token" not in json.dumps(status).lower().replace(
            "token_file", "").replace("token_present", "")
        assert json.loads((tmp_path / "ensure.json").read_text())["renewed"] is True
        r = run(jobtoken_argv("status", d))
        assert r.returncode == 0 and "not running" in r.stdout


def test_status_without_a_directory() -> None:
    r = run(jobtoken_argv("status"))
    assert r.returncode == 2 and "JOBTOKEN_DIR" in r.stderr
