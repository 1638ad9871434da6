"""The HTCondor identity rules of the node broker: a caller's starter, its slot, the slot ad.

The process chains and slot ads here have the shapes a real 23.9 execute point shows
(``tests/real/condor/test_broker.py`` checks them on a pool): a hook or payload is a
child of ``condor_starter -f -a slot1_1 <shadow host>``, whose parent is ``condor_startd``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import classad2
import pytest

from jobtoken._brokeridentity import PeerCred, ProcessAnchor
from jobtoken._errors import ConfigError, IdentityError
from jobtoken.integrations.condor_broker import (
    CondorJobs,
    NotAJob,
    ProcessInfo,
    find_starter,
    pick_slot_ad,
    process_chain,
    read_process,
    slot_from_starter_argv,
    slot_job_from_ad,
    startd_address,
)

JOB_UID = 1000
GLOBAL_JOB_ID = "ap.example.org#12.0#1700000000"


def proc(pid: int, ppid: int, name: str, uid: int, argv: Tuple[str, ...] = (),
         start: int = 0) -> ProcessInfo:
    return ProcessInfo(pid=pid, ppid=ppid, start_ticks=start or pid, name=name, real_uid=uid,
                       argv=argv or (name,))


STARTER = proc(300, 200, "condor_starter", 0, ("condor_starter", "-f", "-a", "slot1_1",
                                                  "127.0.0.1"))
STARTD = proc(200, 100, "condor_startd", 0, ("condor_startd",))
MASTER = proc(100, 1, "condor_master", 0, ("condor_master",))


def chain_of(*mine: ProcessInfo) -> list:
    return [*mine, STARTER, STARTD, MASTER]


# --- the starter's command line ---------------------------------------------------------


@pytest.mark.parametrize(
    "argv, slot",
    [
        (("condor_starter", "-f", "-a", "slot1_1", "127.0.0.1"), "slot1_1"),  # the default
        (("condor_starter", "-f", "-a", "slot3", "h"), "slot3"),  # a static slot
        # STARTER_LOG_NAME_APPEND = JobId: -a names the job, -slot-name the slot
        (("condor_starter", "-f", "-a", "12.0", "-slot-name", "slot2_4", "h"), "slot2_4"),
        (("condor_starter", "-f", "-local-name", "slot_type_1", "-a", "slot1_2", "h"),
         "slot1_2"),
        (("condor_starter", "-f", "-a", "12", "h"), None),  # ClusterId, no -slot-name
        (("condor_starter", "-f", "h"), None),
        (("condor_starter", "-f", "-a"), None),
    ],
)
def test_slot_comes_from_the_starters_command_line(argv: Tuple[str, ...], slot: Any) -> None:
    assert slot_from_starter_argv(argv) == slot


# --- ancestry -----------------------------------------------------------------------------


def test_a_payload_deep_under_its_starter_is_found() -> None:
    chain = chain_of(proc(500, 400, "python3", JOB_UID), proc(400, 301, "bash", JOB_UID),
                     proc(301, 300, "sh", JOB_UID))
    starter, slot = find_starter(chain, JOB_UID)
    assert (starter.pid, slot) == (300, "slot1_1")


def test_a_setuid_helper_between_payload_and_starter_does_not_hide_the_starter() -> None:
    # ping/fusermount-like: effective uid 0, real uid the job's
    chain = chain_of(proc(500, 400, "helper", JOB_UID), proc(400, 300, "sh", JOB_UID))
    assert find_starter(chain, JOB_UID)[1] == "slot1_1"


def test_a_fake_starter_of_the_jobs_own_uid_is_not_a_starter() -> None:
    fake = proc(450, 300, "condor_starter", JOB_UID,
                ("condor_starter", "-f", "-a", "slot9_9", "h"))
    chain = chain_of(proc(500, 450, "python3", JOB_UID), fake)
    # the fake is skipped as the job's own process; the real starter names slot1_1
    assert find_starter(chain, JOB_UID)[1] == "slot1_1"


def test_a_process_outside_any_job_is_refused() -> None:
    chain = [proc(500, 400, "python3", JOB_UID), proc(400, 1, "sshd", 0)]
    with pytest.raises(NotAJob, match="does not run under a condor_starter"):
        find_starter(chain, JOB_UID)


def test_another_users_process_in_between_is_refused() -> None:
    chain = chain_of(proc(500, 400, "python3", JOB_UID), proc(400, 300, "sh", 1001))
    with pytest.raises(NotAJob, match="first other owner"):
        find_starter(chain, JOB_UID)


def test_root_is_never_a_job() -> None:
    with pytest.raises(NotAJob, match="root"):
        find_starter(chain_of(proc(500, 300, "python3", 0)), 0)


def test_a_starter_not_started_by_a_startd_is_refused() -> None:
    chain = [proc(500, 300, "python3", JOB_UID), STARTER, proc(200, 1, "bash", 0)]
    with pytest.raises(NotAJob, match="not started by a condor_startd"):
        find_starter(chain, JOB_UID)


def test_a_starter_without_a_slot_on_its_command_line_is_refused() -> None:
    starter = proc(300, 200, "condor_starter", 0, ("condor_starter", "-f", "h"))
    with pytest.raises(NotAJob, match="names no slot"):
        find_starter([proc(500, 300, "sh", JOB_UID), starter, STARTD], JOB_UID)


def test_the_walk_stops_at_a_parent_younger_than_its_child() -> None:
    # the job's starter ended and its pid was reused by a later process: not an ancestor
    table = {
        500: proc(500, 300, "python3", JOB_UID, start=1000),
        300: proc(300, 200, "condor_starter", 0, STARTER.argv, start=2000),
        200: STARTD,
    }
    chain = process_chain(500, read=lambda pid: table[pid])
    assert [p.pid for p in chain] == [500]
    with pytest.raises(NotAJob):
        find_starter(chain, JOB_UID)


def test_read_process_reads_this_process() -> None:
    me = read_process(os.getpid())
    assert me.ppid == os.getppid()
    assert me.real_uid == os.getuid()
    assert me.argv and me.start_ticks > 0
    chain = process_chain(os.getpid())
    assert chain[0] == me and all(p.pid != 1 for p in chain)


def test_read_process_of_a_gone_pid_is_not_a_job(tmp_path: Path) -> None:
    with pytest.raises(NotAJob, match="gone"):
        read_process(12345, proc=str(tmp_path))


def test_read_process_copes_with_a_parenthesis_in_the_name(tmp_path: Path) -> None:
    d = tmp_path / "77"
    d.mkdir()
    fields = " ".join(["S", "5"] + ["0"] * 17 + ["4242"] + ["0"] * 20)
    (d / "stat").write_text(f"77 (evil) 1 2) {fields}\n")
    (d / "status").write_text("Name:\tevil\nUid:\t1000\t0\t0\t0\n")
    (d / "cmdline").write_bytes(b"evil\0x\0")
    info = read_process(77, proc=str(tmp_path))
    assert (info.name, info.ppid, info.start_ticks, info.real_uid, info.argv) == (
        "evil) 1 2", 5, 4242, 1000, ("evil", "x"))


# --- the slot ad --------------------------------------------------------------------------


def slot_ad(**extra: Any) -> Any:
    values: Dict[str, Any] = {
        "Name": "slot1_1@ep.example.org",
        "State": "Claimed",
        "JobId": "12.0",
        "GlobalJobId": GLOBAL_JOB_ID,
        "RemoteOwner": "alice@example.org",
        "RemoteUser": "alice@example.org",
        "HookKeyword": "JOBTOKEN",
    }
    values.update(extra)
    ad = classad2.ClassAd()
    for key, value in values.items():
        if value is not None:
            ad[key] = value
    return ad


def test_the_slot_ad_gives_the_jobs_identity_and_wishes() -> None:
    job = slot_job_from_ad(slot_ad(AllowedJobDuration=3600, AcctGroup="group_dteam.alice",
                                   JobtokenPath="/dteam/user/alice",
                                   JobtokenAudience="https://se.example.org"), "slot1_1")
    assert job.job_id == GLOBAL_JOB_ID
    assert job.owner == "alice"
    assert job.walltime_s == 3600
    assert job.vo == "dteam"
    assert job.scopes == ("storage.create:/dteam/user/alice",)
    assert job.audiences == ("https://se.example.org",)


def test_the_shortest_enforced_walltime_wins_as_in_the_hook() -> None:
    job = slot_job_from_ad(slot_ad(AllowedJobDuration=7200, AllowedExecuteDuration=3600,
                                   MaxWallTimeMins=10), "slot1_1")
    assert job.walltime_s == 3600


def test_a_job_that_did_not_ask_is_not_served() -> None:
    with pytest.raises(NotAJob, match="did not ask"):
        slot_job_from_ad(slot_ad(HookKeyword=None), "slot1_1")
    with pytest.raises(NotAJob, match="did not ask"):
        slot_job_from_ad(slot_ad(HookKeyword="OTHER"), "slot1_1")


def test_the_keyword_is_matched_as_htcondor_matches_knob_names() -> None:
    assert slot_job_from_ad(slot_ad(HookKeyword="jobtoken"), "slot1_1").job_id == GLOBAL_JOB_ID


def test_an_idle_slot_or_another_slots_ad_is_refused() -> None:
    with pytest.raises(NotAJob, match="runs no job"):
        slot_job_from_ad(slot_ad(State="Unclaimed"), "slot1_1")
    with pytest.raises(NotAJob, match="not slot1_2's"):
        slot_job_from_ad(slot_ad(), "slot1_2")


def test_bad_wishes_are_a_config_error_as_in_the_hook() -> None:
    with pytest.raises(ConfigError, match="JobtokenPath"):
        slot_job_from_ad(slot_ad(JobtokenPath="relative/path"), "slot1_1")


def test_pick_slot_ad_matches_the_slot_name_exactly() -> None:
    ads = [slot_ad(Name="slot1@ep"), slot_ad(Name="slot1_10@ep"), slot_ad(Name="slot1_1@ep")]
    assert pick_slot_ad(ads, "slot1_1")["Name"] == "slot1_1@ep"
    with pytest.raises(NotAJob, match="no slot slot1_2"):
        pick_slot_ad(ads, "slot1_2")


def test_startd_address_comes_from_the_startds_own_file(tmp_path: Path) -> None:
    path = tmp_path / ".startd_address"
    path.write_text("<127.0.0.1:9618?addrs=127.0.0.1-9618>\n$CondorVersion: 23.9.6 $\n")
    knobs = {"STARTD_ADDRESS_FILE": str(path)}
    assert startd_address(knobs.get) == "<127.0.0.1:9618?addrs=127.0.0.1-9618>"
    assert startd_address({"LOG": str(tmp_path)}.get).startswith("<127.0.0.1:9618")
    with pytest.raises(ConfigError, match="cannot read"):
        startd_address({"STARTD_ADDRESS_FILE": str(tmp_path / "none")}.get)


# --- the resolver as the broker uses it ----------------------------------------------------


def resolver_for(table: Dict[int, ProcessInfo], ads: list) -> CondorJobs:
    return CondorJobs(query=lambda slot: ads, read=lambda pid: table[pid])


PAYLOAD_TABLE = {p.pid: p for p in (proc(500, 400, "python3", JOB_UID),
                                    proc(400, 300, "sh", JOB_UID), STARTER, STARTD, MASTER)}


def test_the_resolver_gives_the_starter_as_the_jobs_anchor() -> None:
    identity = resolver_for(PAYLOAD_TABLE, [slot_ad(AllowedJobDuration=600)]).resolve(
        PeerCred(pid=500, uid=JOB_UID, gid=JOB_UID))
    assert identity.job_id == GLOBAL_JOB_ID
    assert identity.uid == JOB_UID and identity.owner == "alice"
    assert identity.anchor == ProcessAnchor(300, STARTER.start_ticks)
    assert identity.walltime_s == 600


def test_the_resolver_refuses_with_identity_errors() -> None:
    peer = PeerCred(pid=500, uid=JOB_UID, gid=JOB_UID)
    with pytest.raises(IdentityError, match="did not ask"):
        resolver_for(PAYLOAD_TABLE, [slot_ad(HookKeyword=None)]).resolve(peer)
    with pytest.raises(IdentityError, match="no slot slot1_1"):
        resolver_for(PAYLOAD_TABLE, [slot_ad(Name="slot1_2@ep")]).resolve(peer)
    outside = {500: proc(500, 1, "python3", JOB_UID)}
    with pytest.raises(IdentityError, match="does not run under a condor_starter"):
        resolver_for(outside, [slot_ad()]).resolve(peer)


def test_a_starter_that_ended_during_the_query_is_not_trusted() -> None:
    table = dict(PAYLOAD_TABLE)
    calls: list = []

    def query(slot: str) -> list:
        calls.append(slot)
        table[300] = proc(300, 200, "condor_starter", 0, STARTER.argv, start=99999)
        return [slot_ad()]

    resolver = CondorJobs(query=query, read=lambda pid: table[pid])
    with pytest.raises(IdentityError, match="ended"):
        resolver.resolve(PeerCred(pid=500, uid=JOB_UID, gid=JOB_UID))
    assert calls == ["slot1_1"]


def test_the_broker_loads_this_resolver_by_name(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    from jobtoken import _broker
    from jobtoken._config import BrokerConfig, Config

    address = tmp_path / ".startd_address"
    address.write_text("<127.0.0.1:9618>\n")
    monkeypatch.setattr("jobtoken.integrations.condor_broker.condor_param",
                        {"STARTD_ADDRESS_FILE": str(address)}.get)
    resolver = _broker.make_resolver(Config(broker=BrokerConfig(identity="condor")))
    assert isinstance(resolver, CondorJobs)


# --- the hooks' side (the broker is a stub socket here; the real one runs in the pool) -----


class StubBroker:
    """A Unix socket that answers each request line with the next canned reply."""

    def __init__(self, path: Path, replies: list) -> None:
        import socket
        import threading

        self.path = str(path)
        self.requests: list = []
        self._replies = list(replies)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._replies:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(json.loads(data))
                conn.sendall(self._replies.pop(0).to_json().encode() + b"\n")

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    path = tmp_path / "dir_4242"
    path.mkdir()
    return path


def hook_ad(**extra: Any) -> str:
    from .conftest import job_ad_text

    return job_ad_text(GlobalJobId=GLOBAL_JOB_ID, Owner="alice", HookKeyword="JOBTOKEN",
                       Environment="FOO=bar BEARER_TOKEN=stale", **extra)


def test_the_prepare_hook_asks_the_broker_and_gives_the_job_only_the_token_file(
    scratch: Path, tmp_path: Path
) -> None:
    from jobtoken._brokerproto import BrokerReply
    from jobtoken._config import Config
    from jobtoken.integrations._env import parse_environment_v2
    from jobtoken.integrations.condor import HookOptions, run_prepare_hook

    sock = tmp_path / "b.sock"
    stub = StubBroker(sock, [BrokerReply(True, 0, "prepared", expires_at=2e9, job_id="j",
                                         bearer_token_file=str(scratch / ".jobtoken/bt"))])
    try:
        result = run_prepare_hook(Config(), hook_ad(), env={"_CONDOR_SCRATCH_DIR": str(scratch)},
                                  options=HookOptions(broker_socket=str(sock)))
    finally:
        stub.close()
    assert result.status_code == 0, result.message
    (request,) = stub.requests
    assert request["op"] == "prepare" and request["tokendir"] == str(scratch / ".jobtoken")
    assert not request.get("scopes") and not request.get("job"), "identity is the broker's"
    env = dict(parse_environment_v2(result.environment or ""))
    assert env == {"FOO": "bar", "BEARER_TOKEN_FILE": str(scratch / ".jobtoken/bt"),
                   "JOBTOKEN_DIR": str(scratch / ".jobtoken"), "JOBTOKEN_BROKER_SOCKET": str(sock)}
    info = os.stat(scratch / ".jobtoken")
    assert (info.st_mode & 0o777, sorted(os.listdir(scratch / ".jobtoken"))) == (0o700, [])


def test_a_docker_job_is_served_by_the_broker_and_an_apptainer_job_still_held(
    scratch: Path, tmp_path: Path
) -> None:
    """Docker jobs need no job wrapper when the broker renews; apptainer paths still differ."""
    from jobtoken._brokerproto import BrokerReply
    from jobtoken._config import Config
    from jobtoken.integrations.condor import HookOptions, run_prepare_hook

    sock = tmp_path / "b.sock"
    stub = StubBroker(sock, [BrokerReply(True, 0, "prepared", expires_at=2e9, job_id="j",
                                         bearer_token_file=str(scratch / ".jobtoken/bt"))])
    options = HookOptions(broker_socket=str(sock))
    env = {"_CONDOR_SCRATCH_DIR": str(scratch)}
    try:
        docker = run_prepare_hook(Config(), hook_ad(WantDocker=True, DockerImage="alpine"),
                                  env=env, options=options)
        apptainer = run_prepare_hook(Config(), hook_ad(ContainerImage="x.sif"), env=env,
                                     options=options)
    finally:
        stub.close()
    assert docker.status_code == 0, docker.message
    assert [r["op"] for r in stub.requests] == ["prepare"], "the apptainer job never asked"
    assert apptainer.status_code == 78 and "not supported" in (apptainer.message or "")


def test_an_unreachable_broker_requeues_the_job(scratch: Path, tmp_path: Path) -> None:
    from jobtoken._config import Config
    from jobtoken.integrations.condor import HookOptions, run_prepare_hook

    result = run_prepare_hook(Config(), hook_ad(), env={"_CONDOR_SCRATCH_DIR": str(scratch)},
                              options=HookOptions(broker_socket=str(tmp_path / "none.sock")))
    assert result.status_code == 375, result.message
    assert "broker" in (result.message or "")


def test_a_broker_refusal_holds_the_job_with_its_code(scratch: Path, tmp_path: Path) -> None:
    from jobtoken._brokerproto import BrokerReply
    from jobtoken._config import Config
    from jobtoken.integrations.condor import HookOptions, run_prepare_hook

    sock = tmp_path / "b.sock"
    stub = StubBroker(sock, [BrokerReply(False, 67, "not an HTCondor job that asked")])
    try:
        result = run_prepare_hook(Config(), hook_ad(), env={"_CONDOR_SCRATCH_DIR": str(scratch)},
                                  options=HookOptions(broker_socket=str(sock)))
    finally:
        stub.close()
    assert result.status_code == 67 and "not an HTCondor job" in (result.message or "")


def test_the_exit_hook_publishes_status_releases_and_removes_the_token(
    scratch: Path, tmp_path: Path
) -> None:
    from jobtoken._brokerproto import BrokerReply
    from jobtoken.integrations.condor import run_exit_hook

    (scratch / ".jobtoken").mkdir(mode=0o700)
    (scratch / ".jobtoken" / "bt").write_text("token")
    sock = tmp_path / "b.sock"
    status = BrokerReply(True, 0, "active", expires_at=1.9e9,
                         detail={"phase": "active", "renewals": 4,
                                 "consecutive_failures": 0})
    stub = StubBroker(sock, [status, BrokerReply(True, 0, "released")])
    sent: Dict[str, str] = {}

    class Chirp:
        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def set_job_attr_delayed(self, name: str, value: str) -> None:
            sent[name] = value

    try:
        assert run_exit_hook({"_CONDOR_SCRATCH_DIR": str(scratch)}, broker=str(sock),
                             chirp_factory=Chirp)
    finally:
        stub.close()
    assert [r["op"] for r in stub.requests] == ["status", "release"]
    assert sent == {"ChirpJobtokenRenewals": "4", "ChirpJobtokenFailures": "0",
                    "ChirpJobtokenExpiry": "1900000000"}
    assert not (scratch / ".jobtoken" / "bt").exists()


def test_the_exit_hook_without_a_broker_still_removes_the_token(scratch: Path,
                                                                tmp_path: Path) -> None:
    from jobtoken.integrations.condor import run_exit_hook

    (scratch / ".jobtoken").mkdir(mode=0o700)
    (scratch / ".jobtoken" / "bt").write_text("token")
    assert not run_exit_hook({"_CONDOR_SCRATCH_DIR": str(scratch)},
                             broker=str(tmp_path / "none.sock"), timeout_s=2.0)
    assert not (scratch / ".jobtoken" / "bt").exists()


def test_the_job_wrapper_starts_no_sidecar_for_a_broker_job(scratch: Path) -> None:
    from jobtoken.integrations.condor import run_job_wrapper

    (scratch / ".jobtoken").mkdir(mode=0o700)
    env = {"_CONDOR_SCRATCH_DIR": str(scratch), "JOBTOKEN_BROKER_SOCKET": "/run/x.sock",
           "BEARER_TOKEN_FILE": str(scratch / ".jobtoken" / "bt")}
    ran: list = []
    run_job_wrapper(["/bin/job", "a"], env, execute=lambda *a: ran.append(a))
    assert ran == [("/bin/job", ["/bin/job", "a"], env)]
    assert os.listdir(scratch / ".jobtoken") == []


def test_the_shipped_snippet_copies_every_attribute_the_resolver_reads() -> None:
    from jobtoken.integrations.condor_broker import STARTD_JOB_ATTRIBUTES

    from .conftest import CONDOR_DIR

    lines = (CONDOR_DIR / "config.d" / "60-jobtoken-broker.conf").read_text().splitlines()
    (line,) = [ln for ln in lines if ln.startswith("STARTD_JOB_ATTRS")]
    assert line.split("=", 1)[1].split()[1:] == list(STARTD_JOB_ATTRIBUTES)
    assert not any(a.lower().startswith("chirp") for a in STARTD_JOB_ATTRIBUTES)


# --- Chirp at the job's end, against the real broker -------------------------------------------


class _StarterLike:
    """Resolves every caller to one job while its anchor runs: what ``CondorJobs`` does
    from the startd, whose slot ad still describes the job while its exit hooks run."""

    def __init__(self, identity: Any) -> None:
        self.identity = identity

    def resolve(self, peer: PeerCred) -> Any:
        from jobtoken._brokeridentity import anchor_alive

        if not anchor_alive(self.identity.anchor):
            raise IdentityError("the starter has ended")
        return self.identity


class _ChirpRecord:
    """HTChirp's delayed updates as the starter keeps them: the last value set wins."""

    def __init__(self) -> None:
        self.attrs: Dict[str, str] = {}

    def __call__(self) -> Any:
        return self

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def set_job_attr_delayed(self, name: str, value: str) -> None:
        self.attrs[name] = value


