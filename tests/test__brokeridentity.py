"""Who is calling: anchors are pid + start time, and a job is its uid below its anchor."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterator

import pytest

from jobtoken._brokeridentity import (
    JobIdentity,
    PeerCred,
    RegisteredJobs,
    ancestors,
    anchor_alive,
    anchor_of,
    caller_anchor,
)
from jobtoken._errors import IdentityError

SLEEP = [sys.executable, "-c", "import time; time.sleep(300)"]


@pytest.fixture()
def anchor_with_child() -> Iterator[tuple]:
    """A process (the anchor) with a child below it, both ours."""
    code = ("import subprocess, sys, time\n"
            f"p = subprocess.Popen({SLEEP!r})\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(300)\n")
    anchor = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert anchor.stdout is not None
    child = int(anchor.stdout.readline())
    try:
        yield anchor.pid, child
    finally:
        os.kill(child, 9)
        anchor.kill()
        anchor.wait(30)


def test_ancestors_start_with_the_process_and_climb_to_the_top() -> None:
    chain = ancestors(os.getpid())
    assert chain[0] == anchor_of(os.getpid())
    assert chain[1].pid == os.getppid()
    assert len({a.pid for a in chain}) == len(chain)


def test_an_ended_process_is_no_longer_its_anchor() -> None:
    proc = subprocess.Popen(SLEEP)
    anchor = anchor_of(proc.pid)
    assert anchor is not None and anchor_alive(anchor)
    proc.kill()
    proc.wait(30)
    assert not anchor_alive(anchor) and anchor_of(proc.pid) != anchor


def test_a_zombie_has_ended() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    anchor = anchor_of(proc.pid)
    assert anchor is not None
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    assert not anchor_alive(anchor)
    proc.wait(30)


def test_registered_jobs_resolve_by_uid_and_ancestry(anchor_with_child: tuple) -> None:
    anchor_pid, child = anchor_with_child
    uid = os.geteuid()
    jobs = RegisteredJobs()
    with pytest.raises(IdentityError, match="may not register"):
        RegisteredJobs(broker_uid=4243).register(  # neither root nor the broker's uid
            PeerCred(1, 4242, 0), {"job_id": "j", "uid": uid, "anchor_pid": anchor_pid})
    identity = jobs.register(PeerCred(os.getpid(), uid, os.getgid()),
                             {"job_id": "j", "uid": uid, "anchor_pid": anchor_pid,
                              "walltime_s": 60, "scopes": ["storage.read:/x"]})
    assert identity.anchor == anchor_of(anchor_pid) and identity.scopes == ("storage.read:/x",)
    assert jobs.resolve(PeerCred(child, uid, 0)) == identity
    assert jobs.resolve(PeerCred(anchor_pid, uid, 0)) == identity
    with pytest.raises(IdentityError, match="belongs to no job"):
        jobs.resolve(PeerCred(os.getpid(), uid, 0))  # not below the anchor
    with pytest.raises(IdentityError, match="belongs to no job"):
        jobs.resolve(PeerCred(child, uid + 1, 0))  # below it, but another uid
    other = dict(identity.to_dict(), anchor_pid=os.getpid())
    with pytest.raises(IdentityError, match="another anchor"):
        jobs.register(PeerCred(os.getpid(), uid, 0), other)
    jobs.forget("j")
    with pytest.raises(IdentityError):
        jobs.resolve(PeerCred(child, uid, 0))


@pytest.mark.parametrize("job", [
    {"uid": 1, "anchor_pid": 2},
    {"job_id": "", "uid": 1, "anchor_pid": 2},
    {"job_id": "j\n", "uid": 1, "anchor_pid": 2},
    {"job_id": "j", "uid": -1, "anchor_pid": 2},
    {"job_id": "j", "uid": 1, "anchor_pid": 2, "walltime_s": "long"},
    {"job_id": "j", "uid": 1, "anchor_pid": 2, "scopes": "storage.read:/"},
])
def test_a_malformed_job_is_an_identity_error(job: dict) -> None:
    with pytest.raises(IdentityError, match="not a job description"):
        JobIdentity.from_dict(dict(job, anchor_start_ticks=1))


def test_an_anchor_that_is_not_running_cannot_be_registered() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    with pytest.raises(IdentityError, match="not running"):
        RegisteredJobs().register(PeerCred(os.getpid(), os.geteuid(), 0),
                                  {"job_id": "j", "uid": 0, "anchor_pid": proc.pid})


def test_a_caller_anchors_its_job_to_itself_or_an_ancestor_of_its_uid(
        anchor_with_child: tuple) -> None:
    """``adopt``'s anchor: default the caller's parent; a named one must be the caller or
    an ancestor running as the caller's uid (here every process is the test's uid)."""
    anchor_pid, child = anchor_with_child
    peer = PeerCred(pid=child, uid=os.geteuid(), gid=os.getegid())
    assert caller_anchor(peer) == anchor_of(anchor_pid)  # the parent
    assert caller_anchor(peer, child) == anchor_of(child)  # the caller itself
    assert caller_anchor(peer, os.getpid()) == anchor_of(os.getpid())  # further up
    stranger = subprocess.Popen(SLEEP)  # same uid, not an ancestor
    try:
        with pytest.raises(IdentityError, match="not process .* or one of its ancestors"):
            caller_anchor(peer, stranger.pid)
    finally:
        stranger.kill()
        stranger.wait(30)
    # an ancestor of another uid: the caller says it runs as a uid its parent does not
    other = PeerCred(pid=child, uid=os.geteuid() + 1, gid=os.getegid())
    with pytest.raises(IdentityError, match="does not run as uid"):
        caller_anchor(other)


def test_a_caller_that_is_gone_has_no_anchor() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    with pytest.raises(IdentityError, match="ended before its request was read"):
        caller_anchor(PeerCred(pid=proc.pid, uid=os.geteuid(), gid=os.getegid()))
