"""The node broker on a real HTCondor pool: condor_master runs it, jobs get only tokens.

The pool has ``60-jobtoken-broker.conf`` as a site installs it (``jobtoken broker serve``
as a non-DaemonCore daemon in DAEMON_LIST, ``identity = "condor"``) and the site's robot
mytoken readable by root alone. Each test submits real jobs as the unprivileged test user
and checks what the site relies on: the payload reads a valid token, can read no mytoken
anywhere it can reach, cannot get a token for another job, a broker crash costs no token,
every job mytoken is revoked, and jobs that did not ask never meet the broker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set

import pytest

from jobtoken.devserver import DevServer

from ._pool import COMPLETED, RUNNING, Pool, PoolEnv, pool_root
from .conftest import AT_LIFETIME_S, require_pool, site_toml
from .test_site_robot import (
    CHECKPOINTER,
    child_ids,
    new_children,
    reader_files,
    result,
    stderr_of,
)

pytestmark = pytest.mark.slow

PAYLOADS = Path(__file__).parent / "payloads"
ASK = '+HookKeyword = "JOBTOKEN"'
BROKER_CONFIG = """
# --- the node broker, installed as a site would; this pool's socket and state ---
include : /usr/share/jobtoken/condor/config.d/60-jobtoken-broker.conf
JOBTOKEN_BROKER_SOCKET = $(LOCAL_DIR)/broker/broker.sock
JOBTOKEN_BROKER_STATE_DIR = $(LOCAL_DIR)/broker-state
"""
EXIT_IDENTITY = 67


def _site_files(devserver: DevServer, robot: str) -> Any:
    """The CA and the robot mytoken, in place before condor_master starts the broker; the
    robot is root's alone (0600): with a broker no job account needs to read it."""

    def write(pool: Pool) -> None:
        etc = pool.dir / "etc"
        shutil.copy(str(devserver.ca_file), etc / "ca.pem")
        (etc / "ca.pem").chmod(0o644)
        fd = os.open(etc / "robot.mytoken", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o600)
        try:
            os.write(fd, robot.encode())
        finally:
            os.close(fd)

    return write


@pytest.fixture(scope="module")
def bpool(devserver: DevServer, robot: str, jobtoken_package: Path) -> Iterator[Pool]:
    require_pool()
    started = time.monotonic()
    pool = Pool(PoolEnv(pool_root()), deb=jobtoken_package, jobtoken_toml="",
                before_master=_site_files(devserver, robot))
    pool.extra_config = BROKER_CONFIG
    pool.jobtoken_toml_text = site_toml(pool, devserver, extra='\n[broker]\nidentity = "condor"\n')
    with pool:
        pool.wait_for(lambda: broker_cli(pool, "ping").returncode == 0, 60,
                      "the node broker to answer", detail=lambda: broker_log(pool))
        print(f"\nbroker pool up in {time.monotonic() - started:.1f} s at {pool.dir}")
        yield pool


# --- helpers ---------------------------------------------------------------------------------


def socket_path(pool: Pool) -> str:
    return f"{pool.inner}/broker/broker.sock"


def broker_cli(pool: Pool, *args: str, user: Any = None) -> Any:
    return pool.condor([pool.jobtoken_bin, "broker", *args, "--socket", socket_path(pool)],
                       user=user, check=False)


def broker_log(pool: Pool) -> str:
    return pool.tail("JobtokenBrokerLog", 30)


def master_log(pool: Pool) -> str:
    """condor_master's log: it runs with -t, so its lines are in master.out."""
    try:
        return (pool.dir / "master.out").read_text(errors="replace")
    except OSError:
        return "(no master.out)"


def broker_pids(pool: Pool) -> List[int]:
    """The broker processes of this pool (there must be one)."""
    marker = socket_path(pool).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and marker in argv:
            pids.append(int(entry.name))
    return pids


def mytoken_hashes(devserver: DevServer, robot: str) -> Dict[str, str]:
    """sha256 prefixes (as the probe prints them) of the robot and every job mytoken."""
    store = devserver._store
    parent = store.by_mom_id(devserver.introspect(robot)["mom_id"])
    hashes = {hashlib.sha256(robot.encode()).hexdigest()[:16]: "robot"}
    for child in store.children(parent.id):
        hashes[hashlib.sha256(child.jwt.encode()).hexdigest()[:16]] = f"job mytoken {child.id}"
    return hashes


