"""jobtoken in a real HTCondor pool, with the site's robot mytoken on the execute point.

Every test submits real jobs as the unprivileged test user and checks what a user or a
site admin relies on: the payload always reads a valid token, exit codes pass through, job
mytokens are revoked, and jobs that did not ask are untouched.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

from jobtoken.devserver import DevServer

from ._pool import COMPLETED, HELD, IDLE, REMOVED, RUNNING, Pool
from .conftest import AT_LIFETIME_S, site_toml

pytestmark = pytest.mark.slow

PAYLOADS = Path(__file__).parent / "payloads"
ASK = '+HookKeyword = "JOBTOKEN"'


def job_children(devserver: DevServer, robot: str) -> List[Any]:
    """The job mytokens minted from the robot (revoked ones included)."""
    store = devserver._store
    record = store.by_mom_id(devserver.introspect(robot)["mom_id"])
    return list(store.children(record.id))


def child_ids(devserver: DevServer, robot: str) -> Set[str]:
    return {c.id for c in job_children(devserver, robot)}


def new_children(devserver: DevServer, robot: str, before: Set[str]) -> List[Any]:
    return [c for c in job_children(devserver, robot) if c.id not in before]


def reader_files() -> Dict[str, str]:
    return {"reader.py": (PAYLOADS / "reader.py").read_text()}


def submit_text(seconds: float, code: int, *extra: str) -> str:
    lines = "\n".join(extra)
    return f"""\