def test_an_update_hook_after_the_exit_hooks_release_keeps_the_renewal_count(
    srv: Any, parent_file: Path, tmp_path: Path
) -> None:
    """HTCondor starts an update hook with the exit hook when the job exits; the update
    hook may ask after the release, when the broker has forgotten the job. What the exit
    hook published (the real count) must stay the job's last word, not become 0."""
    import subprocess
    import threading

    from jobtoken._broker import Broker
    from jobtoken._brokerclient import BrokerClient
    from jobtoken._brokeridentity import JobIdentity, anchor_of
    from jobtoken._config import load_config
    from jobtoken._errors import JobtokenError
    from jobtoken.integrations.condor import publish_broker_chirp, run_exit_hook

    from .conftest import toml_config

    config_file = toml_config(tmp_path / "jobtoken.toml", server=srv.url, parent=parent_file)
    sock, state = tmp_path / "run" / "broker.sock", tmp_path / "state"
    with open(config_file, "a", encoding="utf-8") as fh:
        fh.write(f'\n[broker]\nsocket = "{sock}"\nstate_dir = "{state}"\nreconcile_s = 1\n')
    starter = subprocess.Popen(["sleep", "600"])
    anchor = anchor_of(starter.pid)
    assert anchor is not None
    identity = JobIdentity(job_id="ap#7.0#1700000000", uid=os.getuid(), owner=None,
                           anchor=anchor, walltime_s=600.0)
    broker = Broker(load_config(str(config_file), env={}), resolver=_StarterLike(identity))
    broker.start()
    loop = threading.Thread(target=broker.serve_forever, daemon=True)
    loop.start()
    scratch = tmp_path / "dir_4242"
    (scratch / ".jobtoken").mkdir(parents=True, mode=0o700)
    try:
        client = BrokerClient(str(sock), timeout_s=60.0)
        client.prepare(str(scratch / ".jobtoken"))
        for _ in range(2):  # two renewals: asked for more than any token has left
            assert client.ensure(min_valid_s=1e6).detail["renewed"] is True
        chirp = _ChirpRecord()
        assert run_exit_hook({"_CONDOR_SCRATCH_DIR": str(scratch)}, broker=str(sock),
                             chirp_factory=chirp)
        assert chirp.attrs["ChirpJobtokenRenewals"] == "2", chirp.attrs
        deadline = time.monotonic() + 60
        while list((state / "jobs").iterdir()):  # revoked and forgotten
            assert time.monotonic() < deadline, list((state / "jobs").iterdir())
            time.sleep(0.05)
        # the update hook HTCondor started at the job's exit asks only now
        assert publish_broker_chirp(scratch / ".jobtoken", str(sock), chirp_factory=chirp) == {}
        assert chirp.attrs["ChirpJobtokenRenewals"] == "2", chirp.attrs
        # and asking made no record of a job the broker holds nothing for
        assert not list((state / "jobs").iterdir())
        with pytest.raises(JobtokenError, match="no token on this broker") as raised:
            client.status()
        assert raised.value.exit_code == 74
        assert client.release().message.endswith("nothing to release")
        assert not list((state / "jobs").iterdir())
    finally:
        broker.stop()
        loop.join(30)
        broker.close()
        starter.kill()
        starter.wait()


