"""The node broker over time: a crash and restart, and a node full of jobs (real processes).

Each test reads the jobs' token files as their payloads would, many times a second, for
several token lifetimes, and counts every read that was missing, torn or expired.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import jwt
import pytest

from jobtoken._brokerstore import job_key
from tests.brokerhelpers import Anchor, Site, running_site, spare_uids, wait_for

pytestmark = pytest.mark.slow


class Reader(threading.Thread):
    """Reads every token file in turn until stopped; judges each read like a payload."""

    def __init__(self, paths: List[Path]) -> None:
        super().__init__(daemon=True)
        self.paths = paths
        self.counts = {"reads": 0, "missing": 0, "torn": 0, "expired": 0}
        self.jtis: Dict[Path, List[str]] = {p: [] for p in paths}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for path in self.paths:
                self.counts["reads"] += 1
                try:
                    raw = path.read_text().strip()
                except FileNotFoundError:
                    self.counts["missing"] += 1
                    continue
                try:
                    claims = jwt.decode(raw, options={"verify_signature": False})
                except jwt.PyJWTError:
                    self.counts["torn"] += 1
                    continue
                if claims["exp"] <= time.time():
                    self.counts["expired"] += 1
                seen = self.jtis[path]
                if not seen or seen[-1] != claims["jti"]:
                    seen.append(claims["jti"])
            self.stopping.wait(0.05)

    def tokens(self, path: Path) -> int:
        return len(self.jtis[path])

    def bad(self) -> int:
        return self.counts["missing"] + self.counts["torn"] + self.counts["expired"]


def prepared_job(site: Site, job_id: str, uid: int, *, sleep: bool = False) -> Any:
    """A job whose anchor (as the job's uid) registers, prepares, and maybe becomes sleep."""
    anchor = Anchor(site, uid)
    site.register(job_id, uid, anchor.pid)
    tokendir = site.job_dir(job_id, uid)
    reply = anchor.call("prepare", tokendir=str(tokendir))
    assert reply["ok"], reply
    if sleep:  # the pid (and so the anchor) stays; the interpreter's memory goes
        assert anchor.proc.stdin is not None
        anchor.proc.stdin.write(json.dumps({"op": "exec", "argv": ["/bin/sleep", "900"]})
                                + "\n")
        anchor.proc.stdin.flush()
    return anchor, tokendir


def renewals(site: Site) -> Dict[str, int]:
    """Each job's renewals so far, from the broker's own state files."""
    found = {}
    for path in site.state_dir.glob("jobs/*/state.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found[state["job_id"]] = state["renewals"]
    return found


def test_a_broker_killed_mid_job_loses_nothing_and_revokes_what_ended_meanwhile() -> None:
    lifetime = 30
    with running_site(at_lifetime_s=lifetime, margin_s=9) as site:
        uid = spare_uids(1)[0]
        jobs = [prepared_job(site, f"job-{n}", uid) for n in range(3)]
        survivors = [d / "bt" for _, d in jobs[:2]]
        kept = {p: p.read_bytes() for p in site.mytoken_files()}
        assert len(kept) == 3
        reader = Reader(survivors)
        reader.start()
        try:
            # mid-job: the first renewal is done, the others are due about now
            wait_for(lambda: max(renewals(site).values()) >= 1, 2 * lifetime,
                     "a first renewal")
            site.kill9()
            minted = site.children()  # in the order of the jobs
            jobs[2][0].kill()  # a job ends while the broker is down
            site.start()
            wait_for(lambda: minted[2].revoked, 60, "the job that ended meanwhile is revoked")
            wait_for(lambda: all(reader.tokens(p) >= 4 for p in survivors), 4 * lifetime,
                     "every surviving job gets fresh tokens after the restart")
            assert not minted[0].revoked and not minted[1].revoked
            # no mytoken lost: the survivors' are where they were, byte for byte. Read
            # while their jobs live: an ended job's files are the broker's to remove.
            survivor_keys = {job_key(f"job-{n}") for n in range(2)}
            left = {p: p.read_bytes() for p in site.mytoken_files()
                    if p.parent.name in survivor_keys}
        finally:
            reader.stopping.set()
            reader.join(10)
            for anchor, _ in jobs:
                anchor.kill()
        assert reader.bad() == 0, reader.counts
        assert len(left) == 2 and all(kept[p] == data for p, data in left.items()), left.keys()


def test_64_jobs_on_one_broker_never_read_an_expired_token() -> None:
    lifetime = 20
    with running_site(at_lifetime_s=lifetime, margin_s=6) as site:
        uid = spare_uids(1)[0]
        jobs = []
        began = time.monotonic()
        try:
            for n in range(64):
                jobs.append(prepared_job(site, f"sandbox-{n}", uid, sleep=True))
            prepare_s = time.monotonic() - began
            reader = Reader([d / "bt" for _, d in jobs])
            reader.start()
            try:
                wait_for(lambda: len(renewals(site)) == 64
                         and min(renewals(site).values()) >= 2, 6 * lifetime,
                         "every job renewed twice")
            finally:
                reader.stopping.set()
                reader.join(10)
            assert reader.bad() == 0, reader.counts
            assert all(reader.tokens(d / "bt") >= 2 for _, d in jobs)
            # one job mytoken each, all live, none in a sandbox
            assert len(site.mytoken_files()) == 64
            assert not any(c.revoked for c in site.children())
            for _, d in jobs:  # the token, and at most a renewal's temporary file of it
                assert all(n == "bt" or n.startswith(".bt.") for n in os.listdir(d)), d
            print(f"64 jobs prepared in {prepare_s:.1f} s; reads={reader.counts['reads']}")
        finally:
            for anchor, _ in jobs:
                anchor.kill()
        wait_for(lambda: all(c.revoked for c in site.children()), 120,
                 "every job mytoken revoked once the anchors are gone")
