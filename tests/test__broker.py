"""The node broker, as jobs use it: real broker process, real socket, jobs as other uids."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator

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
    running_site,
    spare_uids,
    wait_for,
)

LIFETIME_S = 60.0  # long enough for a loaded machine; renewals are driven by ensure here


@pytest.fixture()
def site() -> Iterator[Site]:
    with running_site(at_lifetime_s=LIFETIME_S, margin_s=10) as s:
        yield s


@pytest.fixture()
def uids() -> Any:
    return spare_uids(2)


def claims(path: Path) -> Any:
    return jwt.decode(path.read_text().strip(), options={"verify_signature": False})


def node_metrics(site: Site) -> Dict[str, float]:
    """The broker's textfile, read as Prometheus reads it: ``name`` or ``name{phase}``."""
    from prometheus_client.parser import text_string_to_metric_families

    [path] = site.metrics_dir.glob("jobtoken_u0_broker-*.prom")
    values = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            assert sample.labels["state_dir"] == str(site.state_dir)
            phase = sample.labels.get("phase")
            values[f"{sample.name}{{{phase}}}" if phase else sample.name] = sample.value
    return values


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
                                           str(LIFETIME_S + 1)))  # more than any token has
        assert reply["ok"] and reply["detail"]["renewed"], reply
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


def prepared_job(site: Site, job_id: str, uid: int) -> Any:
    """A prepared job whose anchor runs as the job's uid (so it can ask the broker itself)."""
    anchor, tokendir = started_job(site, job_id, uid, anchor_uid=uid)
    reply = anchor.call("prepare", tokendir=str(tokendir))
    assert reply["ok"], reply
    return anchor, tokendir


def test_a_job_cannot_get_a_token_for_another_job_by_lying(site: Site, uids: Any) -> None:
    uid, other_uid = uids
    a_anchor, a_dir = started_job(site, "job-a", uid)
    b_anchor, b_dir = started_job(site, "job-b", uid)
    outsider = started_job(site, "job-c", other_uid)[0]
    stray = Anchor(site, uid)  # the job's uid, but not below any registered anchor
    try:
        assert client_reply(a_anchor.client(uid, "prepare", "--dir", str(a_dir)))["ok"]
        before = a_dir.joinpath("bt").read_bytes()
        # wrong ancestry: a process of the right uid that no job's anchor started
        reply = stray.call("prepare", tokendir=str(b_dir))
        assert (reply["ok"], reply["exit_code"]) == (False, 67), reply
        # wrong uid: below job b's anchor, but running as another uid
        reply = client_reply(b_anchor.client(other_uid, "prepare", "--dir", str(b_dir)))
        assert "error" in reply and "belongs to no job" in reply["error"], reply
        # another job's directory: job b (same uid) and job c (another uid) ask for a's
        reply = client_reply(b_anchor.client(uid, "prepare", "--dir", str(a_dir)))
        assert "belongs to another job" in reply["error"], reply
        reply = client_reply(outsider.client(other_uid, "prepare", "--dir", str(a_dir)))
        assert "not the job's uid" in reply["error"], reply
        # ... or reach it through a link of its own
        link = b_dir.parent / "link-to-a"
        os.symlink(a_dir, link)
        reply = client_reply(b_anchor.client(uid, "prepare", "--dir", str(link)))
        assert "symlink" in reply["error"], reply
        # a job cannot speak for jobs: register one, or release another
        reply = client_reply(b_anchor.client(uid, "register", "--job-id", "job-a", "--uid",
                                             str(uid), "--anchor-pid", str(b_anchor.pid)))
        assert "may not register jobs" in reply["error"], reply
        b_payload = client_reply(b_anchor.client(uid, "release", "--job-id", "job-a"))
        assert "only root or the broker's uid" in b_payload["error"], b_payload
        # job a still has its token and its one mytoken; nothing else was minted
        assert a_dir.joinpath("bt").read_bytes() == before
        assert len(site.children()) == 1 and not site.children()[0].revoked
        assert sorted(os.listdir(b_dir)) == []
    finally:
        for anchor in (a_anchor, b_anchor, outsider, stray):
            anchor.kill()