# --- a job in another PID namespace (HTCondor's USE_PID_NAMESPACES, apptainer, docker) -------


def test_a_caller_in_its_own_pid_namespace_is_found_under_its_starter(tmp_path: Path) -> None:
    """The kernel reports a caller's pid in the *broker's* PID namespace (``SO_PEERCRED``,
    translated when the broker asks), so the walk up /proc finds the starter as for any
    job: here real processes, the job pid 1 of a namespace its starter made."""
    import socket
    import subprocess

    from jobtoken._brokeridentity import anchor_of, peer_cred
    from tests.brokerhelpers import JOB_PYTHON, base_dir, require_root, spare_uids

    from .conftest import PAYLOADS

    require_root()
    (uid,) = spare_uids(1)
    for base in base_dir():  # 0755: the job's uid reaches the socket there
        path = str(base / "broker.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o666)
        listener.listen(1)
        listener.settimeout(60)
        tree = subprocess.Popen([JOB_PYTHON, str(PAYLOADS / "pidns_job.py"), "startd", path,
                                 str(uid)], stdin=subprocess.DEVNULL)
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(60)
                seen_inside = int(conn.makefile().readline())
                peer = peer_cred(conn)
                starter = read_process(peer.pid).ppid
                identity = CondorJobs(query=lambda slot: [slot_ad()]).resolve(peer)
                conn.sendall(b"x")
        finally:
            listener.close()
            assert tree.wait(timeout=60) == 0
    assert seen_inside == 1 and peer.pid != 1, "the job ran in its own PID namespace"
    assert peer.uid == uid
    assert identity.anchor.pid == starter and identity.uid == uid
    assert identity.job_id == GLOBAL_JOB_ID
    assert anchor_of(starter) is None, "the anchor was the starter, which has ended"
