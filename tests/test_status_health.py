"""`status` and `inspect` for monitoring: Nagios exit codes from the token's remaining life
and the renewer, and straight after `prepare` they show the token the job has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobtoken._revocation import PendingRevocation, write_pending
from jobtoken.devserver import DevServer, DevServerConfig
from tests import jwtmint
from tests.runhelpers import AUD, jobtoken_argv, prepare, run

pytestmark = pytest.mark.process

OP_SCOPES = ("storage.read:/", "storage.create:/")


def test_straight_after_prepare_status_and_inspect_show_the_token(tmp_path: Path) -> None:
    with DevServer(DevServerConfig(at_lifetime_s=600, op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as srv:
        job = prepare(srv, tmp_path, lifetime_s=600)
    d = job.tokendir
    assert not d.state_file.exists()  # no sidecar ran yet
    r = run(jobtoken_argv("status", "--json", str(d.path)))
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["expires_at"] == job.token.expires_at and 500 < shown["remaining_s"] <= 600
    assert shown["scopes"] == list(job.token.scopes) and shown["health"] == "OK"
    assert job.token.raw not in r.stdout
    r = run(jobtoken_argv("status", str(d.path)))
    assert r.returncode == 0 and "s left" in r.stdout and "health:        OK" in r.stdout
    r = run(jobtoken_argv("inspect", "--json", str(d.bearer_token)))
    assert r.returncode == 0 and json.loads(r.stdout)["jti"] == job.token.jti
    # thresholds: less than --warn left is WARNING (1), less than --crit CRITICAL (2)
    for flags, code in ((["--warn", "3600"], 1), (["--warn", "3600", "--crit", "3000"], 2),
                        (["--warn", "60", "--crit", "30"], 0)):
        for argv in (("status", str(d.path)), ("inspect", str(d.bearer_token))):
            r = run(jobtoken_argv(*argv, *flags))
            assert r.returncode == code, (argv, flags, r.stdout, r.stderr)
    r = run(jobtoken_argv("status", str(d.path), "--warn", "-1"))
    assert r.returncode == 2 and "--warn" in r.stderr  # a usage error, one line


def test_an_expired_token_is_critical(tmp_path: Path) -> None:
    token = tmp_path / "bt"
    token.write_text(jwtmint.access_token(lifetime_s=-30))
    token.chmod(0o600)
    r = run(jobtoken_argv("inspect", str(token)))
    assert r.returncode == 2 and "CRITICAL - expired" in r.stdout, r.stderr


def test_a_dead_renewer_is_critical_and_no_token_is_unknown(tmp_path: Path) -> None:
    with DevServer(DevServerConfig(at_lifetime_s=600, op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as srv:
        job = prepare(srv, tmp_path, lifetime_s=600)
    d = job.tokendir
    # a sidecar started (state.json, not finished) but holds no lock: it died
    d.state_file.write_text(json.dumps({"job_id": "job-1", "sidecar_pid": 2 ** 22 + 7}))
    r = run(jobtoken_argv("status", "--json", str(d.path)))
    assert r.returncode == 2 and json.loads(r.stdout)["health_reason"].startswith(
        "no renewer alive"), r.stdout
    # ... the job ended cleanly: nobody needs to renew any more
    d.state_file.write_text(json.dumps({"job_id": "job-1", "finished": True}))
    assert run(jobtoken_argv("status", str(d.path))).returncode == 0
    # ... but its job mytoken could not be revoked: a live credential nobody uses
    write_pending(d, PendingRevocation("job-1", job.mom_id, 1.0, 3, "server unavailable"))
    r = run(jobtoken_argv("status", str(d.path)))
    assert r.returncode == 1 and "revocation is pending" in r.stdout
    d.pending_revocation.unlink()
    # no token file and no state: nothing to judge
    d.bearer_token.unlink()
    d.state_file.unlink()
    r = run(jobtoken_argv("status", str(d.path)))
    assert r.returncode == 3 and "UNKNOWN - no token known" in r.stdout