def submit(pool: Pool, name: str, script: str, *extra: str) -> Any:
    directory = pool.job_dir(name)
    files = reader_files()
    files["probe.py"] = (PAYLOADS / "broker_probe.py").read_text()
    files["job.sh"] = script
    text = "\n".join(["executable = job.sh", "output = out.txt", "error = err.txt",
                      "log = job.log", "should_transfer_files = YES",
                      "transfer_input_files = reader.py, probe.py",
                      "when_to_transfer_output = ON_EXIT", *extra, "queue", ""])
    return directory, pool.submit(directory, text, files)


def wait_minted(pool: Pool, devserver: DevServer, robot: str, before: Set[str],
                count: int = 1) -> List[Any]:
    holder: Dict[str, List[Any]] = {}

    def minted() -> bool:
        holder["m"] = new_children(devserver, robot, before)
        return len(holder["m"]) >= count

    pool.wait_for(minted, 120, f"{count} job mytoken(s)", detail=lambda: broker_log(pool))
    return holder["m"]


def wait_revoked(pool: Pool, devserver: DevServer, robot: str, before: Set[str]) -> None:
    pool.wait_for(lambda: all(c.revoked for c in new_children(devserver, robot, before)), 60,
                  "every job mytoken to be revoked", detail=lambda: broker_log(pool))


def sandbox_of(pool: Pool, cluster: int) -> Path:
    """The running job's sandbox (host path), found through its .job.ad."""
    found: Dict[str, Path] = {}

    def look() -> bool:
        for ad in (pool.dir / "execute").glob("dir_*/.job.ad"):
            try:
                text = ad.read_text()
            except OSError:
                continue
            if f"ClusterId = {cluster}\n" in text:
                found["dir"] = ad.parent
                return True
        return False

    pool.wait_for(look, 60, f"job {cluster}'s sandbox")
    return found["dir"]


# --- tests -----------------------------------------------------------------------------------


def test_a_job_gets_a_renewed_token_and_can_read_no_mytoken_on_the_node(
    bpool: Pool, devserver: DevServer, robot: str
) -> None:
    before = child_ids(devserver, robot)
    seconds = 2 * AT_LIFETIME_S + 5
    script = (
        "#!/bin/sh\n"
        "ls -A .jobtoken > tokendir.txt\n"
        "env > env.txt\n"
        f"/usr/bin/python3 probe.py scan {bpool.inner} /run /tmp /etc /home > scan.json\n"
        f"exec /usr/bin/python3 reader.py {seconds} 0\n"
    )
    directory, cluster = submit(bpool, "broker-a", script, ASK)
    ad = bpool.wait_done(cluster, timeout=seconds + 180)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 0), (ad, stderr_of(directory))
    out = result(directory)
    assert out["bad"] == 0 and out["tokens"] >= 2, out
    # only the access token in the sandbox: no mytoken, no job.json, no sidecar's state
    assert (directory / "tokendir.txt").read_text().split() == ["bt"]
    env = (directory / "env.txt").read_text()
    assert f"JOBTOKEN_BROKER_SOCKET={socket_path(bpool)}" in env
    assert "BEARER_TOKEN_FILE=" in env and "/.jobtoken/bt" in env
    # everything the job's uid can read: the pool (broker state, sandboxes, site files)...
    scan = json.loads((directory / "scan.json").read_text())
    assert scan["files"] > 100, scan["files"]
    assert any(p.endswith("/.jobtoken/bt") for p in scan["found"].values()), \
        "the scan reads what the job can: its own token"
    secrets = mytoken_hashes(devserver, robot)
    leaked = {secrets[h]: p for h, p in scan["found"].items() if h in secrets}
    assert leaked == {}, f"the job read mytokens: {leaked}"
    minted = new_children(devserver, robot, before)
    assert len(minted) == 1, "one job mytoken per job"
    wait_revoked(bpool, devserver, robot, before)
    # the broker is root's, its state root's alone
    pids = broker_pids(bpool)
    assert len(pids) == 1, pids
    assert os.stat(f"/proc/{pids[0]}").st_uid == 0
    state = os.stat(bpool.dir / "broker-state")
    assert (state.st_uid, state.st_mode & 0o777) == (0, 0o700)


