"""ARC-CE: ``wrappers/arc/ENV/JOBTOKEN`` run stage 0 → 1 → payload → 2 as ARC runs it.

ARC's scripts are ``#!/bin/sh`` (dash on Debian): stage 0 is sourced by the submit script's
``sourcewithargs`` function after the ``arcctl rte params-set`` file, with the
``joboption_*`` variables; stages 1 and 2 are the RTE text (params file first) pasted into
the job script as ``RTE_function_1`` and called with the stage number, with the
``RUNTIME_*`` variables ARC sets on the worker node. Both run here under dash, so a bash-ism
in the RTE fails these tests as it failed the real CE (issue 10.1). tests/real/arc/ runs
the same RTE inside a real A-REX.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

import jwt
import pytest

from jobtoken._errors import MytokenRejectedError
from jobtoken._mytoken import MytokenClient
from jobtoken._run import sidecar_alive
from jobtoken._tokendir import TokenDir
from jobtoken.devserver import DevServer, DevServerConfig
from tests.prerequisites import need

from .conftest import AUDIENCE, JOBTOKEN_BIN, WRAPPERS_DIR, base_env, closed_port_url, write_secret

RTE = WRAPPERS_DIR / "arc" / "ENV" / "JOBTOKEN"
GRIDID = "Kc1NDmQ8ZfgnUvUHfpmxYvKoABFKDmABFKDmDbFKDmABFKDmHSO0Jn"
DASH = shutil.which("dash")
SHELLCHECK = shutil.which("shellcheck")


def _need(tool: Optional[str], name: str) -> str:
    need(tool, f"{name} not installed (.ci/install-arc.sh installs it)")
    assert tool is not None
    return tool


def params_file(path: Path, **params: str) -> Path:
    """What ``arcctl rte params-set ENV/JOBTOKEN NAME VALUE`` leaves in controldir/rte/params."""
    path.write_text("".join(f"{k}='{v}'\n" for k, v in params.items()), encoding="utf-8")
    return path


def run_stage0(params: Path, session: Path, walltime: str = "600") -> subprocess.CompletedProcess:
    """Stage 0 as submit_common.sh runs it: ``sourcewithargs <rte> 0`` in a /bin/sh script."""
    script = f"""#!/bin/sh
sourcewithargs () {{
  script=$1
  shift
  . $script
}}
joboption_directory='{session}'
joboption_gridid='{GRIDID}'
joboption_controldir='{session.parent / "control"}'
joboption_walltime='{walltime}'
joboption_queue=grid
. '{params}'
sourcewithargs '{RTE}' 0
rc=$?
[ $rc -ne 0 ] && echo "ERROR: Runtime script ENV/JOBTOKEN stage 0 execution failed \\
with exit code $rc" >&2
exit $rc
"""
    return subprocess.run(
        [_need(DASH, "dash"), "-c", script], env=base_env(), capture_output=True, text=True,
        timeout=60,
    )


def job_script(params: Path, runtime_dir: Path, payload: str) -> str:
    """The LRMS job script: the RTE pasted as a function, stage 1, payload, stage 2."""
    body = params.read_text() + RTE.read_text()
    return f"""#!/bin/sh
RTE_function_1 () {{
{body}
}}
export RUNTIME_JOB_DIR='{runtime_dir}'
export RUNTIME_JOB_DIAG='{runtime_dir}.diag'
export GRID_GLOBAL_JOBID='https://ce.example.org:443/arex/{GRIDID}'
export HOME="$RUNTIME_JOB_DIR"
cd "$RUNTIME_JOB_DIR"
RTE_function_1 1
if [ $? -ne 0 ]; then
    echo "Runtime ENV/JOBTOKEN stage 1 execution failed." 1>&2
    exit 1
fi
{payload}
RESULT=$?
stage2_from=$(date +%s.%N)
RTE_function_1 2
if [ $? -ne 0 ]; then
    echo "Runtime ENV/JOBTOKEN stage 2 execution failed." 1>&2
    exit 1
