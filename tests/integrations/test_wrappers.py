"""The shell wrappers, run as their callers run them, with real payloads.

``condor/jobtoken-job-wrapper`` is run as the starter runs ``USER_JOB_WRAPPER`` (wrapper
path + the job's argv, cwd = scratch, ``_CONDOR_WRAPPER_ERROR_FILE`` set) over a token
directory the prepare step laid out; ``wrappers/jobtoken-wrap`` as a pilot would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from jobtoken._config import Config, ServerConfig, SiteConfig, TokenConfig
from jobtoken._prepare import JobFacts, prepare_job
from jobtoken._run import sidecar_alive
from jobtoken._tokendir import TokenDir
from jobtoken.devserver import DevServer

from .conftest import (
    AUDIENCE,
    PAYLOADS,
    WRAPPERS_DIR,
    base_env,
    closed_port_url,
    condor_script,
    job_ad_text,
)

PILOT_WRAP = str(WRAPPERS_DIR / "jobtoken-wrap")
EXIT_WITH = [sys.executable, str(PAYLOADS / "exit_with.py")]


def site_config(srv_url: str, parent: Path) -> Config:
    return Config(
        server=ServerConfig(url=srv_url, allow_http=True, timeout_s=5.0),
        token=TokenConfig(audiences=(AUDIENCE,)),
        site=SiteConfig(
            parent_mytoken_file=str(parent),
            vo="dteam",
            allowed_audiences=(AUDIENCE,),
            default_walltime_s=3600.0,
        ),
    )


def wait_sidecar_gone(directory: Path, timeout_s: float = 30.0) -> None:
    tokendir = TokenDir(directory)
    deadline = time.monotonic() + timeout_s
    while sidecar_alive(tokendir):
        assert time.monotonic() < deadline, "sidecar still running"
        time.sleep(0.05)


@pytest.fixture
def sandbox(srv: DevServer, parent_file: Path, tmp_path: Path) -> Dict[str, Path]:
    """An HTCondor-like job sandbox after the prepare hook ran."""
    outer = tmp_path / "dir_77"
    scratch = outer  # vanilla universe: scratch = outer sandbox
    scratch.mkdir(mode=0o700)
    tokendir = scratch / ".jobtoken"
    prepare_job(
        site_config(srv.url, parent_file),
        JobFacts("ap#1.0#2", walltime_s=600),
        directory=str(tokendir),
    )
    asked_for_token(scratch)
    return {"scratch": scratch, "tokendir": tokendir, "failure": outer / ".job_wrapper_failure"}


def asked_for_token(scratch: Path) -> None:
    """The starter's copy of a job ad that asked (HookKeyword JOBTOKEN)."""
    (scratch / ".job.ad").write_text(
        job_ad_text(GlobalJobId="ap#1.0#2", HookKeyword="JOBTOKEN", Cmd="/bin/true")
    )