KILLER = """#!/bin/sh
# a hostile payload: wait for the token, delete the token directory, kill every process
# of this pool's jobs it can (itself last), never reaching the exit code below
i=0; while [ ! -s .jobtoken/bt ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
rm -rf .jobtoken
/usr/bin/python3 - "$_CONDOR_SCRATCH_DIR" <<'EOF'
import os, signal, sys
execute = os.path.dirname(sys.argv[1])
me = os.getpid()
for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\\0")
    except OSError:
        continue
    if pid != me and any(e.startswith(b"_CONDOR_SCRATCH_DIR=" + execute.encode()) for e in env):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
os.kill(me, signal.SIGKILL)
EOF
exit 3
"""


def test_a_payload_that_kills_all_it_can_and_deletes_its_tokens_is_still_revoked(
    bpool: Pool, devserver: DevServer, robot: str
) -> None:
    before = child_ids(devserver, robot)
    directory, cluster = submit(bpool, "broker-b", KILLER, ASK)
    ad = bpool.wait_done(cluster, timeout=180)
    assert ad["JobStatus"] == COMPLETED and ad.get("ExitBySignal") is True, \
        (ad, stderr_of(directory))
    minted = new_children(devserver, robot, before)
    assert len(minted) == 1, minted
    wait_revoked(bpool, devserver, robot, before)
    assert broker_pids(bpool), "the broker survives its jobs"


def test_a_job_whose_starter_dies_without_an_exit_hook_is_revoked_by_the_broker(
    bpool: Pool, devserver: DevServer, robot: str
) -> None:
    """No exit hook, no release: the broker sees its anchor, the starter, end."""
    before = child_ids(devserver, robot)
    directory, cluster = submit(bpool, "broker-starter", "#!/bin/sh\nexec /usr/bin/python3 "
                                "reader.py 600 0\n", ASK)
    bpool.wait_job(cluster, lambda a: a["JobStatus"] == RUNNING, 120, "to run")
    (first,) = wait_minted(bpool, devserver, robot, before)
    starter = int(sandbox_of(bpool, cluster).name[len("dir_"):])
    assert Path(f"/proc/{starter}/comm").read_text().strip() == "condor_starter"
    exit_hooks = bpool.audit_log.read_text().count("exit-hook")
    os.kill(starter, signal.SIGKILL)
    killed_at = time.monotonic()
    bpool.wait_for(lambda: devserver._store.by_mom_id(first.mom_id).revoked, 60,
                   "the broker to revoke the job mytoken of the dead starter",
                   detail=lambda: broker_log(bpool))
    print(f"\njob mytoken revoked {time.monotonic() - killed_at:.1f} s after the starter died")
    assert bpool.audit_log.read_text().count("exit-hook") == exit_hooks, \
        "revoked by the broker itself, not by an exit hook"
    bpool.condor(["condor_rm", str(cluster)])
    bpool.wait_done(cluster, timeout=120)
    wait_revoked(bpool, devserver, robot, before)  # and the rerun's, if the job ran again


