"""The node broker, as jobs use it: real broker process, real socket, jobs as other uids."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any, Iterator

import jwt
import pytest

from jobtoken.devserver import DevServer, DevServerConfig
from tests.brokerhelpers import (
    JOB_PYTHON,
    Anchor,
    Site,
    base_dir,
    client_reply,
    require_root,
    spare_uids,
    wait_for,
)
from tests.runhelpers import AUD

OP_SCOPES = ("storage.read:/", "storage.create:/")
LIFETIME_S = 60.0  # long enough for a loaded machine; renewals are driven by ensure here


@pytest.fixture()
def site() -> Iterator[Site]:
    require_root()
    with DevServer(DevServerConfig(at_lifetime_s=int(LIFETIME_S), op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as srv:
        for base in base_dir():
            s = Site(srv, base, at_lifetime_s=LIFETIME_S, margin_s=10)
            s.start()
            try:
                yield s
            finally:
                s.stop()


@pytest.fixture()
def uids() -> Any:
    return spare_uids(2)


def claims(path: Path) -> Any:
    return jwt.decode(path.read_text().strip(), options={"verify_signature": False})


def started_job(site: Site, job_id: str, uid: int, anchor_uid: Any = None) -> Any:
    """A registered job: its anchor (as root, like a starter) and its token directory."""
    anchor = Anchor(site, anchor_uid)
    site.register(job_id, uid, anchor.pid)
    return anchor, site.job_dir(job_id, uid)


def test_a_job_gets_a_token_file_it_owns_and_no_mytoken(site: Site, uids: Any) -> None:
    uid = uids[0]
    anchor, tokendir = started_job(site, "job-1", uid)
    try:
        reply = client_reply(anchor.client(uid, "prepare", "--dir", str(tokendir)))
        assert reply.get("ok"), reply
        bt = tokendir / "bt"
        assert reply["bearer_token_file"] == str(bt)
        st = os.lstat(bt)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o600)
        assert claims(bt)["scope"] == "storage.create:/vo/jobs/job-1"
        assert sorted(os.listdir(tokendir)) == ["bt"]  # no mytoken in the job's reach
        [mytoken] = site.mytoken_files()
        assert (os.stat(mytoken).st_uid, stat.S_IMODE(os.stat(mytoken).st_mode)) == (0, 0o600)
        # ensure renews when asked for more than is left, and the file follows
        first = claims(bt)["jti"]
        reply = client_reply(anchor.client(uid, "ensure", "--min-valid",
                                           str(LIFETIME_S + 1)))
        assert reply.get("ok") is False or reply["detail"]["renewed"], reply
        reply = client_reply(anchor.client(uid, "ensure", "--min-valid", "5"))
        assert reply["ok"] and reply["expires_at"] > time.time() + 5, reply
        assert claims(bt)["jti"] != first
        status = client_reply(anchor.client(uid, "status"))
        assert status["detail"]["phase"] == "active" and status["job_id"] == "job-1"
        # the job ends by release: its mytoken is revoked at the server and forgotten here
        [minted] = site.children()
        assert not minted.revoked
        reply = client_reply(anchor.client(uid, "release"))
        assert reply["ok"], reply
        wait_for(lambda: minted.revoked, 30, "the job mytoken is revoked after release")
        wait_for(lambda: not site.mytoken_files(), 30, "the broker forgets the job mytoken")
    finally:
        anchor.kill()


def test_a_payload_of_the_jobs_uid_can_read_no_mytoken(site: Site, uids: Any) -> None:
    uid = uids[0]
    jobs = [started_job(site, f"job-{n}", uid) for n in range(2)]
    try:
        for anchor, tokendir in jobs:
            reply = client_reply(anchor.client(uid, "prepare", "--dir",
                                               str(tokendir)))
            assert reply.get("ok"), reply
        secrets = site.mytoken_files() + [site.parent]
        assert len(secrets) == 3
        everything = [str(p) for p in site.state_dir.rglob("*")] + [str(site.parent)]
        probe = ("import sys\n"
                 "got = []\n"
                 "for p in sys.argv[1:]:\n"
                 "    try:\n"
                 "        got.append((p, open(p, 'rb').read(10).decode('ascii', 'replace')))\n"
                 "    except OSError:\n"
                 "        pass\n"
                 "print(got)\n")
        anchor, tokendir = jobs[0]
        result = anchor.spawn([JOB_PYTHON, "-c", probe, *everything,
                               str(tokendir / "bt")], uid)
        assert result["rc"] == 0, result
        readable = eval(result["out"])  # a list of (path, head) the payload could read
        # its own access token, and nothing else: no mytoken, parent or job
        assert [p for p, _ in readable] == [str(tokendir / "bt")], readable
        for path in secrets:
            st = os.stat(path)
            assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        for anchor, _ in jobs:
            anchor.kill()
