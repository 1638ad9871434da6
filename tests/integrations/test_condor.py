"""HTCondor execute point: the prepare hook as the starter runs it, the exit hook, Chirp.

The hook is the shipped script ``condor/jobtoken-prepare-hook``, run as a subprocess with
the job ad (built by ``classad2``) on stdin, the starter's variables and cwd = scratch;
its stdout is parsed back with ``classad2``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import classad2
import jwt
import pytest

from jobtoken._errors import ConfigError, MytokenRejectedError, ServerUnavailableError
from jobtoken._tokendir import RenewalState, TokenDir
from jobtoken.devserver import DevServer
from jobtoken.integrations._env import parse_environment_v2
from jobtoken.integrations.condor import (
    CHIRP_ATTRIBUTES,
    hook_status_code,
    job_request_from_ad,
    publish_chirp,
    read_job_ad,
    run_exit_hook,
)

from .conftest import (
    AUDIENCE,
    base_env,
    closed_port_url,
    condor_script,
    job_ad_text,
    toml_config,
    write_secret,
)

GLOBAL_JOB_ID = "ap.example.org#4711.0#1700000000"
JOB_PATH_ID = "ap.example.org_4711.0_1700000000"


def run_hook(
    scratch: Path,
    config: Path,
    ad: str,
    *,
    env: Optional[Dict[str, str]] = None,
    args: Tuple[str, ...] = (),
) -> Tuple[Any, subprocess.CompletedProcess]:
    """Run the prepare hook like the starter: ad on stdin, cwd scratch, job's env."""
    environ = base_env(
        _CONDOR_SCRATCH_DIR=str(scratch),
        BATCH_SYSTEM="HTCondor",
        _CONDOR_JOB_AD=str(scratch / ".job.ad"),
    )
    environ.update(env or {})
    argv = [condor_script("jobtoken-prepare-hook"), "--config", str(config), *args]
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
        cwd=scratch if scratch.is_dir() else None,
        start_new_session=True,
    )
    stdout, stderr = popen.communicate(ad, timeout=60)
    proc = subprocess.CompletedProcess(argv, popen.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(ProcessLookupError):  # the hook left no process behind
        os.killpg(popen.pid, 0)
    return classad2.parseOne(proc.stdout, parser=classad2.ParserType.Old), proc


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    d = tmp_path / "execute" / "dir_1234"
    d.mkdir(parents=True, mode=0o700)
    return d


def standard_ad(**overrides: Any) -> str:
    attrs: Dict[str, Any] = {
        "GlobalJobId": GLOBAL_JOB_ID,
        "Owner": "alice",
        "MaxWallTimeMins": 90,
        "Environment": "FOO=bar BAZ='a b' BEARER_TOKEN=stale",
    }
    attrs.update(overrides)
    return job_ad_text(**attrs)


# --- success ----------------------------------------------------------------------------------


def test_hook_mints_job_token_and_merges_environment(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    out, proc = run_hook(scratch, config, standard_ad())

    assert out["HookStatusCode"] == 0
    env = dict(parse_environment_v2(out["Environment"]))
    tokendir = scratch / ".jobtoken"
    assert env["BEARER_TOKEN_FILE"] == str(tokendir / "bt")
    assert env["JOBTOKEN_DIR"] == str(tokendir)
    assert env["FOO"] == "bar" and env["BAZ"] == "a b"
    assert "BEARER_TOKEN" not in env  # would win over the file and never be renewed
    assert stat.S_IMODE(tokendir.stat().st_mode) == 0o700
    for name in ("bt", "mytoken"):
        assert stat.S_IMODE((tokendir / name).stat().st_mode) == 0o600
    claims = jwt.decode((tokendir / "bt").read_text().strip(), options={"verify_signature": False})
    assert claims["scope"] == f"storage.create:/dteam/jobs/{JOB_PATH_ID}"
    assert claims["aud"] == AUDIENCE
    job_mt = (tokendir / "mytoken").read_text()
    info = srv.introspect(job_mt)
    assert "create_mytoken" not in str(info.get("token", info).get("capabilities"))
    # audit trail on stderr (the StarterLog), never a token
    assert f"job={GLOBAL_JOB_ID}" in proc.stderr and "mom_id=" in proc.stderr
    assert job_mt not in proc.stderr and claims["jti"] in proc.stderr
    assert job_mt not in proc.stdout


def test_hook_reads_old_style_env(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    ad = job_ad_text(GlobalJobId=GLOBAL_JOB_ID, BatchRuntime=600, Env="A=1;B=two words")
    out, _ = run_hook(scratch, config, ad)
    env = dict(parse_environment_v2(out["Environment"]))
    assert env["A"] == "1" and env["B"] == "two words" and "BEARER_TOKEN_FILE" in env


def test_hook_without_walltime_uses_site_default_with_message(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    out, _ = run_hook(scratch, config, job_ad_text(GlobalJobId=GLOBAL_JOB_ID))
    assert out["HookStatusCode"] == 0
    assert "no wall time" in out["HookStatusMessage"]


# --- the job's own mytoken: $_CONDOR_CREDS and transferred files -------------------------------


def job_credential(srv: DevServer, scratch: Path, file_name: str, form: str) -> Path:
    """$_CONDOR_CREDS with the job's own (submission) mytoken in FILE_NAME, bare or JSON."""
    submission = srv.issue_mytoken(
        capabilities=["AT", "create_mytoken"], restrictions=[{"scope": "storage.create:/dteam"}]
    )
    creds = scratch.parent / ".condor_creds"
    creds.mkdir(mode=0o755)
    text = submission if form == "bare" else json.dumps({"mytoken": submission, "x": 1})
    write_secret(creds / file_name, text + "\n")
    return creds


@pytest.mark.parametrize("form", ["bare", "json"])
def test_hook_takes_mytoken_from_condor_creds(
    srv: DevServer, scratch: Path, tmp_path: Path, form: str
) -> None:
    creds = job_credential(srv, scratch, "jobtoken.use", form)
    config = toml_config(tmp_path / "site.toml", server=srv.url)  # no site mytoken at all
    ad = standard_ad(JobtokenScope="storage.create:/dteam")
    out, proc = run_hook(scratch, config, ad, env={"_CONDOR_CREDS": str(creds)})
    assert out["HookStatusCode"] == 0, out.get("HookStatusMessage")
    assert "source=$_CONDOR_CREDS/jobtoken.use" in proc.stderr
    claims = jwt.decode(
        (scratch / ".jobtoken" / "bt").read_text().strip(), options={"verify_signature": False}
    )
    assert claims["scope"] == "storage.create:/dteam"
    assert (creds / "jobtoken.use").exists()  # HTCondor's file: never ours to delete
    assert not (scratch / ".jobtoken" / "parent.mytoken").exists()


def test_hook_takes_transferred_mytoken_and_removes_it(
    srv: DevServer, scratch: Path, tmp_path: Path
) -> None:
    submission = srv.issue_mytoken(capabilities=["AT", "create_mytoken"])
    write_secret(scratch / "jobtoken_submission.mytoken", submission)
    config = toml_config(tmp_path / "site.toml", server=srv.url)
    ad = standard_ad(
        JobtokenScope="storage.create:/dteam/out",
        JobtokenMytokenFile="jobtoken_submission.mytoken",
        JobtokenServer=srv.url,
    )
    out, _ = run_hook(scratch, config, ad)
    assert out["HookStatusCode"] == 0, out.get("HookStatusMessage")
    assert not (scratch / "jobtoken_submission.mytoken").exists()


def test_hook_holds_when_transferred_file_is_missing(
    srv: DevServer, scratch: Path, tmp_path: Path
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url)
    ad = standard_ad(JobtokenMytokenFile="jobtoken_submission.mytoken")
    out, _ = run_hook(scratch, config, ad)
    assert 1 <= out["HookStatusCode"] <= 299
    assert "transfer_input_files" in out["HookStatusMessage"]


# --- bad input: hold (1-299) or requeue (3xx) ---------------------------------------------


@pytest.mark.parametrize(
    "ad, expect",
    [
        (job_ad_text(Owner="alice", MaxWallTimeMins=10), "no GlobalJobId"),
        ('GlobalJobId = "x#1.0#2"\nthis is = = not a classad\nOwner = "a"\n', "malformed"),
        ("", "empty"),
    ],
    ids=["no-globaljobid", "malformed", "empty"],
)
def test_hook_holds_bad_job_ads(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path, ad: str, expect: str
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    out, _ = run_hook(scratch, config, ad)
    assert out["HookStatusCode"] == 78
    assert expect in out["HookStatusMessage"]
    assert "\n" not in out["HookStatusMessage"]
    assert "Environment" not in out


def test_hook_requires_walltime_when_told(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    out, _ = run_hook(
        scratch, config, job_ad_text(GlobalJobId=GLOBAL_JOB_ID), args=("--require-walltime",)
    )
    assert out["HookStatusCode"] == 78 and "no wall time" in out["HookStatusMessage"]


def test_hook_holds_scope_wider_than_site_allows(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    out, _ = run_hook(scratch, config, standard_ad(JobtokenScope="storage.create:/"))
    assert out["HookStatusCode"] == 77
    assert "wider than the site allows" in out["HookStatusMessage"]
    assert not (scratch / ".jobtoken" / "mytoken").exists()


@pytest.mark.parametrize("claim", [
    {"AcctGroup": "group_atlas.prod"},
    {"AcctGroup": "atlas"},
    {"x509UserProxyVOName": "cms/store/user/victim"},
    {"x509UserProxyVOName": "../atlas", "AcctGroup": "atlas"},
])
def test_hook_takes_the_vo_from_the_site_not_the_job_ad(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path, claim: Dict[str, str]
) -> None:
    """Issue 12: with allowed_scopes unset a job ad's AcctGroup / x509UserProxyVOName gave
    it ``storage.create:/atlas/...`` or ``/cms/store/user/victim/...``; now the site's VO."""
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file,
                         extra_site={"allowed_scopes": []})
    out, _ = run_hook(scratch, config, standard_ad(**claim))
    assert out["HookStatusCode"] == 0, out.get("HookStatusMessage")
    claims = jwt.decode((scratch / ".jobtoken" / "bt").read_text().strip(),
                        options={"verify_signature": False})
    assert claims["scope"] == f"storage.create:/dteam/jobs/{JOB_PATH_ID}"
    info = srv.introspect((scratch / ".jobtoken" / "mytoken").read_text())
    assert [r["scope"] for r in info["token"]["restrictions"]] == [claims["scope"]]


@pytest.mark.parametrize("vo", ["atlas", "cms/store/user/victim"])
def test_hook_holds_a_job_vo_the_site_does_not_allow(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path, vo: str
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file,
                         extra_site={"allowed_scopes": [], "job_may_choose_vo": True,
                                     "allowed_vos": ["dteam", "ops"]})
    out, _ = run_hook(scratch, config, standard_ad(x509UserProxyVOName=vo))
    assert out["HookStatusCode"] == 77
    assert "not one the site allows" in out["HookStatusMessage"]
    assert not (scratch / ".jobtoken" / "mytoken").exists()
    out, _ = run_hook(scratch, config, standard_ad(AcctGroup="group_ops.prod"))
    assert out["HookStatusCode"] == 0, out.get("HookStatusMessage")
    claims = jwt.decode((scratch / ".jobtoken" / "bt").read_text().strip(),
                        options={"verify_signature": False})
    assert claims["scope"] == f"storage.create:/ops/jobs/{JOB_PATH_ID}"


def test_hook_path_without_allowed_scopes_may_only_narrow(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file,
                         extra_site={"allowed_scopes": []})
    out, _ = run_hook(scratch, config, standard_ad(JobtokenPath="/atlas/jobs/x"))
    assert out["HookStatusCode"] == 77
    assert "wider than the site allows" in out["HookStatusMessage"]
    assert not (scratch / ".jobtoken" / "mytoken").exists()


def test_hook_holds_when_parent_lacks_create_mytoken(
    srv: DevServer, scratch: Path, tmp_path: Path
) -> None:
    parent = write_secret(tmp_path / "at-only", srv.issue_mytoken(capabilities=["AT"]))
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent)
    out, _ = run_hook(scratch, config, standard_ad())
    assert out["HookStatusCode"] == 77


def test_hook_holds_when_parent_revoked(srv: DevServer, scratch: Path, tmp_path: Path) -> None:
    from jobtoken._mytoken import MytokenClient

    mt = srv.issue_mytoken(capabilities=["AT", "create_mytoken"])
    with MytokenClient(srv.url, allow_http=True) as client:
        client.revoke(mt)
    config = toml_config(
        tmp_path / "site.toml", server=srv.url, parent=write_secret(tmp_path / "revoked", mt)
    )
    out, _ = run_hook(scratch, config, standard_ad())
    assert out["HookStatusCode"] == 77


def test_hook_requeues_when_server_down(parent_file: Path, scratch: Path, tmp_path: Path) -> None:
    config = toml_config(
        tmp_path / "site.toml", server=closed_port_url(), parent=parent_file, timeout_s=2.0
    )
    out, _ = run_hook(scratch, config, standard_ad())
    assert out["HookStatusCode"] == 375  # requeue, not hold
    assert "Environment" not in out


def test_hook_requeues_at_its_deadline(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path
) -> None:
    srv.faults.add(endpoint="my", delay_s=5.0, count=1)
    try:
        config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
        out, _ = run_hook(scratch, config, standard_ad(), args=("--deadline", "1"))
    finally:
        srv.faults.clear()
    assert out["HookStatusCode"] >= 300
    assert "gave up after 1 s" in out["HookStatusMessage"]


def test_hook_holds_on_unwritable_scratch(
    parent_file: Path, srv: DevServer, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "scratch-is-a-file"
    not_a_dir.write_text("x")
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    out, _ = run_hook(not_a_dir, config, standard_ad())
    assert out["HookStatusCode"] == 74
    assert "token directory" in out["HookStatusMessage"]


def test_hook_ignores_jobtoken_variables_from_the_job(
    parent_file: Path, srv: DevServer, scratch: Path, tmp_path: Path
) -> None:
    # a job must not redirect the site's mytoken to a server of its choice
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    out, _ = run_hook(
        scratch,
        config,
        standard_ad(),
        env={"JOBTOKEN_SERVER": closed_port_url(), "JOBTOKEN_CONFIG": "/nope"},
    )
    assert out["HookStatusCode"] == 0


# --- pure parts ----------------------------------------------------------------------------


def test_read_job_ad_refuses_truncated_ads() -> None:
    with pytest.raises(ConfigError, match="read 1 of 2 lines"):
        read_job_ad("A = 1\nB = = 2\n")


def test_job_request_walltime_units_and_vo() -> None:
    ad = read_job_ad(
        job_ad_text(
            GlobalJobId="a#1.0#2",
            MaxWallTimeMins=2,
            AcctGroup="group_atlas.prod",
            JobtokenPath="/atlas/user/x",
        )
    )
    request = job_request_from_ad(ad)
    assert request.job.walltime_s == 120.0 and request.walltime_source == "MaxWallTimeMins"
    assert request.job.vo == "atlas"
    assert request.job.scopes == ("storage.create:/atlas/user/x",)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", ".hidden"])
def test_job_request_refuses_mytoken_paths(name: str) -> None:
    ad = read_job_ad(job_ad_text(GlobalJobId="a#1.0#2", JobtokenMytokenFile=name))
    with pytest.raises(ConfigError):
        job_request_from_ad(ad)


def test_status_codes() -> None:
    assert hook_status_code(ServerUnavailableError("down")) == 375
    assert hook_status_code(MytokenRejectedError("no")) == 77
    assert hook_status_code(ConfigError("bad")) == 78
    assert hook_status_code(RuntimeError("bug")) == 1


# --- exit hook and Chirp ---------------------------------------------------------------------


def test_exit_hook_revokes_and_removes_files(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    out, _ = run_hook(scratch, config, standard_ad())
    assert out["HookStatusCode"] == 0
    job_mt = (scratch / ".jobtoken" / "mytoken").read_text()
    proc = subprocess.run(
        [condor_script("jobtoken-exit-hook"), "exit"],
        input="",
        capture_output=True,
        text=True,
        env=base_env(_CONDOR_SCRATCH_DIR=str(scratch)),
        cwd=scratch,
        timeout=40,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (scratch / ".jobtoken" / "mytoken").exists()
    assert not (scratch / ".jobtoken" / "bt").exists()
    from jobtoken._mytoken import MytokenClient

    with MytokenClient(srv.url, allow_http=True) as client, pytest.raises(MytokenRejectedError):
        client.get_access_token(job_mt)


def test_exit_hook_is_bounded_when_server_hangs(
    srv: DevServer, parent_file: Path, scratch: Path, tmp_path: Path
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    run_hook(scratch, config, standard_ad())
    srv.faults.add(endpoint="revoke", delay_s=30.0)
    try:
        revoked = run_exit_hook({"_CONDOR_SCRATCH_DIR": str(scratch)}, timeout_s=2.0)
    finally:
        srv.faults.clear()
    assert revoked is False
    assert not (scratch / ".jobtoken" / "mytoken").exists()


def test_publish_chirp_sends_delayed_attributes(tmp_path: Path, mocker: Any) -> None:
    tokendir = TokenDir.create(tmp_path / "tok")
    tokendir.write_state(
        RenewalState(job_id="j", expires_at=1_800_000_123.7, renewals=4, consecutive_failures=2)
    )
    chirp = mocker.MagicMock()
    factory = mocker.MagicMock(return_value=chirp)
    chirp.__enter__.return_value = chirp
    sent = publish_chirp(tokendir, chirp_factory=factory)
    calls = {c.args[0]: c.args[1] for c in chirp.set_job_attr_delayed.call_args_list}
    assert calls == sent
    assert set(calls) <= set(CHIRP_ATTRIBUTES)
    assert all(name.startswith("Chirp") for name in calls)
    assert calls["ChirpJobtokenExpiry"] == "1800000123"
    assert calls["ChirpJobtokenRenewals"] == "4" and calls["ChirpJobtokenFailures"] == "2"
    assert classad2.ExprTree(calls["ChirpJobtokenCredentialLost"]).eval() is False
    chirp.set_job_attr.assert_not_called()  # the non-delayed form needs want_io_proxy


def test_publish_chirp_is_best_effort(tmp_path: Path, mocker: Any) -> None:
    tokendir = TokenDir.create(tmp_path / "tok")
    tokendir.write_state(RenewalState(job_id="j", expires_at=1.0))
    broken = mocker.MagicMock(side_effect=OSError("connection refused"))
    assert publish_chirp(tokendir, chirp_factory=broken) == {}
    missing = mocker.MagicMock(side_effect=ValueError(".chirp.config must be present"))
    assert publish_chirp(tokendir, chirp_factory=missing) == {}


# --- issue 9: opt-in, handles, wall time, Chirp bindings, containers, audit, stdin -----------


def test_credentials_with_a_handle_are_found_by_their_file_name() -> None:
    from jobtoken.integrations.condor import credential_files

    assert credential_files(("scitokens", "jobtoken*out"), "jobtoken") == ("jobtoken_out.use",)
    assert credential_files(("jobtoken",), "jobtoken") == ("jobtoken.use",)
    assert credential_files(("jobtokenx", "other*jobtoken"), "jobtoken") == ()


def test_hook_uses_the_handle_credential_not_the_site_robot(
    srv: DevServer, scratch: Path, tmp_path: Path, parent_file: Path
) -> None:
    creds = job_credential(srv, scratch, "jobtoken_out.use", "bare")
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    ad = standard_ad(JobtokenScope="storage.create:/dteam", OAuthServicesNeeded="jobtoken*out")
    out, proc = run_hook(scratch, config, ad, env={"_CONDOR_CREDS": str(creds)})
    assert out["HookStatusCode"] == 0, out.get("HookStatusMessage")
    assert "source=$_CONDOR_CREDS/jobtoken_out.use" in proc.stderr


def test_hook_holds_when_the_asked_credential_is_missing_despite_a_robot(
    srv: DevServer, scratch: Path, tmp_path: Path, parent_file: Path
) -> None:
    creds = scratch.parent / ".condor_creds"
    creds.mkdir(mode=0o755)
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    ad = standard_ad(OAuthServicesNeeded="jobtoken*out")
    out, _ = run_hook(scratch, config, ad, env={"_CONDOR_CREDS": str(creds)})
    assert out["HookStatusCode"] == 78
    assert "jobtoken_out.use" in out["HookStatusMessage"]
    assert not (scratch / ".jobtoken" / "mytoken").exists()


@pytest.mark.parametrize(
    "attrs, seconds, source",
    [
        ({"AllowedJobDuration": 7200}, 7200.0, "AllowedJobDuration"),
        ({"AllowedJobDuration": 7200, "AllowedExecuteDuration": 3600}, 3600.0,
         "AllowedExecuteDuration"),
        ({"AllowedJobDuration": 600, "MaxWallTimeMins": 240}, 600.0, "AllowedJobDuration"),
        ({"MaxWallTimeMins": 240}, 14400.0, "MaxWallTimeMins"),
        ({"BatchRuntime": 99, "MaxRuntime": 99}, None, None),
    ],
)
def test_wall_time_from_htcondor_limits_before_conventions(
    attrs: Dict[str, Any], seconds: Optional[float], source: Optional[str]
) -> None:
    from jobtoken.integrations.condor import job_walltime

    ad = read_job_ad(job_ad_text(GlobalJobId="a#1.0#2", **attrs))
    assert job_walltime(ad) == (seconds, source)


def test_site_maximum_caps_the_wall_time() -> None:
    from jobtoken._config import Config, SiteConfig
    from jobtoken._prepare import JobFacts, walltime_for

    config = Config(site=SiteConfig(default_walltime_s=600.0, max_walltime_s=3600.0))
    assert walltime_for(JobFacts("j", walltime_s=10 * 86400.0), config) == 3600.0
    assert walltime_for(JobFacts("j", walltime_s=1200.0), config) == 1200.0
    assert walltime_for(JobFacts("j"), config) == 600.0


@pytest.mark.parametrize(
    "attrs",
    [{"WantDocker": True, "DockerImage": "alpine"}, {"ContainerImage": "x.sif"},
     {"SingularityImage": "/cvmfs/x"}],
)
def test_hook_refuses_container_jobs_clearly(
    srv: DevServer, scratch: Path, tmp_path: Path, parent_file: Path, attrs: Dict[str, Any]
) -> None:
    config = toml_config(tmp_path / "site.toml", server=srv.url, parent=parent_file)
    out, _ = run_hook(scratch, config, standard_ad(**attrs))
    assert out["HookStatusCode"] == 78
    docker = "DockerImage" in attrs
    assert ("needs the node broker" if docker else "not supported") in out["HookStatusMessage"]
    assert not (scratch / ".jobtoken").exists()


def test_chirp_uses_the_23x_bindings_when_htcondor2_has_no_htchirp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys
    import types

    from jobtoken.integrations import condor

    old_style = types.ModuleType("htcondor.htchirp")
    old_style.HTChirp = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "htcondor2.htchirp", None)  # as in 23.x
    monkeypatch.setitem(sys.modules, "htcondor.htchirp", old_style)
    monkeypatch.setitem(sys.modules, "htcondor", types.ModuleType("htcondor"))
    assert condor.chirp_client_class() is object
    monkeypatch.setitem(sys.modules, "htcondor.htchirp", None)
    assert condor.chirp_client_class() is None
    tokendir = TokenDir.create(tmp_path / "tok")
    tokendir.write_state(RenewalState(job_id="j", expires_at=1.0))
    with caplog.at_level("WARNING", logger="jobtoken"):
        assert publish_chirp(tokendir) == {}
        assert publish_chirp(tokendir) == {}
    assert [r.message for r in caplog.records].count(
        next(r.message for r in caplog.records if "chirp unavailable" in r.message)) == 1


def test_audit_log_knob_and_file(tmp_path: Path) -> None:
    import logging

    from jobtoken.integrations.condor import (
        DEFAULT_AUDIT_DIR,
        attach_audit_log,
        audit_log_dir,
    )

    assert audit_log_dir(lambda name: None) == DEFAULT_AUDIT_DIR
    assert audit_log_dir(lambda name: "none") is None
    assert audit_log_dir(lambda name: str(tmp_path)) == str(tmp_path)
    logging.getLogger("jobtoken").setLevel(logging.INFO)  # as the hooks set it
    handler = attach_audit_log("prepare-hook", str(tmp_path))
    assert handler is not None
    try:
        logging.getLogger("jobtoken.integrations.condor").info("job mytoken minted job=x")
    finally:
        logging.getLogger("jobtoken").removeHandler(handler)
        handler.close()
    (path,) = tmp_path.iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    line = path.read_text()
    assert "prepare-hook" in line and "job mytoken minted job=x" in line


@pytest.mark.parametrize("hook", ["jobtoken-update-hook", "jobtoken-exit-hook"])
def test_hooks_read_the_job_ad_to_its_end(scratch: Path, hook: str) -> None:
    """The starter writes the whole ad; a hook that closes stdin first makes it log EPIPE."""
    ad = job_ad_text(GlobalJobId="a#1.0#2", Big="x" * 1_000_000)
    proc = subprocess.Popen(
        [condor_script(hook)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env=base_env(_CONDOR_SCRATCH_DIR=str(scratch)), cwd=scratch,
    )
    assert proc.stdin is not None
    proc.stdin.write(ad.encode())  # BrokenPipeError if the hook did not read it all
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