def test_the_broker_killed_mid_job_is_restarted_and_no_token_is_lost(
    bpool: Pool, devserver: DevServer, robot: str
) -> None:
    before = child_ids(devserver, robot)
    seconds = 3 * AT_LIFETIME_S + 5
    directory, cluster = submit(bpool, "broker-c", f"#!/bin/sh\nexec /usr/bin/python3 "
                                f"reader.py {seconds} 0\n", ASK)
    bpool.wait_job(cluster, lambda a: a["JobStatus"] == RUNNING, 120, "to run")
    wait_minted(bpool, devserver, robot, before)
    time.sleep(AT_LIFETIME_S / 2)  # mid-job, between renewals
    (old,) = broker_pids(bpool)
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    holder: Dict[str, float] = {}

    def restarted() -> bool:
        pids = [p for p in broker_pids(bpool) if p != old]
        if pids and broker_cli(bpool, "ping").returncode == 0:
            holder["gap"] = time.monotonic() - killed_at
            return True
        return False

    bpool.wait_for(restarted, 60, "condor_master to restart the broker",
                   detail=lambda: master_log(bpool)[-3000:])
    print(f"\nbroker back {holder['gap']:.1f} s after SIGKILL")
    ad = bpool.wait_done(cluster, timeout=seconds + 180)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 0), (ad, stderr_of(directory))
    out = result(directory)
    assert out["bad"] == 0, out
    assert out["tokens"] >= 3, "renewed after the restart too"
    minted = new_children(devserver, robot, before)
    assert len(minted) == 1, "the restarted broker kept the job mytoken, minted none anew"
    wait_revoked(bpool, devserver, robot, before)


def broker_job_state(pool: Pool, cluster: int) -> Dict[str, Any]:
    """The job's state.json in the broker's state directory ({} while there is none)."""
    for path in (pool.dir / "broker-state" / "jobs").glob("*/state.json"):
        try:
            state = dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        if f"#{cluster}.0#" in str(state.get("job_id")):
            return state
    return {}


def history_ad(pool: Pool, cluster: int) -> Dict[str, Any]:
    """The job's ad from condor_history (what stays once the job has left the queue)."""
    holder: Dict[str, Any] = {}

    def look() -> bool:
        out = pool.condor(["condor_history", "-json", "-limit", "1", str(cluster)],
                          check=False).stdout.strip()
        ads = json.loads(out) if out else []
        if ads:
            holder["ad"] = dict(ads[0])
        return bool(ads)

    pool.wait_for(look, 60, f"job {cluster} in the history")
    return holder["ad"]


def test_the_renewal_count_in_the_job_history_is_right_after_a_broker_restart(
    bpool: Pool, devserver: DevServer, robot: str
) -> None:
    """What an operator reads (`condor_history -af ChirpJobtokenRenewals`) is the number of
    renewals the job's token had, across a broker killed with SIGKILL mid-job."""
    before = child_ids(devserver, robot)
    seconds = 3 * AT_LIFETIME_S + 5
    directory, cluster = submit(bpool, "broker-chirp", f"#!/bin/sh\nexec /usr/bin/python3 "
                                f"reader.py {seconds} 0\n", ASK)
    bpool.wait_job(cluster, lambda a: a["JobStatus"] == RUNNING, 120, "to run")
    (job_mytoken,) = wait_minted(bpool, devserver, robot, before)
    # killed between renewals, none in flight: once one is recorded and the next is > 3 s off
    def between_renewals() -> bool:
        state = broker_job_state(bpool, cluster)
        return state.get("renewals", 0) >= 1 \
            and (state.get("next_attempt_at") or 0) > time.time() + 3

    bpool.wait_for(between_renewals, 2 * AT_LIFETIME_S + 30, "a first renewal",
                   detail=lambda: broker_log(bpool))
    (old,) = broker_pids(bpool)
    os.kill(old, signal.SIGKILL)
    bpool.wait_for(lambda: [p for p in broker_pids(bpool) if p != old] != []
                   and broker_cli(bpool, "ping").returncode == 0, 60,
                   "condor_master to restart the broker", detail=lambda: master_log(bpool)[-3000:])
    bpool.wait_done(cluster, timeout=seconds + 180)
    ad = history_ad(bpool, cluster)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 0), (ad, stderr_of(directory))
    out = result(directory)
    assert out["bad"] == 0 and out["tokens"] >= 3, out
    wait_revoked(bpool, devserver, robot, before)
    store = devserver._store
    issued = sum(store.at_used(job_mytoken, r) for r in job_mytoken.restrictions)
    # every access token after the first (at prepare) is a renewal
    assert ad.get("ChirpJobtokenRenewals") == issued - 1 >= 2, (issued, ad)
    assert ad.get("ChirpJobtokenFailures") == 0, ad
    # the expiry published is the job's last token's (or one renewed after its last read)
    assert out["last_exp"] <= ad.get("ChirpJobtokenExpiry", 0) <= out["last_exp"] \
        + AT_LIFETIME_S, (out, ad)