def run_as_starter(sandbox: Dict[str, Path], argv: List[str]) -> subprocess.CompletedProcess:
    env = base_env(
        _CONDOR_SCRATCH_DIR=str(sandbox["scratch"]),
        _CONDOR_WRAPPER_ERROR_FILE=str(sandbox["failure"]),
        _CONDOR_JOB_AD=str(sandbox["scratch"] / ".job.ad"),
        BEARER_TOKEN="stale-token-from-the-job-environment",
    )
    return subprocess.run(
        [condor_script("jobtoken-job-wrapper"), *argv],
        cwd=sandbox["scratch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def payload_checking_token(code: int) -> List[str]:
    """A real payload that fails (99) unless it got the token the way WLCG tools look for it."""
    return [
        "/bin/sh",
        "-c",
        'test -s "$BEARER_TOKEN_FILE" && test -z "${BEARER_TOKEN:-}" && '
        f'test -d "$JOBTOKEN_DIR" || exit 99; exit {code}',
    ]


@pytest.mark.parametrize("code", [0, 1, 255])
def test_condor_wrapper_passes_exit_code_and_leaves_no_failure_file(
    sandbox: Dict[str, Path], code: int
) -> None:
    proc = run_as_starter(sandbox, payload_checking_token(code))
    assert proc.returncode == code, proc.stderr
    assert not sandbox["failure"].exists()
    wait_sidecar_gone(sandbox["tokendir"])
    # the sidecar watched the job's pid and finished: job mytoken revoked and deleted
    assert not (sandbox["tokendir"] / "mytoken").exists()


def test_condor_wrapper_death_by_term_is_seen_by_the_starter(sandbox: Dict[str, Path]) -> None:
    proc = run_as_starter(sandbox, [*EXIT_WITH, "signal", "15"])
    assert proc.returncode == -15  # the wrapper exec'd: the job itself died by TERM
    assert not sandbox["failure"].exists()
    wait_sidecar_gone(sandbox["tokendir"])


def test_condor_wrapper_without_token_dir_just_execs(tmp_path: Path) -> None:
    box = {
        "scratch": tmp_path,
        "tokendir": tmp_path / ".jobtoken",
        "failure": tmp_path / ".job_wrapper_failure",
    }
    proc = run_as_starter(box, [*EXIT_WITH, "code", "3"])
    assert proc.returncode == 3 and not box["failure"].exists()


def test_condor_wrapper_reports_sidecar_start_failure(sandbox: Dict[str, Path]) -> None:
    tokendir = sandbox["tokendir"]
    (tokendir / "bt").unlink()  # no token, and the server is gone: no first token
    spec = json.loads((tokendir / "job.json").read_text())
    spec["server_url"] = closed_port_url()
    spec["timeout_s"] = 1.0
    (tokendir / "job.json").write_text(json.dumps(spec))
    proc = run_as_starter(sandbox, [*EXIT_WITH, "code", "0"])
    assert proc.returncode != 0
    text = sandbox["failure"].read_text()
    assert "could not start the token renewal sidecar" in text
    assert "mytoken" not in text.split(":", 1)[0]


# --- the pilot wrapper --------------------------------------------------------------------


def pilot_env(srv_url: str, parent: Path, work: Path, **extra: str) -> Dict[str, str]:
    return base_env(
        JOBTOKEN_SERVER=srv_url,
        JOBTOKEN_ALLOW_HTTP="1",
        JOBTOKEN_PARENT_MYTOKEN_FILE=str(parent),
        JOBTOKEN_VO="dteam",
        JOBTOKEN_AUDIENCE=AUDIENCE,
        JOBTOKEN_WORK_DIR=str(work),
        JOBTOKEN_JOB_ID="pilot-42",
        JOBTOKEN_WALLTIME="600",
        **extra,
    )


@pytest.mark.parametrize("mode, code", [("run", 255), ("exec", 1)])
def test_pilot_wrapper_runs_payload_with_token(
    srv: DevServer, parent_file: Path, tmp_path: Path, mode: str, code: int
) -> None:
    env = pilot_env(
        srv.url,
        parent_file,
        tmp_path,
        JOBTOKEN_WRAP_MODE=mode,
        JOBTOKEN_DIR=str(tmp_path / "tok"),
        BEARER_TOKEN="stale",
    )
    proc = subprocess.run(
        [PILOT_WRAP, "--", *payload_checking_token(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == code, proc.stderr
    wait_sidecar_gone(tmp_path / "tok")
    assert not (tmp_path / "tok" / "mytoken").exists()  # job mytoken revoked and deleted


@pytest.mark.parametrize("mode", ["run", "exec"])
def test_pilot_wrapper_death_by_term_passes(
    srv: DevServer, parent_file: Path, tmp_path: Path, mode: str
) -> None:
    env = pilot_env(
        srv.url, parent_file, tmp_path, JOBTOKEN_WRAP_MODE=mode, JOBTOKEN_DIR=str(tmp_path / "tok")
    )
    proc = subprocess.run(
        [PILOT_WRAP, *EXIT_WITH, "signal", "15"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -15, proc.stderr
    wait_sidecar_gone(tmp_path / "tok")


def test_pilot_wrapper_server_down_fails_before_payload(parent_file: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    env = pilot_env(closed_port_url(), parent_file, tmp_path, JOBTOKEN_TIMEOUT="1")
    proc = subprocess.run(
        [PILOT_WRAP, "/bin/touch", str(marker)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 75, proc.stderr
    assert not marker.exists()


def test_pilot_wrapper_refuses_a_vo_that_is_a_path(
    srv: DevServer, parent_file: Path, tmp_path: Path
) -> None:
    """Issue 12.4: ``JOBTOKEN_VO=cms/store/user/victim`` put that path into the payload's
    scope; now it is a configuration error (78) before anything is minted or run."""
    marker = tmp_path / "payload-ran"
    env = pilot_env(srv.url, parent_file, tmp_path)
    env["JOBTOKEN_VO"] = "cms/store/user/victim"
    proc = subprocess.run(
        [PILOT_WRAP, "/bin/touch", str(marker)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 78, proc.stderr
    assert "site.vo" in proc.stderr
    assert not marker.exists()


def test_pilot_wrapper_usage(tmp_path: Path) -> None:
    proc = subprocess.run([PILOT_WRAP], env=base_env(), capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_pilot_wrapper_does_not_use_a_predictable_directory(
    srv: DevServer, parent_file: Path, tmp_path: Path
) -> None:
    # issue 12 item 9: another user pre-creates /tmp/.jobtoken-<pid> for the next pids;
    # the wrapper must not depend on any name it could have guessed
    work = tmp_path / "shared"
    work.mkdir()
    work.chmod(0o1777)
    import os

    first_pid = os.getpid() + 1
    for pid in range(first_pid, first_pid + 600):
        (work / f".jobtoken-{pid}").mkdir(mode=0o777)  # a squatter's (would be refused)
        (work / f".jobtoken-{pid}").chmod(0o777)
    marker = tmp_path / "payload-ran"
    env = pilot_env(srv.url, parent_file, work)
    proc = subprocess.run(
        [PILOT_WRAP, "/bin/touch", str(marker)], env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()


# --- issue 9: the condor wrapper for jobs that did not ask, and its own revocation ----------


def test_condor_wrapper_leaves_a_job_that_did_not_ask_alone(sandbox: Dict[str, Path]) -> None:
    """Even with a token directory in the sandbox, a job without HookKeyword JOBTOKEN
    runs exactly as without jobtoken: no sidecar, no token variables."""
    (sandbox["scratch"] / ".job.ad").write_text(job_ad_text(GlobalJobId="ap#1.0#2"))
    probe = ["/bin/sh", "-c", 'test -z "${BEARER_TOKEN_FILE:-}" && test -z "${JOBTOKEN_DIR:-}"'
             ' && test "$BEARER_TOKEN" = stale-token-from-the-job-environment && exit 4']
    proc = run_as_starter(sandbox, probe)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr == ""
    assert not sidecar_alive(TokenDir(sandbox["tokendir"]))
    assert not (sandbox["tokendir"] / "state.json").exists()


def test_condor_wrapper_failure_revokes_the_job_mytoken_itself(
    srv: DevServer, sandbox: Dict[str, Path]
) -> None:
    """With .job_wrapper_failure the starter runs no JOB_EXIT hook: the wrapper revokes."""
    tokendir = sandbox["tokendir"]
    mom_id = json.loads((tokendir / "job.json").read_text())["mom_id"]
    (tokendir / "bt").unlink()  # the sidecar needs a new token, and the server refuses one
    srv.faults.add("access", status=503)
    try:
        proc = run_as_starter(sandbox, [*EXIT_WITH, "code", "0"])
    finally:
        srv.faults.clear()
    assert proc.returncode == 1, proc.stderr
    assert "could not start the token renewal sidecar" in sandbox["failure"].read_text()
    assert srv._store.by_mom_id(mom_id).revoked
    assert not (tokendir / "mytoken").exists()
