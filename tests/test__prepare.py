"""`prepare`: the job mytoken is the least the job needs, checked, and nothing is lost."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import jwt
import pytest

from jobtoken._config import Config, SiteConfig
from jobtoken._errors import (
    ConfigError,
    MytokenRejectedError,
    ProtocolError,
    ServerUnavailableError,
)
from jobtoken._prepare import JobFacts, job_scopes, prepare_job
from jobtoken._tokenfile import write_secret_file
from jobtoken.devserver import DevServer, DevServerConfig
from tests.fakes import ShiftedClock
from tests.runhelpers import AUD, job_config

OP_SCOPES = ("storage.read:/", "storage.create:/")


@pytest.fixture()
def srv() -> Iterator[DevServer]:
    with DevServer(DevServerConfig(at_lifetime_s=1200, op_scopes=OP_SCOPES,
                                   default_audience=AUD)) as server:
        yield server


def parent_file(srv: DevServer, tmp_path: Path, **kw: Any) -> Path:
    p = tmp_path / "parent.mt"
    kw.setdefault("capabilities", ["AT", "create_mytoken", "tokeninfo"])
    write_secret_file(p, srv.issue_mytoken(**kw), newline=False)
    return p


def config(srv: DevServer, parent: Path, **site: Any) -> Config:
    cfg = job_config(srv, parent, lifetime_s=1200)
    return dataclasses.replace(cfg, site=dataclasses.replace(cfg.site, **site))


def test_job_mytoken_is_minimal_and_checked(srv: DevServer, tmp_path: Path) -> None:
    parent = parent_file(srv, tmp_path)
    before = parent.read_bytes()
    start = time.time()
    job = prepare_job(config(srv, parent), JobFacts(job_id="ce#12.0#17", walltime_s=3600),
                      directory=str(tmp_path / "job"))
    info = srv.introspect(job.tokendir.mytoken.read_text())
    token = info["token"]
    assert token["capabilities"] == ["AT"]
    [entry] = token["restrictions"]
    assert entry["scope"] == "storage.create:/vo/jobs/ce_12.0_17"  # '#' is not URL-path safe
    assert entry["audience"] == [AUD]
    assert start + 3600 < entry["exp"] <= time.time() + 3600 + 1800 + 1
    assert entry["usages_AT"] >= 3600 / 1200 + 1
    assert job.token.scopes == ("storage.create:/vo/jobs/ce_12.0_17",)
    assert (job.tokendir.bearer_token.stat().st_mode & 0o777) == 0o600
    assert (job.tokendir.mytoken.stat().st_mode & 0o777) == 0o600
    assert (job.tokendir.path.stat().st_mode & 0o777) == 0o700
    assert job.environment() == {"BEARER_TOKEN_FILE": str(job.tokendir.bearer_token),
                                 "JOBTOKEN_DIR": str(job.tokendir.path)}
    assert parent.read_bytes() == before  # the parent stays where it was, unchanged


def test_job_may_narrow_but_not_widen(srv: DevServer, tmp_path: Path) -> None:
    parent = parent_file(srv, tmp_path)
    cfg = config(srv, parent)
    narrow = JobFacts(job_id="1", scopes=("storage.create:/vo/jobs/1/out",))
    assert job_scopes(narrow, cfg) == ("storage.create:/vo/jobs/1/out",)
    for wider in ("storage.modify:/vo/jobs/1", "storage.create:/vox", "storage.create:/"):
        with pytest.raises(MytokenRejectedError, match="wider than the site allows"):
            prepare_job(cfg, JobFacts(job_id="1", scopes=(wider,)),
                        directory=str(tmp_path / "j"))
    assert srv.requests("my") == ()  # refused before asking the server


def test_audience_outside_the_site_list_is_refused(srv: DevServer, tmp_path: Path) -> None:
    cfg = config(srv, parent_file(srv, tmp_path))
    with pytest.raises(MytokenRejectedError, match="audience"):
        prepare_job(cfg, JobFacts(job_id="1", audiences=("https://evil.example.org",)),
                    directory=str(tmp_path / "j"))


def test_template_needs_a_vo(srv: DevServer, tmp_path: Path) -> None:
    cfg = config(srv, parent_file(srv, tmp_path), vo=None)
    with pytest.raises(ConfigError, match="left a value empty"):
        job_scopes(JobFacts(job_id="1"), cfg)
    cfg = config(srv, parent_file(srv, tmp_path), scope_templates=("storage.create:/{nope}",))
    with pytest.raises(ConfigError, match="unknown field"):
        job_scopes(JobFacts(job_id="1"), cfg)


def test_parent_without_create_mytoken(srv: DevServer, tmp_path: Path) -> None:
    parent = parent_file(srv, tmp_path, capabilities=["AT"])
    with pytest.raises(MytokenRejectedError, match="insufficient_capabilities"):
        prepare_job(config(srv, parent), JobFacts(job_id="1"), directory=str(tmp_path / "j"))
    assert not (tmp_path / "j" / "mytoken").exists()


def test_revoked_parent(srv: DevServer, tmp_path: Path) -> None:
    parent = parent_file(srv, tmp_path)
    httpx.post(f"{srv.url}/api/v0/token/revoke",
               json={"token": parent.read_text()}).raise_for_status()
    with pytest.raises(MytokenRejectedError) as info:
        prepare_job(config(srv, parent), JobFacts(job_id="1"), directory=str(tmp_path / "j"))
    assert not info.value.retryable


def test_server_down_is_transient(srv: DevServer, tmp_path: Path) -> None:
    srv.faults.add("my", status=503)
    with pytest.raises(ServerUnavailableError) as info:
        prepare_job(config(srv, parent_file(srv, tmp_path)), JobFacts(job_id="1"),
                    directory=str(tmp_path / "j"))
    assert info.value.retryable


def test_parent_scope_string_cannot_be_narrowed_by_path(srv: DevServer, tmp_path: Path) -> None:
    # Mytoken matches restriction scopes as exact strings (reference fact 6)
    parent = parent_file(srv, tmp_path, restrictions=[{"scope": "storage.create:/vo"}])
    with pytest.raises(MytokenRejectedError):
        prepare_job(config(srv, parent), JobFacts(job_id="1"), directory=str(tmp_path / "j"))


def test_rotated_parent_is_saved(srv: DevServer, tmp_path: Path) -> None:
    parent = parent_file(srv, tmp_path, rotation={"on_other": True})
    first = parent.read_text()
    prepare_job(config(srv, parent), JobFacts(job_id="1"), directory=str(tmp_path / "j"))
    second = parent.read_text()
    assert second != first and srv.introspect(second)["valid"] is True


def test_job_mytoken_capped_at_parent_expiry(srv: DevServer, tmp_path: Path) -> None:
    parent = parent_file(srv, tmp_path, restrictions=[{"exp": int(time.time()) + 1800}])
    job = prepare_job(config(srv, parent), JobFacts(job_id="1", walltime_s=86400),
                      directory=str(tmp_path / "j"))
    parent_exp = jwt.decode(parent.read_text(), options={"verify_signature": False})["exp"]
    [entry] = srv.introspect(job.tokendir.mytoken.read_text())["token"]["restrictions"]
    assert entry["exp"] <= parent_exp


def test_parent_expiring_within_minutes_is_refused(srv: DevServer, tmp_path: Path) -> None:
    parent = parent_file(srv, tmp_path, restrictions=[{"exp": int(time.time()) + 60}])
    with pytest.raises(MytokenRejectedError, match="too soon"):
        prepare_job(config(srv, parent), JobFacts(job_id="1"), directory=str(tmp_path / "j"))


def test_widened_job_mytoken_is_revoked_and_refused(srv: DevServer, tmp_path: Path,
                                                    mocker) -> None:
    from jobtoken import _mytoken

    real = _mytoken.MytokenClient.create_mytoken

    def widen(self: Any, *args: Any, **kw: Any) -> Any:
        result = real(self, *args, **kw)
        return dataclasses.replace(result, capabilities=("AT", "create_mytoken"))

    mocker.patch.object(_mytoken.MytokenClient, "create_mytoken", widen)
    with pytest.raises(ProtocolError, match="capabilities"):
        prepare_job(config(srv, parent_file(srv, tmp_path)), JobFacts(job_id="1"),
                    directory=str(tmp_path / "j"))
    assert len(srv.requests("revoke")) == 1
    assert not (tmp_path / "j" / "mytoken").exists()


def test_bad_first_token_revokes_the_job_mytoken(srv: DevServer, tmp_path: Path) -> None:
    srv.faults.add("access", token="wider_scope")
    from jobtoken._errors import TokenCheckError

    with pytest.raises(TokenCheckError):
        prepare_job(config(srv, parent_file(srv, tmp_path)), JobFacts(job_id="1"),
                    directory=str(tmp_path / "j"))
    assert len(srv.requests("revoke")) == 1
    assert not (tmp_path / "j" / "mytoken").exists() and not (tmp_path / "j" / "bt").exists()


def test_unwritable_directory(srv: DevServer, tmp_path: Path) -> None:
    from jobtoken._errors import TokenFileError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TokenFileError):
        prepare_job(config(srv, parent_file(srv, tmp_path)), JobFacts(job_id="1"),
                    directory=str(blocker / "job"))
    assert srv.requests("my") == ()


def test_no_parent_configured(srv: DevServer, tmp_path: Path) -> None:
    cfg = Config(site=SiteConfig(vo="vo"))
    with pytest.raises(ConfigError, match="no parent mytoken"):
        prepare_job(cfg, JobFacts(job_id="1"), directory=str(tmp_path / "j"))


def _live_children(srv: DevServer, parent: Path) -> list:
    tree = httpx.post(f"{srv.url}/api/v0/tokeninfo",
                      json={"action": "subtokens", "mytoken": parent.read_text()}).json()
    return [c["token"]["name"] for c in tree["mytokens"].get("children", [])]


def test_job_mytoken_whose_answer_was_lost_is_revoked(srv: DevServer, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    parent = parent_file(srv, tmp_path)
    srv.faults.add("my", drop=True, process=True)  # minted, then the connection died
    caplog.set_level("INFO", logger="jobtoken")
    with pytest.raises(ServerUnavailableError) as info:
        prepare_job(config(srv, parent), JobFacts(job_id="7"), directory=str(tmp_path / "j"))
    assert info.value.retryable
    assert _live_children(srv, parent) == []
    assert len(srv.requests("my")) == 1  # never minted twice
    assert "revoked mytoken 'jobtoken 7'" in caplog.text


def test_lost_answer_reaping_spares_other_jobs_and_old_runs(tmp_path: Path) -> None:
    clock = ShiftedClock(-600.0)  # the earlier run of job 7 was ten minutes ago
    with DevServer(DevServerConfig(at_lifetime_s=1200, op_scopes=OP_SCOPES,
                                   default_audience=AUD), clock=clock) as srv:
        parent = parent_file(srv, tmp_path)
        prepare_job(config(srv, parent), JobFacts(job_id="7"), directory=str(tmp_path / "old"))
        clock.offset_s = 0.0
        prepare_job(config(srv, parent), JobFacts(job_id="8"), directory=str(tmp_path / "other"))
        srv.faults.add("my", drop=True, process=True)
        with pytest.raises(ServerUnavailableError):
            prepare_job(config(srv, parent), JobFacts(job_id="7"), directory=str(tmp_path / "j"))
        assert sorted(_live_children(srv, parent)) == ["jobtoken 7", "jobtoken 8"]
        # the job 7 left alive is the earlier run's; the lost one was revoked
        assert srv.introspect((tmp_path / "old" / "mytoken").read_text())["valid"] is True
        assert len(srv.requests("revoke")) == 1


@pytest.mark.parametrize("fault", [dict(status=503), dict(status=429, retry_after_s=5)])
def test_a_refusal_is_not_searched_for_lost_mytokens(srv: DevServer, tmp_path: Path,
                                                     fault: dict) -> None:
    # the server answered before minting: no listing, no extra load on a busy server
    srv.faults.add("my", **fault)
    with pytest.raises(ServerUnavailableError):
        prepare_job(config(srv, parent_file(srv, tmp_path)), JobFacts(job_id="1"),
                    directory=str(tmp_path / "j"))
    assert srv.requests("tokeninfo") == ()


def test_parent_without_subtokens_capability_keeps_the_first_error(
    srv: DevServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parent = parent_file(srv, tmp_path, capabilities=["AT", "create_mytoken"])
    srv.faults.add("my", drop=True, process=True)
    with pytest.raises(ServerUnavailableError) as info:
        prepare_job(config(srv, parent), JobFacts(job_id="1"), directory=str(tmp_path / "j"))
    assert "mytoken creation failed" in info.value.message
    assert "stays valid until it expires" in caplog.text
    assert "insufficient_capabilities" in caplog.text


def test_a_slow_server_cannot_keep_prepare_alive_and_the_job_mytoken_is_revoked(
    srv: DevServer, tmp_path: Path
) -> None:
    # issue 12 item 7: the first access token request hangs past the overall deadline
    parent = parent_file(srv, tmp_path)
    cfg = config(srv, parent)
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, deadline_s=1.5))
    srv.faults.add("access", delay_s=4.0)
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError):
        prepare_job(cfg, JobFacts(job_id="9"), directory=str(tmp_path / "j"))
    assert time.monotonic() - started < 4.0
    assert len(srv.requests("revoke")) == 1
    assert _live_children(srv, parent) == []
    assert not (tmp_path / "j" / "mytoken").exists()


def _minted_entry(srv: DevServer, job: Any) -> dict:
    [entry] = srv.introspect(job.tokendir.mytoken.read_text())["token"]["restrictions"]
    return entry


def test_site_maxima_bound_a_job_that_asks_for_a_year(srv: DevServer, tmp_path: Path) -> None:
    # issue 12 item 3: MaxWallTimeMins=5256000 gave a 365-day job mytoken, usages_AT 11.6 M
    parent = parent_file(srv, tmp_path)
    cfg = config(srv, parent, max_walltime_s=2 * 86400.0, max_usages_at=50,
                 max_mytoken_lifetime_s=86400.0)
    start = time.time()
    job = prepare_job(cfg, JobFacts(job_id="1", walltime_s=365 * 86400.0),
                      directory=str(tmp_path / "job"))
    entry = _minted_entry(srv, job)
    assert entry["usages_AT"] == 50
    assert entry["exp"] <= time.time() + 86400 + 1
    assert entry["exp"] >= start + 86400 - 1


def test_a_server_maximum_lifetime_caps_the_job_mytoken_instead_of_failing(
    tmp_path: Path, caplog: Any
) -> None:
    # the real server refuses with 400 "requested restrictions do not respect maximum
    # mytoken lifetime" under error_on_restrictions: cap and go on, never fail the job
    with DevServer(DevServerConfig(at_lifetime_s=1200, op_scopes=OP_SCOPES, default_audience=AUD,
                                   max_mytoken_lifetime_s=7200)) as server:
        parent = parent_file(server, tmp_path)
        job = prepare_job(config(server, parent), JobFacts(job_id="1", walltime_s=86400),
                          directory=str(tmp_path / "job"))
        entry = _minted_entry(server, job)
        assert entry["exp"] <= time.time() + 7200 + 1
        assert entry["scope"] == "storage.create:/vo/jobs/1"
        assert entry["audience"] == [AUD]
        assert [r.status for r in server.requests("my")] == [400, 200]
    assert "site.max_mytoken_lifetime_s" in caplog.text


def test_a_site_maximum_lifetime_asks_the_server_nothing_it_refuses(tmp_path: Path) -> None:
    with DevServer(DevServerConfig(at_lifetime_s=1200, op_scopes=OP_SCOPES, default_audience=AUD,
                                   max_mytoken_lifetime_s=7200)) as server:
        parent = parent_file(server, tmp_path)
        prepare_job(config(server, parent, max_mytoken_lifetime_s=3600.0),
                    JobFacts(job_id="1", walltime_s=86400), directory=str(tmp_path / "job"))
        assert [r.status for r in server.requests("my")] == [200]


# --- issue 12 item 4: the VO and the path come from the site, never from the job ---

SITE_TEMPLATE = ("storage.create:/{vo}/jobs/{job_id}",)


def site_only(**site: Any) -> Config:
    site.setdefault("scope_templates", SITE_TEMPLATE)
    return Config(site=SiteConfig(**site))


@pytest.mark.parametrize("claimed", ["atlas", "cms/store/user/victim", "..", "dteam/../atlas"])
def test_the_job_cannot_choose_the_vo_by_default(claimed: str) -> None:
    """A job ad's x509UserProxyVOName / AcctGroup is the submitter's word: ignored."""
    cfg = site_only(vo="dteam")
    assert job_scopes(JobFacts(job_id="7", vo=claimed), cfg) == ("storage.create:/dteam/jobs/7",)


def test_without_site_vo_the_job_vo_is_not_used() -> None:
    with pytest.raises(ConfigError, match="set site.vo"):
        job_scopes(JobFacts(job_id="7", vo="atlas"), site_only())


def test_a_site_that_lets_jobs_choose_allows_only_its_list() -> None:
    cfg = site_only(vo="dteam", job_may_choose_vo=True, allowed_vos=("dteam", "ops"))
    assert job_scopes(JobFacts(job_id="7", vo="ops"), cfg) == ("storage.create:/ops/jobs/7",)
    assert job_scopes(JobFacts(job_id="7"), cfg) == ("storage.create:/dteam/jobs/7",)
    for claimed in ("atlas", "cms/store/user/victim", "..", "ops/../atlas"):
        with pytest.raises(MytokenRejectedError, match="not one the site allows"):
            job_scopes(JobFacts(job_id="7", vo=claimed), cfg)
    nolist = site_only(vo="dteam", job_may_choose_vo=True)
    with pytest.raises(MytokenRejectedError, match="allowed_vos: none"):
        job_scopes(JobFacts(job_id="7", vo="atlas"), nolist)


def test_a_chosen_vo_still_has_to_be_within_allowed_scopes() -> None:
    cfg = site_only(vo="dteam", job_may_choose_vo=True, allowed_vos=("ops",),
                    allowed_scopes=("storage.create:/dteam/jobs",))
    with pytest.raises(MytokenRejectedError, match="wider than the site allows"):
        job_scopes(JobFacts(job_id="7", vo="ops"), cfg)


@pytest.mark.parametrize("vo", ["cms/store/user/victim", "..", ".", "a b", "vo:x", ""])
def test_a_site_vo_that_is_not_a_plain_name_is_a_config_error(vo: str) -> None:
    with pytest.raises(ConfigError):
        job_scopes(JobFacts(job_id="7"), site_only(vo=vo))


@pytest.mark.parametrize("job_id, component", [
    ("ce#12.0#17", "ce_12.0_17"), ("../../atlas", "_._.._atlas"), ("..", "_."),
    ("a/b", "a_b"), (".hidden", "_hidden"),
])
def test_a_job_id_is_mapped_to_one_safe_component(job_id: str, component: str) -> None:
    [scope] = job_scopes(JobFacts(job_id=job_id), site_only(vo="dteam"))
    assert scope == f"storage.create:/dteam/jobs/{component}"


def test_an_owner_unsafe_in_a_path_holds_the_job() -> None:
    cfg = site_only(vo="dteam", scope_templates=("storage.create:/{vo}/user/{owner}",))
    assert job_scopes(JobFacts(job_id="7", owner="alice"), cfg) == (
        "storage.create:/dteam/user/alice",)
    with pytest.raises(MytokenRejectedError, match="cannot be part of a scope path"):
        job_scopes(JobFacts(job_id="7", owner="../victim"), cfg)


def test_without_allowed_scopes_a_job_only_narrows_its_templates() -> None:
    """Unset site.allowed_scopes: the templates are the limit (narrow yes, widen no)."""
    cfg = site_only(vo="dteam")
    narrow = JobFacts(job_id="7", scopes=("storage.create:/dteam/jobs/7/out",))
    assert job_scopes(narrow, cfg) == ("storage.create:/dteam/jobs/7/out",)
    for wider in ("storage.create:/dteam/jobs", "storage.create:/atlas/jobs/7",
                  "storage.modify:/dteam/jobs/7", "storage.create:/dteam/jobs/8"):
        with pytest.raises(MytokenRejectedError, match="wider than the site allows"):
            job_scopes(JobFacts(job_id="7", scopes=(wider,)), cfg)