def test_links_the_job_plants_are_replaced_never_written_through(site: Site, uids: Any
                                                                  ) -> None:
    uid = uids[0]
    anchor, tokendir = prepared_job(site, "job-links", uid)
    victim = site.base / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    bt = tokendir / "bt"
    try:
        # a symlink in place of the token file
        bt.unlink()
        os.symlink(victim, bt)
        os.lchown(bt, uid, uid)
        reply = anchor.call("ensure", min_valid_s=LIFETIME_S + 1)  # forces a renewal
        assert reply["ok"], reply
        assert victim.read_text() == "precious\n"
        assert not bt.is_symlink() and os.stat(bt).st_uid == uid
        # a hardlink to a root file in place of the token file (as if protected_hardlinks
        # were off): the entry is replaced, the root file keeps its content and mode
        bt.unlink()
        os.link(victim, bt)
        reply = anchor.call("ensure", min_valid_s=1)  # a valid token: only the file is restored
        assert reply["ok"], reply
        assert victim.read_text() == "precious\n" and os.stat(victim).st_nlink == 1
        assert os.stat(victim).st_uid == 0 and stat.S_IMODE(os.stat(victim).st_mode) == 0o644
        assert claims(bt)["exp"] == reply["expires_at"]
        # the directory itself swapped for a link to a root-owned directory
        rootdir = site.base / "rootdir"
        rootdir.mkdir(mode=0o700)
        os.rename(tokendir, tokendir.parent / "moved")
        os.symlink(rootdir, tokendir)
        reply = anchor.call("ensure", min_valid_s=LIFETIME_S + 1)
        assert (reply["ok"], reply["exit_code"]) == (False, 74), reply
        assert os.listdir(rootdir) == []
        # ... or for another real directory of the job's: not the one bound at prepare
        tokendir.unlink()
        fresh = site.job_dir("job-links", uid)
        assert fresh == tokendir
        reply = anchor.call("ensure", min_valid_s=1)
        assert (reply["ok"], reply["exit_code"]) == (False, 74), reply
        assert "replaced" in reply["message"] and os.listdir(fresh) == []
    finally:
        anchor.kill()


def test_a_dead_anchor_gets_its_job_mytoken_revoked_even_without_its_directory(
        site: Site, uids: Any) -> None:
    uid = uids[0]
    anchor, tokendir = prepared_job(site, "job-dies", uid)
    bystander, _ = prepared_job(site, "job-lives", uid)
    try:
        # the payload deletes its token directory, then everything is killed
        result = anchor.spawn(["/bin/rm", "-rf", str(tokendir)], uid)
        assert result["rc"] == 0 and not tokendir.exists(), result
        dying, living = site.children()
        anchor.kill()
        wait_for(lambda: dying.revoked, 60, "the dead job's mytoken is revoked at the server")
        wait_for(lambda: len(site.mytoken_files()) == 1, 30, "its state is removed")
        assert not living.revoked
        status = bystander.call("status")
        assert status["ok"] and status["detail"]["phase"] == "active", status
    finally:
        anchor.kill()
        bystander.kill()


def test_a_429_with_retry_after_pauses_the_whole_node_once(site: Site, uids: Any) -> None:
    uid = uids[0]
    jobs = [prepared_job(site, f"job-{n}", uid) for n in range(3)]
    try:
        site.srv.faults.add("access", status=429, retry_after_s=6, count=1)
        asked_at = time.time()
        reply = jobs[0][0].call("ensure", min_valid_s=LIFETIME_S + 1)
        assert (reply["ok"], reply["exit_code"], reply["retryable"]) == (False, 75, True), reply
        requests = len(site.srv.requests("access"))
        # every other job of the node waits too, without asking the server
        for anchor, _ in jobs[1:]:
            reply = anchor.call("ensure", min_valid_s=LIFETIME_S + 1)
            assert (reply["ok"], reply["exit_code"]) == (False, 75), reply
            assert "Retry-After" in reply["message"], reply
        assert len(site.srv.requests("access")) == requests
        paused = site.client.status().detail["paused_until"]
        assert asked_at + 6 <= paused <= time.time() + 6
        # a token still valid long enough is served during the pause
        assert jobs[1][0].call("ensure", min_valid_s=5)["ok"]
        # and when the pause is over, renewals go on
        wait_for(lambda: time.time() > paused, 30, "the pause ends")
        for anchor, tokendir in jobs:
            reply = anchor.call("ensure", min_valid_s=LIFETIME_S - 5)
            # a token obtained after the pause (job 0's own retry may have been first)
            assert reply["ok"] and reply["expires_at"] >= paused + LIFETIME_S - 2, reply
            assert claims(tokendir / "bt")["exp"] == reply["expires_at"]
        assert [r.status for r in site.srv.requests("access")].count(429) == 1
        # the node's metrics count one pause and the failed attempt that met it
        wait_for(lambda: node_metrics(site)["jobtoken_broker_rate_limit_pauses_total"] == 1
                 and node_metrics(site)["jobtoken_broker_renewal_failures_total"] >= 1, 30,
                 "the metrics show the pause")
    finally:
        for anchor, _ in jobs:
            anchor.kill()