def test_a_self_checkpointing_job_keeps_its_token_across_restarts_and_is_revoked_at_its_end(
    bpool: Pool, devserver: DevServer, robot: str
) -> None:
    """The starter restarts a job that exits with its checkpoint_exit_code without the
    prepare or the exit hook; the broker's anchor, the starter, lives on meanwhile."""
    before = child_ids(devserver, robot)
    directory, cluster = submit(bpool, "broker-checkpoint", CHECKPOINTER, ASK,
                                "checkpoint_exit_code = 85",
                                "transfer_output_files = reads.jsonl, runs")
    ad = bpool.wait_done(cluster, timeout=240)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 0), (ad, stderr_of(directory))
    assert (directory / "runs").read_text().strip() == "3"
    runs = [json.loads(line) for line in (directory / "reads.jsonl").read_text().splitlines()]
    assert [r["bad"] for r in runs] == [0, 0, 0], runs
    # three runs of 12 s outlive a 20 s token: renewed while the job restarted
    assert len({r["last_exp"] for r in runs}) >= 2, runs
    minted = new_children(devserver, robot, before)
    assert len(minted) == 1, "one job mytoken for every run"
    wait_revoked(bpool, devserver, robot, before)


def test_condor_reconfig_leaves_the_broker_running(bpool: Pool) -> None:
    """A reconfig of condor_master sends a daemon outside DaemonCore SIGHUP
    (``daemon::Reconfig``): the broker stays (no restart, no gap) and keeps its log."""
    (pid,) = broker_pids(bpool)
    log = bpool.dir / "log" / "JobtokenBrokerLog"
    starts = log.read_text().count("broker listening")
    # a value the master advertises once it has read the changed configuration: its
    # main_config sends every daemon SIGHUP before it updates the collector
    mark = uuid.uuid4().hex[:12]
    with open(bpool.dir / "condor_config", "a", encoding="utf-8") as fh:
        fh.write(f'\nJOBTOKEN_TEST_RECONFIG = "{mark}"\n'
                 "MASTER_ATTRS = $(MASTER_ATTRS) JOBTOKEN_TEST_RECONFIG\n")
    # what condor_reconfig asks for (this pool gives its tools no ADMINISTRATOR
    # authentication): DaemonCore's SIGHUP handler re-reads the configuration and runs
    # the master's main_config
    assert bpool.master is not None
    os.kill(bpool.master.pid, signal.SIGHUP)
    bpool.wait_for(lambda: mark in bpool.condor(
        ["condor_status", "-master", "-af", "JOBTOKEN_TEST_RECONFIG"], check=False).stdout,
        60, "condor_master to reconfigure", detail=lambda: master_log(bpool)[-3000:])
    # the broker's SIGHUP was sent before the ping connects: a broker it ended could not
    # answer, and a restarted one would be another process with another start line
    assert broker_cli(bpool, "ping").returncode == 0, broker_log(bpool)
    assert broker_pids(bpool) == [pid]
    assert log.read_text().count("broker listening") == starts, broker_log(bpool)


