"""Real ARC jobs through ``ENV/JOBTOKEN``: submitted with ``arcsub``, fetched with ``arcget``.

Each test ends the way a site relies on: the job's mytoken is revoked at the server (asked
through tokeninfo ``subtokens`` of the robot mytoken) and nothing of ``.jobtoken`` leaves the
CE with the job's files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator, List

import pytest

from ._ce import JOBTOKEN_BIN, SYSTEM_RTE, CEError, wait_for
from .conftest import AT_LIFETIME_S, ArcSite

pytestmark = pytest.mark.slow

JOB_END_S = 240  # a job's ARC life (submit, scan, stage out) on a loaded 2-core machine

# stdlib only: it runs with the CE's python3, as the pool account. READ_TOKEN_LOOP reads
# the token every second for argv[1] seconds (reads, bad, tokens); test_arc_broker.py
# adds its own search after it
READ_TOKEN_LOOP = r"""
import base64, json, os, sys, time

def claims_of(text):
    try:
        part = text.strip().split(".")[1]
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except Exception:
        return None

path = os.environ["BEARER_TOKEN_FILE"]
reads = bad = 0
tokens = set()
end = time.time() + float(sys.argv[1])
while time.time() < end:
    reads += 1
    try:
        with open(path) as fh:
            claims = claims_of(fh.read())
        if not claims or claims["exp"] <= time.time():
            bad += 1
        else:
            tokens.add(claims["jti"])
    except Exception:
        bad += 1
    time.sleep(1)
"""
CHECKER = READ_TOKEN_LOOP + r"""
print(json.dumps({"reads": reads, "bad": bad, "tokens": len(tokens),
                  "bearer_token": "BEARER_TOKEN" in os.environ,
                  "dir_in_session": os.environ.get("JOBTOKEN_DIR", "").endswith("/.jobtoken")}))
