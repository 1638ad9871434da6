"""Rolling upgrades: a node reads, renews, shows and revokes a job that a newer jobtoken
prepared (a newer minor format with keys it does not know); a newer major fails cleanly.

Real ``jobtoken`` processes against the dev server, as on a worker node whose jobtoken is
older than the CE's or the starter's that ran ``prepare``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobtoken.devserver import DevServer, DevServerConfig
from tests.runhelpers import AUD, jobtoken_argv, prepare, run

pytestmark = pytest.mark.process

OP_SCOPES = ("storage.read:/", "storage.create:/")


def _from_the_future(path: Path, version: str) -> None:
    data = json.loads(path.read_text())
    data.update(format=version, renewal_window_hint_s=42, broker={"socket": "/run/x"})
    path.write_text(json.dumps(data))


def test_a_job_prepared_by_a_newer_minor_runs_renews_shows_and_revokes(tmp_path: Path) -> None:
    with DevServer(DevServerConfig(at_lifetime_s=300, op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as srv:
        # run renews and, at the end, revokes the job mytoken
        ran = prepare(srv, tmp_path / "ran", lifetime_s=300, job_id="job-ran").tokendir
        _from_the_future(ran.job_file, "1.9")
        revocations = len(srv.requests("revoke"))
        r = run(jobtoken_argv("run", "--dir", str(ran.path), "--", "true"))
        assert r.returncode == 0, r.stderr
        assert len(srv.requests("revoke")) == revocations + 1 and not ran.mytoken.exists()
        # a prepared job: ensure renews, status shows, revoke revokes
        d = prepare(srv, tmp_path, lifetime_s=300).tokendir
        _from_the_future(d.job_file, "1.9")
        d.state_file.write_text('{"job_id": "job-1", "renewals": 3, "finished": true}')
        _from_the_future(d.state_file, "1.9")  # a newer sidecar's state, too
        d.bearer_token.unlink()  # so ensure's renewal child must read job.json and renew
        r = run(jobtoken_argv("ensure", "--dir", str(d.path), "--min-valid", "200", "--json"))
        assert r.returncode == 0 and json.loads(r.stdout)["renewed"] is True, r.stderr
        r = run(jobtoken_argv("status", "--json", str(d.path)))
        shown = json.loads(r.stdout)
        assert r.returncode == 0 and shown["job_id"] == "job-1" and shown["renewals"] == 3
        r = run(jobtoken_argv("revoke", str(d.path)))
        assert r.returncode == 0 and "job mytoken revoked" in r.stdout, r.stderr
        assert not d.mytoken.exists()


@pytest.mark.parametrize("name", ["job.json", "state.json"])
def test_a_newer_major_fails_every_command_with_one_line(tmp_path: Path, name: str) -> None:
    with DevServer(DevServerConfig(at_lifetime_s=300, op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as srv:
        job = prepare(srv, tmp_path, lifetime_s=300)
        d = job.tokendir
        if name == "state.json":
            d.state_file.write_text('{"job_id": "job-1"}')
        path = d.path / name
        _from_the_future(path, "2.0")
        commands = [("status", str(d.path))]
        if name == "job.json":
            commands += [("run", "--dir", str(d.path), "--", "true"),
                         ("ensure", "--dir", str(d.path), "--min-valid", "1"),
                         ("revoke", str(d.path))]
        for argv in commands:
            r = run(jobtoken_argv(*argv))
            assert r.returncode == 78, (argv, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and str(path) in lines[0] and "format 2.0" in lines[0], argv
        assert d.mytoken.exists()  # nothing revoked or removed on the way