def test_a_job_cannot_get_a_token_for_another_jobs_directory(
    bpool: Pool, devserver: DevServer, robot: str
) -> None:
    before = child_ids(devserver, robot)
    victim_dir, victim = submit(bpool, "broker-victim", "#!/bin/sh\nexec /usr/bin/python3 "
                                f"reader.py {2 * AT_LIFETIME_S} 0\n", ASK)
    bpool.wait_job(victim, lambda a: a["JobStatus"] == RUNNING, 120, "to run")
    sandbox = bpool.env.inner_path(sandbox_of(bpool, victim))
    wait_minted(bpool, devserver, robot, before)
    targets = [f"{sandbox}/.jobtoken", sandbox]
    lie = (f"#!/bin/sh\nexec /usr/bin/python3 probe.py lie {bpool.jobtoken_bin} "
           f"{socket_path(bpool)} {' '.join(targets)}\n")
    # a job that asked (prepared with its own directory) and one that did not
    liar_dir, liar = submit(bpool, "broker-liar", lie, ASK)
    plain_dir, plain = submit(bpool, "broker-plain-liar", lie)
    # a process of the same user that is not under any starter
    outside = broker_cli(bpool, "prepare", "--dir", targets[0], user=bpool.user)
    assert outside.returncode == EXIT_IDENTITY, outside.stderr
    assert "condor_starter" in outside.stderr
    for directory, cluster in ((liar_dir, liar), (plain_dir, plain)):
        ad = bpool.wait_done(cluster, timeout=180)
        assert ad["JobStatus"] == COMPLETED, (ad, stderr_of(directory))
        codes = json.loads((directory / "out.txt").read_text())["codes"]
        assert set(codes) == set(targets)
        assert all(code == EXIT_IDENTITY for code, _ in codes.values()), codes
    assert "did not ask" in json.dumps(
        json.loads((plain_dir / "out.txt").read_text())["codes"])
    ad = bpool.wait_done(victim, timeout=2 * AT_LIFETIME_S + 120)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 0), (ad, stderr_of(victim_dir))
    assert result(victim_dir)["bad"] == 0
    # the victim and the liar that asked each got one job mytoken; the plain job none
    assert len(new_children(devserver, robot, before)) == 2
    wait_revoked(bpool, devserver, robot, before)


def test_the_broker_never_follows_a_symlink_the_job_puts_in_place_of_its_directory(
    bpool: Pool, devserver: DevServer, robot: str
) -> None:
    """The payload swaps ``.jobtoken`` for a link to a root-owned directory; the broker's
    next renewal must write nothing there (it opens the path with O_NOFOLLOW, as root)."""
    before = child_ids(devserver, robot)
    target = bpool.dir / "etc"
    listing = sorted(os.listdir(target))
    swap = (
        "#!/bin/sh\n"
        "i=0; while [ ! -s .jobtoken/bt ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n"
        f"mv .jobtoken .old && ln -s {bpool.etc} .jobtoken || exit 9\n"
        f"sleep {2 * AT_LIFETIME_S}\n"
    )
    directory, cluster = submit(bpool, "broker-symlink", swap, ASK)
    bpool.wait_job(cluster, lambda a: a["JobStatus"] == RUNNING, 120, "to run")
    wait_minted(bpool, devserver, robot, before)
    job_id = bpool.job_ad(cluster)["GlobalJobId"]  # type: ignore[index]
    refused = f"job {job_id}: cannot use token directory "
    bpool.wait_for(lambda: refused in broker_log(bpool), 2 * AT_LIFETIME_S + 30,
                   "the broker to refuse the swapped token directory",
                   detail=lambda: broker_log(bpool))
    assert sorted(os.listdir(target)) == listing, "nothing written through the link"
    ad = bpool.wait_done(cluster, timeout=2 * AT_LIFETIME_S + 120)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 0), (ad, stderr_of(directory))
    assert sorted(os.listdir(target)) == listing
    wait_revoked(bpool, devserver, robot, before)


def test_a_job_that_does_not_ask_never_meets_the_broker(
    bpool: Pool, devserver: DevServer, robot: str
) -> None:
    before = child_ids(devserver, robot)
    jobs_before = sorted(os.listdir(bpool.dir / "broker-state" / "jobs"))
    probe = (
        "#!/bin/sh\n"
        'test -z "${BEARER_TOKEN_FILE:-}" || { echo "has BEARER_TOKEN_FILE"; exit 90; }\n'
        'test -z "${JOBTOKEN_BROKER_SOCKET:-}" || { echo "has the broker socket"; exit 91; }\n'
        'test ! -e .jobtoken || { echo "has a token directory"; exit 92; }\n'
        "exit 5\n"
    )
    directory, cluster = submit(bpool, "broker-plain", probe)
    ad = bpool.wait_done(cluster, timeout=120)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 5), (ad, stderr_of(directory))
    assert ad["NumJobStarts"] == 1
    assert new_children(devserver, robot, before) == []
    assert sorted(os.listdir(bpool.dir / "broker-state" / "jobs")) == jobs_before
