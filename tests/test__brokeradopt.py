"""The broker's ``adopt``: a job hands in the mytoken minted for it elsewhere (ARC's stage 0).

Real broker process (no parent mytoken, ``broker.adopt = true``), real socket, jobs as other
uids; "stage 0" is ``prepare_job`` with the site's parent, as the CE runs it, into a
directory the job's uid owns.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, List

import jwt
import pytest

from jobtoken._config import load_config
from jobtoken._prepare import JobFacts, prepare_job
from tests.brokerhelpers import (
    JOB_PYTHON,
    Anchor,
    Site,
    client_reply,
    running_site,
    spare_uids,
    wait_for,
)

LIFETIME_S = 60.0


@pytest.fixture()
def site() -> Iterator[Site]:
    with running_site(at_lifetime_s=LIFETIME_S, margin_s=10, adopt=True) as s:
        yield s


@pytest.fixture()
def uids() -> List[int]:
    return spare_uids(2)


def stage0(site: Site, name: str, uid: int, job_id: str = "") -> Path:
    """Mint a job mytoken into ``jobs/NAME/.jobtoken`` as ARC's stage 0 does on the CE
    (with the CE's parent), then hand the directory to the job's uid."""
    config = load_config(str(site.config), env={})
    config = replace(config, site=replace(config.site, parent_mytoken_file=str(site.parent)))
    tokendir = site.job_dir(name, uid).parent / ".jobtoken"
    prepare_job(config, JobFacts(job_id=job_id or name, walltime_s=600), directory=str(tokendir),
                env={})
    for path in [tokendir, *tokendir.iterdir()]:
        os.chown(path, uid, uid)
    return tokendir


def adopt(anchor: Anchor, uid: int, tokendir: Path, *extra: str) -> Any:
    return client_reply(anchor.client(uid, "adopt", "--dir", str(tokendir), *extra))


def adopt_as_stage1(anchor: Anchor, site: Site, uid: int, tokendir: Path) -> Any:
    """``jobtoken broker adopt`` as the RTE runs it (no --json): exit code and stderr."""
    return anchor.spawn([JOB_PYTHON, "-m", "jobtoken", "broker", "adopt", "--dir",
                         str(tokendir), "--socket", site.socket], uid)


def mytokens_in(directory: Path) -> List[str]:
    return [n for n in os.listdir(directory) if "mytoken" in n]


def test_adopt_takes_the_mytoken_away_and_serves_the_job_until_release(
        site: Site, uids: List[int]) -> None:
    uid = uids[0]
    tokendir = stage0(site, "arcjob-1", uid)
    [minted] = site.children()
    anchor = Anchor(site, uid)  # the job script: its child adopts, so it is the anchor
    try:
        reply = adopt(anchor, uid, tokendir)
        assert reply.get("ok"), reply
        assert reply["job_id"] == "arc:arcjob-1"
        assert reply["bearer_token_file"] == str(tokendir / "bt")
        # the payload's directory holds no mytoken now; the broker's state dir has it
        assert mytokens_in(tokendir) == []
        [kept] = site.mytoken_files()
        assert (os.stat(kept).st_uid, stat.S_IMODE(os.stat(kept).st_mode)) == (0, 0o600)
        assert site.srv.introspect(kept.read_text())["mom_id"] == minted.mom_id
        bt = tokendir / "bt"
        st = os.lstat(bt)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o600)
        first = jwt.decode(bt.read_text().strip(), options={"verify_signature": False})
        assert first["scope"] == "storage.create:/vo/jobs/arcjob-1"
        # a process of the job renews and asks like any prepared job
        reply = client_reply(anchor.client(uid, "ensure", "--min-valid", str(LIFETIME_S + 1)))
        assert reply["ok"] and reply["detail"]["renewed"], reply
        second = jwt.decode(bt.read_text().strip(), options={"verify_signature": False})
        assert second["jti"] != first["jti"]
        # adopting again (a retried stage 1) answers the current state, mints nothing
        reply = adopt(anchor, uid, tokendir)
        assert reply.get("ok"), reply
        assert len(site.children()) == 1
        # stage 2: release revokes the job mytoken (by itself: this broker has no parent)
        assert not minted.revoked
        reply = client_reply(anchor.client(uid, "release"))
        assert reply["ok"], reply
        wait_for(lambda: minted.revoked, 30, "the adopted job mytoken is revoked at release")
        wait_for(lambda: not site.mytoken_files(), 30, "the broker forgets it")
        wait_for(lambda: not bt.exists(), 30, "the job's token file is removed")
        assert not list((site.state_dir / "jobs").iterdir())
        assert "cannot remove" not in site.log_text(), site.log_text()
    finally:
        anchor.kill()


def test_the_anchors_end_revokes_an_adopted_job(site: Site, uids: List[int]) -> None:
    uid = uids[0]
    tokendir = stage0(site, "arcjob-dies", uid)
    [minted] = site.children()
    anchor = Anchor(site, uid)
    try:
        assert adopt(anchor, uid, tokendir).get("ok")
        anchor.kill()  # the job script is killed: no stage 2
        wait_for(lambda: minted.revoked, 60, "the job mytoken is revoked when the anchor ends")
        wait_for(lambda: not site.mytoken_files(), 30, "the broker forgets the job")
    finally:
        anchor.kill()


def test_a_broker_without_adopt_refuses_with_67(uids: List[int]) -> None:
    uid = uids[0]
    with running_site(at_lifetime_s=LIFETIME_S, margin_s=10) as site:
        tokendir = stage0(site, "arcjob-off", uid)
        anchor = Anchor(site, uid)
        try:
            reply = adopt(anchor, uid, tokendir)
            assert "does not adopt" in reply["error"], reply
            reply = anchor.call("adopt", tokendir=str(tokendir), anchor_pid=anchor.pid)
            assert reply["exit_code"] == 67 and "does not adopt" in reply["message"], reply
            assert mytokens_in(tokendir) == ["mytoken"]  # untouched: not the broker's to take
            assert not site.mytoken_files()
        finally:
            anchor.kill()


def test_hostile_directories_and_anchors_are_refused(site: Site, uids: List[int]) -> None:
    uid, other = uids
    tokendir = stage0(site, "arcjob-h", uid)
    anchor = Anchor(site, uid)
    stranger = Anchor(site, uid)  # same uid, but not the caller's ancestor
    root_anchor = Anchor(site)  # an ancestor of its payloads, but root's
    outsider = Anchor(site, other)
    try:
        # a symlink to the job's directory
        link = site.base / "jobs" / "link"
        os.symlink(tokendir, link)
        reply = anchor.call("adopt", tokendir=str(link), anchor_pid=anchor.pid)
        assert (reply["ok"], reply["exit_code"]) == (False, 74), reply
        assert "symlink" in reply["message"]
        # the directory of another uid
        reply = client_reply(outsider.client(other, "adopt", "--dir", str(tokendir)))
        assert "not the job's uid" in reply["error"], reply
        # an anchor that is not the caller or its ancestor
        reply = adopt(anchor, uid, tokendir, "--anchor-pid", str(stranger.pid))
        assert "not process" in reply["error"] and "ancestors" in reply["error"], reply
        # an ancestor of another uid (it would outlive the job)
        reply = adopt(root_anchor, uid, tokendir)
        assert "does not run as uid" in reply["error"], reply
        # nothing was taken or minted on the way
        assert mytokens_in(tokendir) == ["mytoken"]
        assert not site.mytoken_files() and len(site.children()) == 1
        assert not site.children()[0].revoked
        # the anchor named explicitly: the caller itself
        reply = anchor.call("adopt", tokendir=str(tokendir), anchor_pid=anchor.pid)
        assert reply["ok"], reply
    finally:
        for a in (anchor, stranger, root_anchor, outsider):
            a.kill()


def test_a_second_adopt_of_a_job_id_by_another_anchor_is_67(site: Site, uids: List[int]) -> None:
    uid, other = uids
    first = stage0(site, "arcjob-d1", uid, job_id="gridjob-1")
    copy = stage0(site, "arcjob-d2", other, job_id="gridjob-1")  # another job says the same id
    a, b = Anchor(site, uid), Anchor(site, other)
    try:
        assert adopt(a, uid, first).get("ok")
        reply = b.call("adopt", tokendir=str(copy), anchor_pid=b.pid)
        assert (reply["ok"], reply["exit_code"]) == (False, 67), reply
        assert "adopted already" in reply["message"]
        # the first job is untouched
        status = client_reply(a.client(uid, "status"))
        assert status["detail"]["phase"] == "active", status
    finally:
        a.kill()
        b.kill()


def test_an_unusable_mytoken_is_revoked_and_fails_with_one_line(site: Site, uids: List[int]
                                                                 ) -> None:
    uid = uids[0]
    tokendir = stage0(site, "arcjob-bad", uid)
    [minted] = site.children()
    anchor = Anchor(site, uid)
    try:
        # the server refuses the job mytoken's access token for good
        site.srv.faults.add("access", status=403, error="access_denied", count=1)
        result = adopt_as_stage1(anchor, site, uid, tokendir)
        assert result["rc"] == 77, result
        lines = result["err"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jobtoken: error:"), result
        assert mytokens_in(tokendir) == []  # nothing left to the payload
        wait_for(lambda: minted.revoked, 30, "the unusable job mytoken is revoked")
        wait_for(lambda: not site.mytoken_files(), 30, "the broker forgets the job")
        # garbage where the mytoken belongs: refused with one line, removed
        garbage = stage0(site, "arcjob-garbage", uid)
        (garbage / "mytoken").write_text("not a mytoken at all, just words\n")
        result = adopt_as_stage1(anchor, site, uid, garbage)
        assert result["rc"] == 77 and "unusable" in result["err"], result
        assert mytokens_in(garbage) == [] and not site.mytoken_files()
    finally:
        anchor.kill()


def test_a_hardlinked_mytoken_is_refused_and_revoked(site: Site, uids: List[int]) -> None:
    uid = uids[0]
    tokendir = stage0(site, "arcjob-link", uid)
    [minted] = site.children()
    copy = tokendir.parent / "kept-copy"
    os.link(tokendir / "mytoken", copy)  # the job would keep a copy past the broker
    anchor = Anchor(site, uid)
    try:
        reply = anchor.call("adopt", tokendir=str(tokendir), anchor_pid=anchor.pid)
        assert (reply["ok"], reply["exit_code"]) == (False, 74), reply
        assert "links" in reply["message"]
        wait_for(lambda: minted.revoked, 30, "the copied job mytoken is revoked")
        assert mytokens_in(tokendir) == []
    finally:
        anchor.kill()
        shutil.rmtree(tokendir.parent, ignore_errors=True)


def test_an_adopted_job_survives_a_broker_kill_and_is_still_revoked_by_itself(
        site: Site, uids: List[int]) -> None:
    """After kill -9 and a restart the broker knows the job is adopted: it renews it from
    the mytoken it kept and, having no parent, revokes it by that mytoken at the end."""
    uid = uids[0]
    tokendir = stage0(site, "arcjob-crash", uid)
    [minted] = site.children()
    anchor = Anchor(site, uid)
    try:
        assert adopt(anchor, uid, tokendir).get("ok")
        site.kill9()
        site.start()
        reply = client_reply(anchor.client(uid, "ensure", "--min-valid", str(LIFETIME_S + 1)))
        assert reply["ok"] and reply["detail"]["renewed"], reply
        assert mytokens_in(tokendir) == [] and len(site.mytoken_files()) == 1
        assert client_reply(anchor.client(uid, "release"))["ok"]
        wait_for(lambda: minted.revoked, 30, "the adopted job mytoken is revoked after a restart")
        wait_for(lambda: not site.mytoken_files(), 30, "the broker forgets it")
    finally:
        anchor.kill()