fi
echo "stage2 from=$stage2_from to=$(date +%s.%N)"
exit $RESULT
"""


def run_job(params: Path, runtime_dir: Path, payload: str, **env: str
            ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_need(DASH, "dash"), "-c", job_script(params, runtime_dir, payload)],
        env=base_env(**env), capture_output=True, text=True, timeout=120,
    )


def stage2_seconds(stdout: str) -> float:
    line = next(x for x in stdout.splitlines() if x.startswith("stage2 from="))
    fields = dict(part.split("=") for part in line.split()[1:])
    return float(fields["to"]) - float(fields["from"])


def assert_revoked(srv: DevServer, job_mt: str) -> None:
    with MytokenClient(srv.url, allow_http=True) as client, pytest.raises(MytokenRejectedError):
        client.get_access_token(job_mt)


@pytest.fixture
def arc_site(srv: DevServer, parent_file: Path, tmp_path: Path) -> Dict[str, Path]:
    session = tmp_path / "session" / GRIDID
    session.mkdir(parents=True, mode=0o700)
    params = params_file(
        tmp_path / "params",
        JOBTOKEN_PARENT_MT=str(parent_file),
        JOBTOKEN_SERVER=srv.url,
        JOBTOKEN_SCOPE_TEMPLATE="storage.create:/{vo}/arc/{job_id}",
        JOBTOKEN_AUDIENCE=AUDIENCE,
        JOBTOKEN_VO="dteam",
        JOBTOKEN_BIN=JOBTOKEN_BIN,
        JOBTOKEN_DEV_ALLOW_HTTP="Yes",
    )
    return {"session": session, "params": params}


def wait_sidecar_gone(directory: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while directory.is_dir() and sidecar_alive(TokenDir(directory)):
        assert time.monotonic() < deadline, "sidecar still running"
        time.sleep(0.05)


@pytest.mark.parametrize("moved", [False, True], ids=["shared-session", "local-scratch"])
def test_rte_stages_give_the_payload_a_token_then_revoke(
    srv: DevServer, arc_site: Dict[str, Path], tmp_path: Path, moved: bool
) -> None:
    session = arc_site["session"]
    proc = run_stage0(arc_site["params"], session)
    assert proc.returncode == 0, proc.stderr
    tokendir = session / ".jobtoken"
    assert oct(tokendir.stat().st_mode & 0o777) == "0o700"
    assert oct((tokendir / "mytoken").stat().st_mode & 0o777) == "0o600"
    job_mt = (tokendir / "mytoken").read_text()
    claims = jwt.decode((tokendir / "bt").read_text().strip(), options={"verify_signature": False})
    assert claims["scope"] == f"storage.create:/dteam/arc/{GRIDID}"
    assert job_mt not in proc.stderr and job_mt not in proc.stdout

    runtime = session
    if moved:  # RUNTIME_LOCAL_SCRATCH_DIR: the session dir is copied to the node's scratch
        runtime = tmp_path / "scratch" / GRIDID
        shutil.copytree(session, runtime, symlinks=True)
        shutil.rmtree(session)
    payload = (
        'test -s "$BEARER_TOKEN_FILE" && test -z "${BEARER_TOKEN:-}" '
        '&& echo "token at $BEARER_TOKEN_FILE" && (exit 3)'
    )
    proc = run_job(arc_site["params"], runtime, payload, BEARER_TOKEN="from-the-job-description")
    assert proc.returncode == 3, proc.stderr  # the payload's status is the job's
    assert f"token at {runtime}/.jobtoken/bt" in proc.stdout
    assert not (runtime / ".jobtoken").exists(), os.listdir(runtime / ".jobtoken")  # 10.3
    assert_revoked(srv, job_mt)


def test_stage2_stops_the_sidecar_within_a_second_or_two(
    srv: DevServer, arc_site: Dict[str, Path]
) -> None:
    """Issue 10.2: the detached sidecar blocked up to 60 s on the watched pid after TERM,
    and stage 2 gave up after 20 s. 1200 s tokens: no renewal is due while we wait."""
    session = arc_site["session"]
    assert run_stage0(arc_site["params"], session).returncode == 0
    proc = run_job(arc_site["params"], session, "sleep 2")
    assert proc.returncode == 0, proc.stderr
    assert "did not stop" not in proc.stderr, proc.stderr
    assert stage2_seconds(proc.stdout) < 5.0, proc.stdout
    assert not (session / ".jobtoken").exists()


def test_stage1_failure_revokes_and_removes_the_job_mytoken(
    srv: DevServer, arc_site: Dict[str, Path], tmp_path: Path
) -> None:
    """Issue 10.4: a job failing in stage 1 never runs stage 2; arcget then fetched a live
    job mytoken. Here the worker's jobtoken cannot start a sidecar."""
    session = arc_site["session"]
    assert run_stage0(arc_site["params"], session).returncode == 0
    job_mt = (session / ".jobtoken" / "mytoken").read_text()
    broken = tmp_path / "jobtoken-no-sidecar"
    broken.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = sidecar ]; then echo "jobtoken: error: no sidecar here" >&2; exit 70; fi\n'
        f'exec {JOBTOKEN_BIN} "$@"\n'
    )
    broken.chmod(0o755)
    params = params_file(tmp_path / "broken-params", **{
        **dict(line.split("=", 1) for line in arc_site["params"].read_text().splitlines()),
        "JOBTOKEN_BIN": str(broken),
    })
    proc = run_job(params, session, "echo payload ran")
    assert proc.returncode == 1 and "stage 1 execution failed" in proc.stderr, proc.stderr
    assert "payload ran" not in proc.stdout
    assert not (session / ".jobtoken").exists()
    assert_revoked(srv, job_mt)