"""


def xrsl(site: ArcSite, executable: str, *args: str, inputs: str = "",
         walltime_min: int = 10) -> str:
    arguments = " ".join(f'"{a}"' for a in args)
    return (f'&(executable="{executable}")(arguments={arguments or chr(34) * 2})'
            f'(stdout="out.txt")(stderr="err.txt")(gmlog="gmlog")'
            f'(runtimeenvironment="ENV/JOBTOKEN")(walltime="{walltime_min}")'
            f'(outputfiles=("/" ""))' + (f"(inputfiles={inputs})" if inputs else ""))


def staged_out(downloaded: Path) -> List[str]:
    """Everything of ``.jobtoken`` among the files arcget brought back."""
    return [str(p.relative_to(downloaded)) for p in downloaded.rglob("*")
            if ".jobtoken" in p.parts]


@pytest.fixture
def site(arc_site: ArcSite) -> Iterator[ArcSite]:
    """The CE with no fault injected and no job mytoken left live before the test."""
    arc_site.server.faults.clear()
    arc_site.wait_no_live_job_mytoken()
    yield arc_site
    arc_site.server.faults.clear()


def test_payload_sees_fresh_tokens_over_three_lifetimes(site: ArcSite) -> None:
    ce = site.ce
    checker = ce.base / "jobs" / "check_token.py"
    ce.host(checker).write_text(CHECKER, encoding="utf-8")
    seconds = 3 * AT_LIFETIME_S + 10
    job, _ = ce.submit(xrsl(site, "/usr/bin/python3", "check_token.py", str(seconds),
                            inputs=f'("check_token.py" "{checker}")'))
    assert job is not None
    state = ce.wait_final(job, seconds + JOB_END_S)
    log = ce.log(job)
    assert state == "Finished", log
    files = ce.get(job)
    summary = json.loads((files / "out.txt").read_text().strip().splitlines()[-1])
    assert summary["bad"] == 0, (summary, log)
    assert summary["tokens"] >= 3, summary
    assert summary["reads"] >= seconds - 5, summary
    assert summary["dir_in_session"] and not summary["bearer_token"], summary
    assert staged_out(files) == []
    site.wait_no_live_job_mytoken()


def test_stage1_failure_revokes_and_fails_the_job(site: ArcSite) -> None:
    """A worker node whose jobtoken cannot start the sidecar: the job fails in stage 1, the
    job mytoken is revoked there and nothing live is staged out."""
    ce = site.ce
    broken = ce.base / "bin" / "jobtoken-no-sidecar"
    ce.host(broken).parent.mkdir(exist_ok=True)
    ce.host(broken).write_text(
        "#!/bin/sh\n"
        'if [ "$1" = sidecar ]; then echo "jobtoken: error: sidecar broken here" >&2; exit 70; fi\n'
        f'exec {JOBTOKEN_BIN} "$@"\n', encoding="ascii")
    os.chmod(ce.host(broken), 0o755)
    ce.set_param("JOBTOKEN_BIN", str(broken))
    try:
        job, _ = ce.submit(xrsl(site, "/bin/echo", "payload ran"))
        assert job is not None
        # stage 0 reads the parameters when A-REX submits the job, after arcsub returned
        wait_for("stage 0 to have run", lambda: None if ce.state(job) in (
            "", "Accepted", "Preparing", "Submitting") else True, JOB_END_S, 2.0)
    finally:
        ce.set_param("JOBTOKEN_BIN", JOBTOKEN_BIN)  # the RTE's default: the package's
    state = ce.wait_final(job, JOB_END_S)
    log = ce.log(job)
    assert state == "Failed", log
    files = ce.get(job)
    out = files / "out.txt"
    assert not out.exists() or "payload ran" not in out.read_text()
    errors = (files / "err.txt").read_text() if (files / "err.txt").exists() else ""
    assert "stage 1 execution failed" in errors + log, (errors, log)
    assert staged_out(files) == []
    site.wait_no_live_job_mytoken()


def test_arckill_revokes_the_job_mytoken(site: ArcSite) -> None:
    """Under fork, arckill kills the job's wrapper, stage 2 does not run, and A-REX may
    clean the session dir at once: the CE callout (``jobtoken arc end``) revokes instead.

    Not asserted: that the session dir is gone. A-REX 6.17 kept it here (with the revoked
    job mytoken and the last access token in ``.jobtoken``) until its own cleanup."""
    ce = site.ce
    job, _ = ce.submit(xrsl(site, "/bin/sleep", "600", walltime_min=15))
    assert job is not None
    wait_for("the job to run", lambda: True if ce.state(job) == "Running" else None,
             JOB_END_S, 3.0)
    wait_for("its job mytoken", lambda: True if site.live_job_mytokens() else None, 30, 1.0)
    ce.arc("arckill", job)
    site.wait_no_live_job_mytoken(JOB_END_S)


def test_mytoken_outage_at_submit_fails_with_one_line(site: ArcSite) -> None:
    for endpoint in ("discovery", "my", "access"):
        site.server.faults.add(endpoint, status=503)
    try:
        job, _ = site.ce.submit(xrsl(site, "/bin/echo", "payload ran"))
        assert job is not None
        state = site.ce.wait_final(job, JOB_END_S)
    finally:
        site.server.faults.clear()
    log = site.ce.log(job)
    assert state == "Failed", log
    ours = [line for line in log.splitlines() if line.startswith("jobtoken")]
    assert len(ours) == 1, log
    assert re.search(r"503|unavailable", ours[0]), ours
    assert re.search(r"ENV/JOBTOKEN stage 0 execution failed", log), log
    files = site.ce.get(job)
    assert staged_out(files) == []
    assert site.live_job_mytokens() == []


def test_ce_listens_on_loopback_only(site: ArcSite) -> None:
    try:
        site.ce.assert_loopback_only()
    except CEError as exc:
        pytest.fail(str(exc))


def test_the_ce_runs_the_installed_package(site: ArcSite) -> None:
    """What these tests prove, they prove of the Debian package: the enabled RTE is the
    package's system RTE and the command it runs is the package's."""
    ce = site.ce
    enabled = ce.run(["arcctl", "-c", ce.conf, "rte", "list", "--enabled", "--long"]).stdout
    assert f"-> {SYSTEM_RTE}" in enabled, enabled
    for path in (SYSTEM_RTE, JOBTOKEN_BIN):
        owner = ce.run(["dpkg-query", "-S", path], check=False)
        assert owner.stdout.startswith("jobtoken: "), (path, owner.stdout, owner.stderr)