executable = reader.py
arguments = {seconds} {code}
output = out.txt
error = err.txt
log = job.log
should_transfer_files = YES
when_to_transfer_output = ON_EXIT
{lines}
queue
"""


def stderr_of(directory: Path) -> str:
    try:
        return (directory / "err.txt").read_text()[-2000:]
    except OSError:
        return "(no err.txt)"


def result(directory: Path) -> Dict[str, Any]:
    lines = (directory / "out.txt").read_text().strip().splitlines()
    assert lines, (directory / "err.txt").read_text()
    return dict(json.loads(lines[-1]))


def test_site_robot_job_reads_a_fresh_token_over_three_lifetimes(
    site: Pool, devserver: DevServer, robot: str
) -> None:
    before = child_ids(devserver, robot)
    directory = site.job_dir("robot3")
    seconds = 3 * AT_LIFETIME_S + 5
    # the job's environment must not steer jobtoken (the wrapper runs with it)
    env = 'environment = "JOBTOKEN_BIN=/bin/true JOBTOKEN_SERVER=http://127.0.0.1:9 PYTHONPATH=/x"'
    cluster = site.submit(directory, submit_text(seconds, 7, ASK, env), reader_files())
    ad = site.wait_done(cluster, timeout=seconds + 120)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 7), (ad, stderr_of(directory))
    out = result(directory)
    assert out["bad"] == 0, out
    assert out["reads"] >= seconds - 2, out
    assert out["tokens"] >= 3, out
    minted = new_children(devserver, robot, before)
    assert len(minted) == 1, "one job mytoken per job"
    assert minted[0].revoked, "the job mytoken is revoked when the job ends"
    # Chirp with the pool's own 23.x bindings: the status is in the job's history
    assert ad.get("ChirpJobtokenRenewals", 0) >= 2, ad
    assert ad.get("ChirpJobtokenCredentialLost") is False, ad
    # the audit trail is where the site admin looks (JOBTOKEN_AUDIT_LOG/<user>.log)
    audit = site.audit_log.read_text()
    assert f"mom_id={minted[0].mom_id}" in audit
    assert "prepare-hook" in audit and "exit-hook" in audit
    assert "revoked=True" in audit
    # the update hook reads its ad to the end: no failed writes in the StarterLog
    assert "errno = 32" not in site.starter_logs()


def test_jobs_that_do_not_ask_are_untouched_server_up_or_down(
    site: Pool, devserver: DevServer, robot: str
) -> None:
    """Plain jobs: no token, no job mytoken, no sidecar, server up or down; a job that
    asks while the server is down is requeued and completes once it is back."""
    before = child_ids(devserver, robot)
    # the EP tells jobs it has jobtoken
    assert site.condor(["condor_status", "-af", "HasJobtoken"]).stdout.split()[0] == "true"
    probe = (
        "#!/bin/sh\n"
        'test -z "${BEARER_TOKEN_FILE:-}" || { echo "has BEARER_TOKEN_FILE"; exit 90; }\n'
        'test ! -e .jobtoken || { echo "has a token directory"; exit 91; }\n'
        "exit 5\n"
    )
    plain_up = site.job_dir("plain-up")
    cluster_up = site.submit(plain_up, submit_text(0, 0).replace("reader.py", "probe.sh"),
                             {"probe.sh": probe})
    ad = site.wait_done(cluster_up, timeout=120)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 5), ad
    assert ad["NumJobStarts"] == 1
    for endpoint in ("discovery", "access", "my", "revoke"):
        devserver.faults.add(endpoint, status=503)
    plain_down = site.job_dir("plain-down")
    cluster_down = site.submit(plain_down, submit_text(0, 0).replace("reader.py", "probe.sh"),
                               {"probe.sh": probe})
    asking = site.job_dir("asking-down")
    cluster_ask = site.submit(asking, submit_text(AT_LIFETIME_S, 0, ASK), reader_files())
    ad = site.wait_done(cluster_down, timeout=120)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 5), ad
    assert ad["NumJobStarts"] == 1
    assert new_children(devserver, robot, before) == []
    # the asking job is sent back to idle by the prepare hook (3xx), again and again
    site.wait_job(cluster_ask, lambda a: a.get("NumShadowStarts", 0) >= 2
                  and a["JobStatus"] in (IDLE, RUNNING), 120, "to be requeued twice")
    devserver.faults.clear()
    ad = site.wait_done(cluster_ask, timeout=AT_LIFETIME_S + 120)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 0), ad
    assert result(asking)["bad"] == 0


CHECKPOINTER = """\
#!/bin/sh
# runs 3 times: exits 85 (checkpoint) twice, then 0; reads the token every second
n=$(cat runs 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > runs
/usr/bin/python3 reader.py 12 0 >> reads.jsonl
if [ "$n" -lt 3 ]; then exit 85; fi
exit 0
"""


def test_self_checkpointing_job_keeps_a_valid_token_across_restarts(
    site: Pool, devserver: DevServer, robot: str
) -> None:
    before = child_ids(devserver, robot)
    directory = site.job_dir("checkpoint")
    text = submit_text(0, 0, ASK, "checkpoint_exit_code = 85",
                       "transfer_input_files = reader.py",
                       "transfer_output_files = reads.jsonl, runs")
    cluster = site.submit(directory, text.replace("executable = reader.py",
                                                  "executable = ckpt.sh"),
                          {"ckpt.sh": CHECKPOINTER, **reader_files()})
    ad = site.wait_done(cluster, timeout=180)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 0), (
        ad.get("SuccessCheckpointExitCode"), stderr_of(directory), site.audit_log.read_text())
    assert (directory / "runs").read_text().strip() == "3"
    runs = [json.loads(line) for line in (directory / "reads.jsonl").read_text().splitlines()]
    assert len(runs) == 3
    assert [r["bad"] for r in runs] == [0, 0, 0], runs
    minted = new_children(devserver, robot, before)
    assert len(minted) == 1 and minted[0].revoked, "one job mytoken, revoked at the job's end"


def _exp_budget(child: Any) -> float:
    return float(child.restrictions[0].exp) - float(child.created_at)


def test_wall_time_comes_from_htcondor_limits_capped_by_the_site(
    site: Pool, devserver: DevServer, robot: str
) -> None:
    slack = 60.0
    cases = {
        "allowed-job": ("allowed_job_duration = 400", 400.0),
        "allowed-exec": ("allowed_job_duration = 900\nallowed_execute_duration = 300", 300.0),
        "convention": ("+MaxWallTimeMins = 5", 300.0),
        "over-max": ("allowed_job_duration = 100000", 1000.0),  # site max below
    }
    site.set_jobtoken_toml(site_toml(site, devserver, site={"max_walltime_s": 1000.0}))
    before = child_ids(devserver, robot)
    clusters = {
        name: site.submit(site.job_dir(f"walltime-{name}"), submit_text(1, 0, ASK, line),
                          reader_files())
        for name, (line, _) in cases.items()
    }
    minted = {}
    for name, cluster in clusters.items():
        ad = site.wait_done(cluster, timeout=120)
        assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 0), (name, ad)
        # the job mytoken's name carries the GlobalJobId (schedd#cluster.proc#time)
        (minted[name],) = [c for c in new_children(devserver, robot, before)
                           if f"#{cluster}.0#" in c.name]
    for name, child in minted.items():
        expected = cases[name][1] + slack
        assert abs(_exp_budget(child) - expected) < 15, (name, _exp_budget(child), expected)


def test_a_budget_that_cannot_last_holds_the_job_at_prepare(
    site: Pool, devserver: DevServer, robot: str
) -> None:
    before = child_ids(devserver, robot)
    # the site believes tokens live 20 minutes; the issuer hands out 20 s ones
    site.set_jobtoken_toml(site_toml(site, devserver, site={"expected_at_lifetime_s": 1200.0}))
    directory = site.job_dir("budget")
    cluster = site.submit(directory, submit_text(5, 0, ASK, "allowed_job_duration = 600"),
                          reader_files())
    ad = site.wait_job(cluster, lambda a: a["JobStatus"] == HELD, 120, "to be held")
    assert "usages_AT" in ad.get("HoldReason", ""), ad
    assert "expected_at_lifetime_s" in ad["HoldReason"]
    minted = new_children(devserver, robot, before)
    assert minted and all(c.revoked for c in minted), "the unusable job mytoken is revoked"
    site.condor(["condor_rm", str(cluster)])
    site.wait_done(cluster, timeout=60)


@pytest.mark.parametrize("tool", ["condor_rm", "condor_hold"])
def test_remove_and_hold_revoke_the_job_mytoken(
    site: Pool, devserver: DevServer, robot: str, tool: str
) -> None:
    before = child_ids(devserver, robot)
    directory = site.job_dir(f"stop-{tool}")
    cluster = site.submit(directory, submit_text(600, 0, ASK), reader_files())
    site.wait_job(cluster, lambda a: a["JobStatus"] == RUNNING, 120, "to run")
    deadline = time.monotonic() + 60
    while not new_children(devserver, robot, before):
        assert time.monotonic() < deadline, "no job mytoken minted"
        time.sleep(0.2)
    site.condor([tool, str(cluster)])
    want = REMOVED if tool == "condor_rm" else HELD
    site.wait_job(cluster, lambda a: a["JobStatus"] == want, 120, f"to be {tool} done")
    site.wait_for(lambda: all(c.revoked for c in new_children(devserver, robot, before)), 60,
                  "the job mytoken to be revoked")
    # HTCondor 23.9 runs JOB_EXIT with "evict" for condor_rm and condor_hold alike
    site.wait_for(lambda: "exit-hook:evict" in site.audit_log.read_text(), 60,
                  "the exit hook's audit line")
    if tool == "condor_hold":
        site.condor(["condor_rm", str(cluster)])
        site.wait_done(cluster, timeout=60)


def test_include_command_path_sends_the_users_own_mytoken_with_the_job(
    site: Pool, devserver: DevServer
) -> None:
    """A user with their own mytoken: `include command : jobtoken condor submit` on the AP,
    the per-submission mytoken transferred encrypted, the job mytoken minted from it."""
    user_mytoken = devserver.issue_mytoken(capabilities=["AT", "create_mytoken", "tokeninfo"],
                                           name="user's own")
    directory = site.job_dir("include")
    account = site.env.account(site.user)
    mytoken_file = directory / "my.mytoken"
    mytoken_file.write_text(user_mytoken)
    mytoken_file.chmod(0o600)
    os.chown(mytoken_file, account.uid, account.gid)
    inner = site.env.inner_path(directory)
    include = (
        f"include command : {site.jobtoken_bin} condor submit --mytoken-file {inner}/my.mytoken"
        f" --server {devserver.url} --ca-file {site.etc}/ca.pem"
        f" --scope storage.create:/dteam --lifetime 3600 --out-dir {inner}/state"
    )
    probe = ("#!/bin/sh\n"
             "test ! -e jobtoken_submission.mytoken || { echo 'mytoken left'; exit 92; }\n"
             f"exec /usr/bin/python3 reader.py {2 * AT_LIFETIME_S} 3\n")
    text = submit_text(0, 0, "allowed_job_duration = 600", "transfer_input_files = reader.py",
                       "requirements = TARGET.HasJobtoken =?= true", include)
    text = text.replace("executable = reader.py", "executable = probe.sh")
    cluster = site.submit(directory, text, {"probe.sh": probe, **reader_files()})
    ad = site.wait_done(cluster, timeout=2 * AT_LIFETIME_S + 120)
    assert (ad["JobStatus"], ad["ExitCode"]) == (COMPLETED, 3), (ad, stderr_of(directory))
    out = result(directory)
    assert out["bad"] == 0 and out["tokens"] >= 2, out
    store = devserver._store
    (submission,) = store.children(store.by_mom_id(devserver.introspect(user_mytoken)
                                                   ["mom_id"]).id)
    (job_mytoken,) = store.children(submission.id)
    assert job_mytoken.revoked
    assert ad["HookKeyword"] == "JOBTOKEN"


def test_the_pool_runs_the_installed_package(site: Pool, jobtoken_package: Path) -> None:
    """What these tests prove, they prove of the Debian package: the pool's hooks and job
    wrapper are the package's files, and the package is the one built from this tree."""
    from tests.debpackages import deb_version

    knobs = ("JOBTOKEN_HOOK_PREPARE_JOB", "JOBTOKEN_HOOK_UPDATE_JOB_INFO",
             "JOBTOKEN_HOOK_JOB_EXIT", "USER_JOB_WRAPPER")
    for knob in knobs:
        path = site.condor(["condor_config_val", knob]).stdout.strip()
        assert path.startswith("/usr/libexec/jobtoken/jobtoken-"), (knob, path)
        owner = site.env.run(["dpkg-query", "-S", path], check=False)
        assert owner.stdout.startswith("jobtoken: "), (path, owner)
    version = site.env.run(["dpkg-query", "-W", "-f=${Version}", "jobtoken"]).stdout
    assert version == deb_version(jobtoken_package)
