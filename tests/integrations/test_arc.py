"""ARC-CE: ``wrappers/arc/ENV/JOBTOKEN`` run stage 0 → 1 → payload → 2 as ARC runs it.

Stage 0 is sourced in a bash "submit script" with the ``joboption_*`` variables (after the
``arcctl rte params-set`` file); stages 1 and 2 run in a bash "job script" where the RTE
text is embedded as ``RTE_function_1`` and called with the stage number, with the
``RUNTIME_*`` variables ARC sets on the worker node.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict

import jwt
import pytest

from jobtoken._errors import MytokenRejectedError
from jobtoken._mytoken import MytokenClient
from jobtoken._run import sidecar_alive
from jobtoken._tokendir import TokenDir
from jobtoken.devserver import DevServer

from .conftest import AUDIENCE, JOBTOKEN_BIN, WRAPPERS_DIR, base_env, closed_port_url

RTE = WRAPPERS_DIR / "arc" / "ENV" / "JOBTOKEN"
GRIDID = "Kc1NDmQ8ZfgnUvUHfpmxYvKoABFKDmABFKDmDbFKDmABFKDmHSO0Jn"


def params_file(path: Path, **params: str) -> Path:
    """What ``arcctl rte params-set ENV/JOBTOKEN NAME VALUE`` leaves in controldir/rte/params."""
    path.write_text("".join(f"{k}='{v}'\n" for k, v in params.items()), encoding="utf-8")
    return path


def run_stage0(params: Path, session: Path, walltime: str = "600") -> subprocess.CompletedProcess:
    script = f"""
joboption_directory='{session}'
joboption_gridid='{GRIDID}'
joboption_controldir='{session.parent / "control"}'
joboption_walltime='{walltime}'
joboption_queue=grid
source '{params}'
source '{RTE}' 0
rc=$?
[ $rc -ne 0 ] && echo "ERROR: Runtime script ENV/JOBTOKEN stage 0 execution failed." >&2
exit $rc
"""
    return subprocess.run(
        ["bash", "-c", script], env=base_env(), capture_output=True, text=True, timeout=60
    )


def job_script(params: Path, runtime_dir: Path, payload: str) -> str:
    body = params.read_text() + RTE.read_text()
    return f"""
RTE_function_1 () {{
{body}
}}
export RUNTIME_JOB_DIR='{runtime_dir}'
export RUNTIME_JOB_DIAG='{runtime_dir}.diag'
export GRID_GLOBAL_JOBID='gsiftp://ce.example.org:2811/jobs/{GRIDID}'
export HOME="$RUNTIME_JOB_DIR"
cd "$RUNTIME_JOB_DIR"
RTE_function_1 1 || {{ echo "Runtime ENV/JOBTOKEN stage 1 execution failed." >&2; exit 1; }}
{payload}
RESULT=$?
RTE_function_1 2 || {{ echo "Runtime ENV/JOBTOKEN stage 2 execution failed." >&2; exit 1; }}
exit $RESULT
"""


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
    proc = subprocess.run(
        ["bash", "-c", job_script(arc_site["params"], runtime, payload)],
        env=base_env(BEARER_TOKEN="from-the-job-description"),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 3, proc.stderr  # the payload's status is the job's
    assert f"token at {runtime}/.jobtoken/bt" in proc.stdout
    wait_sidecar_gone(runtime / ".jobtoken")
    assert not (runtime / ".jobtoken").exists()  # nothing left for output staging
    with MytokenClient(srv.url, allow_http=True) as client, pytest.raises(MytokenRejectedError):
        client.get_access_token(job_mt)


def test_stage0_fails_submission_when_server_down(
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
    assert proc.returncode == 1
    assert "stage 0 execution failed" in proc.stderr
    assert "exit 75" in proc.stderr


def test_stage0_refuses_world_readable_robot_mytoken(
    arc_site: Dict[str, Path], parent_file: Path, tmp_path: Path
) -> None:
    parent_file.chmod(0o644)
    proc = run_stage0(arc_site["params"], arc_site["session"])
    assert proc.returncode == 1 and "readable by everyone" in proc.stderr


def test_stage1_without_stage0_fails_the_job(arc_site: Dict[str, Path]) -> None:
    proc = subprocess.run(
        ["bash", "-c", job_script(arc_site["params"], arc_site["session"], "true")],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "did stage 0 run?" in proc.stderr and "stage 1 execution failed" in proc.stderr