def test_ce_end_revokes_when_the_session_dir_is_gone(
    srv: DevServer, arc_site: Dict[str, Path], parent_file: Path
) -> None:
    """Issue 10.5: after arckill A-REX deletes the session dir, so neither stage 2 nor the
    sidecar can revoke; the CE's statecallout (``jobtoken arc end``) does, by name."""
    session = arc_site["session"]
    assert run_stage0(arc_site["params"], session).returncode == 0
    job_mt = (session / ".jobtoken" / "mytoken").read_text()
    shutil.rmtree(session)
    end = [JOBTOKEN_BIN, "arc", "end", "--job-id", GRIDID, "--parent-mytoken-file",
           str(parent_file), "--server", srv.url, "--allow-http"]
    proc = subprocess.run(end, env=base_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "revoked job mytoken" in proc.stderr
    assert_revoked(srv, job_mt)
    again = subprocess.run(end, env=base_env(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "revoked" not in again.stderr, again.stderr


def test_stage0_fails_submission_with_one_line_when_server_down(
    parent_file: Path, tmp_path: Path, arc_site: Dict[str, Path]
) -> None:
    params = params_file(
        tmp_path / "down",
        JOBTOKEN_PARENT_MT=str(parent_file),
        JOBTOKEN_SERVER=closed_port_url(),
        JOBTOKEN_AUDIENCE=AUDIENCE,
        JOBTOKEN_VO="dteam",
        JOBTOKEN_BIN=JOBTOKEN_BIN,
        JOBTOKEN_DEV_ALLOW_HTTP="Yes",
    )
    proc = run_stage0(params, arc_site["session"])
    assert proc.returncode == 75  # the RTE returns jobtoken's status; ARC prints it
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, lines  # ours, then ARC's "stage 0 execution failed"
    assert lines[0].startswith("jobtoken: ") and "exit code 75" in lines[1]
    assert not (arc_site["session"] / ".jobtoken").exists()


def test_stage0_fails_when_the_usages_budget_is_too_small(tmp_path: Path) -> None:
    """Issue 10.6: sized for 1200 s tokens (the default site.expected_at_lifetime_s), a
    server handing out 60 s tokens ran the job out of usages_AT halfway. Stage 0 now
    fails, says which setting to change, and revokes the job mytoken it minted."""
    with DevServer(DevServerConfig(default_audience=AUDIENCE, at_lifetime_s=60)) as short:
        parent = write_secret(tmp_path / "parent.mytoken", short.issue_mytoken(
            capabilities=["AT", "create_mytoken", "tokeninfo"]))
        session = tmp_path / "session" / GRIDID
        session.mkdir(parents=True)
        params = params_file(
            tmp_path / "params", JOBTOKEN_PARENT_MT=str(parent), JOBTOKEN_SERVER=short.url,
            JOBTOKEN_AUDIENCE=AUDIENCE, JOBTOKEN_VO="dteam", JOBTOKEN_BIN=JOBTOKEN_BIN,
            JOBTOKEN_DEV_ALLOW_HTTP="Yes",
        )
        proc = run_stage0(params, session, walltime="3600")
        assert proc.returncode == 78, proc.stderr
        ours = [x for x in proc.stderr.splitlines() if x.startswith("jobtoken")]
        assert len(ours) == 1, proc.stderr
        assert "set site.expected_at_lifetime_s (--expected-at-lifetime" in ours[0]
        assert ours[0].endswith(" to 60"), proc.stderr
        assert not (session / ".jobtoken").exists()
        with MytokenClient(short.url, allow_http=True) as client:
            assert client.subtokens(parent.read_text()).entries == ()


@pytest.mark.parametrize("vo", ["cms/store/user/victim", "..", "dteam/../atlas"])
def test_stage0_never_puts_a_path_in_the_vo(
    srv: DevServer, parent_file: Path, tmp_path: Path, vo: str
) -> None:
    """Issue 12.4: the VO went into the scope path unchecked, so a VO value such as
    ``cms/store/user/victim`` (no site.allowed_scopes) minted
    ``storage.create:/cms/store/user/victim/arc/<job>``. Now stage 0 fails, mints nothing."""
    session = tmp_path / "session" / GRIDID
    session.mkdir(parents=True, mode=0o700)
    params = params_file(
        tmp_path / "params", JOBTOKEN_PARENT_MT=str(parent_file), JOBTOKEN_SERVER=srv.url,
        JOBTOKEN_SCOPE_TEMPLATE="storage.create:/{vo}/arc/{job_id}", JOBTOKEN_AUDIENCE=AUDIENCE,
        JOBTOKEN_VO=vo, JOBTOKEN_BIN=JOBTOKEN_BIN, JOBTOKEN_DEV_ALLOW_HTTP="Yes",
    )
    proc = run_stage0(params, session)
    assert proc.returncode == 78, proc.stderr
    assert "site.vo" in proc.stderr and "must be a plain name" in proc.stderr
    assert not (session / ".jobtoken").exists()
    with MytokenClient(srv.url, allow_http=True) as client:
        assert client.subtokens(parent_file.read_text()).entries == ()


def test_stage0_refuses_world_readable_robot_mytoken(
    arc_site: Dict[str, Path], parent_file: Path, tmp_path: Path
) -> None:
    parent_file.chmod(0o644)
    proc = run_stage0(arc_site["params"], arc_site["session"])
    assert proc.returncode != 0 and "readable by everyone" in proc.stderr


def test_stage1_without_stage0_fails_the_job(arc_site: Dict[str, Path]) -> None:
    proc = run_job(arc_site["params"], arc_site["session"], "true")
    assert proc.returncode == 1
    assert "did stage 0 run?" in proc.stderr and "stage 1 execution failed" in proc.stderr


def test_rte_is_posix_sh() -> None:
    """Issue 10.1: ARC pastes the RTE into a #!/bin/sh script; bash arrays broke every job."""
    proc = subprocess.run([_need(SHELLCHECK, "shellcheck"), "-s", "sh", "-S", "warning",
                           str(RTE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_with_a_node_broker_the_payload_gets_no_mytoken_and_stage2_releases(
        tmp_path: Path) -> None:
    """``JOBTOKEN_BROKER_SOCKET`` set: stage 1 hands the job mytoken to a real broker (one
    without a parent, as on a worker node), the payload finds a token and no mytoken, and
    stage 2's release has the broker revoke the job mytoken."""
    from tests.brokerhelpers import running_site, wait_for

    with running_site(at_lifetime_s=60, margin_s=10, adopt=True) as site:
        session = site.base / "session" / GRIDID  # below a 0755 root directory, no symlink
        session.mkdir(parents=True, mode=0o700)
        params = params_file(
            tmp_path / "params", JOBTOKEN_PARENT_MT=str(site.parent),
            JOBTOKEN_SERVER=site.srv.url, JOBTOKEN_SCOPE_TEMPLATE="storage.create:/{vo}/arc",
            JOBTOKEN_AUDIENCE=AUDIENCE, JOBTOKEN_VO="vo", JOBTOKEN_BIN=JOBTOKEN_BIN,
            JOBTOKEN_DEV_ALLOW_HTTP="Yes", JOBTOKEN_BROKER_SOCKET=site.socket,
            JOBTOKEN_CONFIG=str(site.config))  # the site's server and token lifetime
        proc = run_stage0(params, session)
        assert proc.returncode == 0, proc.stderr
        job_mt = (session / ".jobtoken" / "mytoken").read_text()
        payload = ('test -s "$BEARER_TOKEN_FILE" && echo "token at $BEARER_TOKEN_FILE" '
                   '&& ls -A "$JOBTOKEN_DIR" && (exit 3)')
        proc = run_job(params, session, payload)
        assert proc.returncode == 3, proc.stderr  # the payload's status is the job's
        assert f"token at {session}/.jobtoken/bt" in proc.stdout
        listed = proc.stdout.split("token at", 1)[1].splitlines()[1:]
        assert not [name for name in listed if "mytoken" in name], proc.stdout
        assert not (session / ".jobtoken").exists()
        assert not site.mytoken_files()
        wait_for(lambda: all(c.revoked for c in site.children()), 30,
                 "stage 2's release has the job mytoken revoked")
        assert_revoked(site.srv, job_mt)