def _raw_exchange(socket_path: str, data: bytes, *, wait_s: float = 30.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(wait_s)
        sock.connect(socket_path)
        if data:
            try:
                sock.sendall(data)
            except BrokenPipeError:
                pass
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return received


def _one_error_line(received: bytes, code: int) -> str:
    assert received.endswith(b"\n") and received.count(b"\n") == 1, received[:200]
    reply = json.loads(received)
    assert (reply["ok"], reply["exit_code"]) == (False, code), reply
    return str(reply["message"])


CROWD = """
import socket, sys
socks = []
for _ in range(70):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.sendall(b'{"v": 1, "op"')
    socks.append(s)
busy = 0
for s in socks[64:]:
    s.settimeout(3)
    busy += b"too many connections" in s.recv(4096)
print(busy)
"""


def test_one_uid_cannot_crowd_out_the_others(site: Site, uids: Any) -> None:
    crowd = Anchor(site, uids[0])
    try:
        result = crowd.spawn([JOB_PYTHON, "-c", CROWD, site.socket], uids[0])
        assert result["rc"] == 0 and result["out"].split() == ["6"], result
        assert site.client.ping().ok
    finally:
        crowd.kill()


def test_hostile_input_gets_one_line_and_does_not_stall_the_loop(site: Site) -> None:
    # huge: more than 64 KiB without a newline
    message = _one_error_line(_raw_exchange(site.socket, b"x" * (200 * 1024)), 2)
    assert "larger than 65536 bytes" in message
    # garbage, a wrong version, an unknown op, a wrongly typed field
    for data, words in ((b"\x00\xff\xfe not json\n", "not one line of JSON"),
                        (b'{"v": 2, "op": "ping"}\n', "protocol version"),
                        (b'{"v": 1, "op": "steal"}\n', "unknown op"),
                        (b'{"v": 1, "op": "ensure", "min_valid_s": "x"}\n', "min_valid_s"),
                        (b"[1, 2]\n", "not a JSON object")):
        assert words in _one_error_line(_raw_exchange(site.socket, data), 2)
    # slow clients: many connections that never finish a request ...
    slow = []
    for _ in range(50):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(site.socket)
        sock.sendall(b'{"v": 1, "op": "pi')
        slow.append(sock)
    try:
        # ... do not keep others from being served: well before a stalled loop could
        # answer (it would wait out a slow client's 5 s), even on a loaded machine
        for _ in range(5):
            began = time.monotonic()
            assert site.client.ping().ok
            assert time.monotonic() - began < 4.0
        # ... and each gets one line when its time is up
        slow[0].settimeout(30)
        received = b""
        while not received.endswith(b"\n"):
            chunk = slow[0].recv(4096)
            if not chunk:
                break
            received += chunk
        assert "no complete request within" in _one_error_line(received, 2)
    finally:
        for sock in slow:
            sock.close()
    assert site.client.ping().ok


def test_a_prepare_cut_short_by_a_crash_is_revoked_and_may_be_done_again(site: Site, uids: Any
                                                                          ) -> None:
    from jobtoken._mytoken import MytokenClient

    uid = uids[0]
    anchor, tokendir = started_job(site, "job-cut", uid, anchor_uid=uid)
    try:
        site.stop()
        # what a broker killed between "preparing" and saving the minted mytoken leaves:
        # the phase on disk, and a live job mytoken at the server that nobody holds
        [record] = site.state_dir.glob("jobs/job-cut-*/broker.json")
        data = json.loads(record.read_text())
        assert data["phase"] == "registered"
        record.write_text(json.dumps(dict(data, phase="preparing", tokendir=str(tokendir))))
        with MytokenClient(site.srv.url, allow_http=True) as client:
            client.create_mytoken(site.parent.read_text().strip(), capabilities=["AT"],
                                  restrictions=[{"scope": "storage.create:/vo/jobs/job-cut",
                                                 "exp": int(time.time() + 3600)}],
                                  name="jobtoken job-cut")
        [orphan] = site.children()
        site.start()
        wait_for(lambda: orphan.revoked, 60, "the orphaned job mytoken is revoked")
        wait_for(lambda: site.client.status("job-cut").detail["phase"] == "registered", 30,
                 "the job is back to registered")
        reply = anchor.call("prepare", tokendir=str(tokendir))
        assert reply["ok"], reply
        assert [c.revoked for c in site.children()] == [True, False]
    finally:
        anchor.kill()


def test_a_socket_directory_others_may_write_is_refused() -> None:
    require_root()
    with DevServer(DevServerConfig()) as srv:
        for base in base_dir():
            site = Site(srv, base, at_lifetime_s=LIFETIME_S, margin_s=10)
            (base / "run").mkdir()
            (base / "run").chmod(0o1777)  # like /tmp: anyone could plant a socket there
            result = subprocess.run(
                [sys.executable, "-m", "jobtoken", "broker", "serve", "--config",
                 str(site.config)], capture_output=True, text=True, timeout=120,
                stdin=subprocess.DEVNULL)
            assert result.returncode == 78, result.stderr
            assert result.stderr.count("\n") == 1 and "not writable by others" in result.stderr
            assert not Path(site.socket).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_the_broker_stops_cleanly_on_each_stop_signal(signum: int) -> None:
    """systemd sends SIGTERM, a terminal SIGINT, condor_master's fast shutdown SIGQUIT."""
    with running_site(at_lifetime_s=LIFETIME_S, margin_s=10) as site:
        assert site.proc is not None
        site.proc.send_signal(signum)
        assert site.proc.wait(timeout=60) == 0, site.log_text()
        assert "broker stopped" in site.log_text()


def test_the_broker_exports_node_totals_that_survive_a_restart(site: Site, uids: Any) -> None:
    uid = uids[0]
    anchor, tokendir = started_job(site, "job-m", uid)
    try:
        assert client_reply(anchor.client(uid, "prepare", "--dir", str(tokendir)))["ok"]
        reply = client_reply(anchor.client(uid, "ensure", "--min-valid", str(LIFETIME_S + 1)))
        assert reply["ok"] and reply["detail"]["renewed"], reply
        wait_for(lambda: node_metrics(site).get("jobtoken_broker_jobs{active}") == 1
                 and node_metrics(site)["jobtoken_broker_renewals_total"] >= 1, 30,
                 "the metrics show the active job and its renewal")
        assert client_reply(anchor.client(uid, "release"))["ok"]
        wait_for(lambda: node_metrics(site)["jobtoken_broker_revocations_total"] == 1, 30,
                 "the metrics count the revocation")
        after = node_metrics(site)
        assert after["jobtoken_broker_revocations_pending"] == 0
        assert after["jobtoken_broker_jobs{active}"] == after["jobtoken_broker_jobs{ending}"] == 0
        assert after["jobtoken_broker_renewal_failures_total"] == 0
        assert after["jobtoken_broker_updated_timestamp_seconds"] > time.time() - 60
        # counters only grow: a restarted broker carries them on from its file
        site.stop()
        site.start()
        restarted = node_metrics(site)
        assert restarted["jobtoken_broker_revocations_total"] == 1
        assert restarted["jobtoken_broker_renewals_total"] == \
            after["jobtoken_broker_renewals_total"] >= 1
    finally:
        anchor.kill()
