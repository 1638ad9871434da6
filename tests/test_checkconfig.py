"""`jobtoken check-config`: one line per check, Nagios exit codes, never a secret.

The judgements are pure and tested with tables; the command runs as a real process against
the dev server, with the real HTCondor bindings reading a test configuration
(``CONDOR_CONFIG``) and an arc.conf in a temporary directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from jobtoken import _checkconfig
from jobtoken._checkconfig import (
    judge_config,
    judge_file,
    judge_no_parent,
    judge_parent_claims,
    judge_server,
)
from jobtoken._config import BrokerConfig, Config, SiteConfig
from jobtoken._mytoken import ServerMetadata
from jobtoken._policy import Health
from jobtoken.devserver import DevServer, DevServerConfig
from tests.prerequisites import need
from tests.runhelpers import ROOT, jobtoken_argv, run

NOW = 1_800_000_000.0
SITE = SiteConfig(max_walltime_s=7 * 86400)


class _St:
    def __init__(self, mode: int, uid: int = 0) -> None:
        self.st_mode, self.st_uid = mode, uid


@pytest.mark.parametrize(
    ("mode", "uid", "link", "secret", "health", "text"),
    [
        (stat.S_IFREG | 0o600, 0, False, True, Health.OK, "mode 0600"),
        (stat.S_IFREG | 0o400, 0, False, True, Health.OK, "mode 0400"),
        (stat.S_IFREG | 0o640, 0, False, True, Health.WARNING, "group-readable"),
        (stat.S_IFREG | 0o644, 0, False, True, Health.CRITICAL, "every local user can read"),
        (stat.S_IFREG | 0o620, 0, False, True, Health.CRITICAL, "mode 0620"),
        (stat.S_IFREG | 0o600, 54321, False, True, Health.CRITICAL, "owned by uid 54321"),
        (stat.S_IFLNK | 0o777, 0, True, True, Health.CRITICAL, "is a symlink"),
        (stat.S_IFDIR | 0o700, 0, False, True, Health.CRITICAL, "not a regular file"),
        (stat.S_IFREG | 0o755, 0, False, False, Health.OK, "mode 0755"),
        (stat.S_IFREG | 0o775, 0, False, False, Health.CRITICAL, "others may change"),
        (stat.S_IFREG | 0o644, 0, False, False, Health.CRITICAL, "not executable"),
    ],
)
def test_judge_file(mode: int, uid: int, link: bool, secret: bool, health: Health,
                    text: str) -> None:
    [check] = judge_file("f", "/x/f", _St(mode, uid), link=link, euid=0,  # type: ignore[arg-type]
                         secret=secret)
    assert check.health is health and text in check.line()
    assert check.health is Health.OK or " - " in check.line()  # a next step when not OK


def _parent(**claims: Any) -> Dict[str, Any]:
    base: Dict[str, Any] = {"capabilities": ["AT", "create_mytoken", "tokeninfo"],
                            "exp": NOW + 30 * 86400}
    base.update(claims)
    return base


@pytest.mark.parametrize(
    ("claims", "worst", "text"),
    [
        (_parent(), Health.OK, "expires in 30 d"),
        ({"capabilities": ["AT", "create_mytoken", "tokeninfo"]}, Health.OK, "does not expire"),
        (_parent(capabilities=["AT", "tokeninfo"]), Health.CRITICAL,
         "lacks capabilities create_mytoken"),
        (_parent(capabilities=["AT", "create_mytoken"]), Health.WARNING, "lacks capability "
         "tokeninfo"),
        (_parent(capabilities=["AT", "create_mytoken", "tokeninfo:subtokens"]), Health.OK, "has"),
        (_parent(exp=NOW - 10), Health.CRITICAL, "expired 10 s ago"),
        (_parent(exp=NOW + 100), Health.CRITICAL, "too soon"),
        (_parent(exp=NOW + 86400), Health.WARNING, "before a job of site.max_walltime_s"),
        (None, Health.WARNING, "opaque"),
    ],
)
def test_judge_parent_claims(claims: Optional[Dict[str, Any]], worst: Health, text: str) -> None:
    checks = judge_parent_claims(claims, NOW, SITE)
    assert max(c.health for c in checks) is worst
    assert any(text in c.line() for c in checks), [c.line() for c in checks]


@pytest.mark.parametrize(
    ("adopt", "label"), [(False, "WARN"), (True, "SKIP")],
)
def test_no_parent_is_normal_only_on_an_adopting_node(adopt: bool, label: str) -> None:
    """An ARC worker node's broker adopts job mytokens minted on the CE: no parent there."""
    check = judge_no_parent("parent mytoken", Config(broker=BrokerConfig(adopt=adopt)))
    assert check.label == label
    assert check.line().startswith(f"{label} parent mytoken: site.parent_mytoken_file is not set")
    assert ("broker.adopt = true" in check.what) is adopt


def _metadata(issuer: str = "https://mt.example.org",
              tokeninfo: Optional[str] = "https://mt.example.org/api/v0/tokeninfo",
              version: Optional[str] = "0.10.2") -> ServerMetadata:
    return ServerMetadata(issuer=issuer, access_token_endpoint=issuer + "/at",
                          mytoken_endpoint=issuer + "/my", revocation_endpoint=None,
                          tokeninfo_endpoint=tokeninfo, jwks_uri=None, version=version, raw={})


@pytest.mark.parametrize(
    ("found", "issuer", "worst", "text"),
    [
        (_metadata(), "https://mt.example.org/", Health.OK, "(Mytoken 0.10.2)"),
        (_metadata(version=None), None, Health.OK, "answers its discovery document"),
        (_metadata(), "https://other.example.org", Health.CRITICAL, "not this server"),
        (_metadata(tokeninfo=None), None, Health.WARNING, "no tokeninfo endpoint"),
    ],
)
def test_judge_server(found: ServerMetadata, issuer: Optional[str], worst: Health,
                      text: str) -> None:
    checks = judge_server("server", "https://mt.example.org", found, issuer)
    assert max(c.health for c in checks) is worst
    assert any(text in c.line() for c in checks), [c.line() for c in checks]


def test_a_default_hook_keyword_jobtoken_fails_whatever_its_case() -> None:
    checks = _checkconfig._judge_default_keywords(
        "htcondor", {"STARTER_DEFAULT_JOB_HOOK_KEYWORD": "jobtoken",
                     "STARTER_JOB_HOOK_KEYWORD": None})
    assert [c.health for c in checks] == [Health.CRITICAL]
    assert "STARTER_DEFAULT_JOB_HOOK_KEYWORD" in checks[0].line()
    assert _checkconfig._judge_default_keywords("htcondor", {"X": "OTHER", "Y": None}) == []


@pytest.mark.parametrize(
    ("hooks_config", "checked", "warned"),
    [("/etc/a.toml", "/etc/b.toml", True), ("/etc/a.toml", "/etc//a.toml", False),
     (None, "/etc/a.toml", False), ("/etc/a.toml", None, False)],
)
def test_hooks_reading_another_config_is_warned_about(
    hooks_config: Optional[str], checked: Optional[str], warned: bool
) -> None:
    checks = _checkconfig._judge_hooks_config("htcondor", hooks_config, checked)
    assert [c.health for c in checks] == ([Health.WARNING] if warned else [])


def test_judge_config_finds_values_that_do_not_fit_together() -> None:
    [ok] = judge_config(Config())
    assert ok.health is Health.OK
    bad = judge_config(Config(site=SiteConfig(default_walltime_s=10.0, max_walltime_s=5.0)))
    assert bad[0].health is Health.CRITICAL and "site.default_walltime_s" in bad[0].what


# --- the command ------------------------------------------------------------------------------


@pytest.fixture()
def node(tmp_path: Path) -> Dict[str, Any]:
    """An empty HTCondor configuration and no arc.conf: a node with neither installed."""
    condor_config = tmp_path / "condor_config"
    condor_config.write_text("LOG = /tmp\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBTOKEN_", "_CONDOR_"))}
    env["CONDOR_CONFIG"] = str(condor_config)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    env["JOBTOKEN_CONFIG"] = str(empty)  # not whatever /etc/jobtoken holds on this machine
    return {"env": env, "condor_config": condor_config, "arc_conf": tmp_path / "arc.conf"}


def _check(node: Dict[str, Any], *args: str) -> Any:
    r = run(jobtoken_argv("check-config", "--arc-conf", str(node["arc_conf"]), *args),
            env=node["env"], timeout=60)
    return r


def _site(tmp_path: Path, srv: DevServer, caps: List[str], extra: str = "") -> Dict[str, Any]:
    parent = tmp_path / "parent.mt"
    mytoken = srv.issue_mytoken(capabilities=caps)
    parent.write_text(mytoken)
    parent.chmod(0o600)
    config = tmp_path / "jobtoken.toml"
    config.write_text(f'[server]\nurl = "{srv.url}"\nallow_http = true\ntimeout_s = 5\n'
                      f'[site]\nparent_mytoken_file = "{parent}"\n{extra}')
    return {"parent": parent, "mytoken": mytoken, "config": config}


def test_a_good_setup_is_all_ok(tmp_path: Path, node: Dict[str, Any]) -> None:
    with DevServer(DevServerConfig()) as srv:
        site = _site(tmp_path, srv, ["AT", "create_mytoken", "tokeninfo"])
        r = _check(node, "--config", str(site["config"]))
        j = _check(node, "--config", str(site["config"]), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert all(line.split()[0] in ("OK", "SKIP") for line in lines), lines
    assert any(line.startswith("OK server: " + srv.url) for line in lines)
    assert any(line.startswith("SKIP htcondor") for line in lines)
    assert any(line.startswith("SKIP arc") for line in lines)
    data = json.loads(j.stdout)
    assert j.returncode == 0 and data["status"] == "OK" and data["exit_code"] == 0
    assert {c["name"] for c in data["checks"]} >= {"config", "parent mytoken", "server"}
    for out in (r.stdout + r.stderr, j.stdout + j.stderr):
        assert site["mytoken"] not in out and site["mytoken"][-20:] not in out


def test_problems_are_named_with_the_next_step(tmp_path: Path, node: Dict[str, Any]) -> None:
    with DevServer(DevServerConfig()) as srv:
        site = _site(tmp_path, srv, ["AT", "create_mytoken"])  # no tokeninfo: WARN
        r = _check(node, "--config", str(site["config"]))
        assert r.returncode == 1 and "WARN parent mytoken: lacks capability tokeninfo" in r.stdout
        site["parent"].chmod(0o644)
        r = _check(node, "--config", str(site["config"]))
        assert r.returncode == 2, r.stdout
        assert "FAIL parent mytoken: " in r.stdout and "chmod 600" in r.stdout
        assert site["mytoken"] not in r.stdout + r.stderr
        site["parent"].chmod(0o600)
        link = tmp_path / "link.mt"
        link.symlink_to(site["parent"])
        r = _check(node, "--config", str(site["config"]), "--parent-mytoken-file", str(link))
        assert r.returncode == 2 and f"FAIL parent mytoken: {link} is a symlink" in r.stdout
    # the server is gone: a FAIL naming it, the other checks still run
    r = _check(node, "--config", str(site["config"]))
    assert r.returncode == 2 and "FAIL server: " in r.stdout and "parent mytoken" in r.stdout


def test_a_broken_config_fails_and_the_other_checks_still_run(
        tmp_path: Path, node: Dict[str, Any]) -> None:
    config = tmp_path / "jobtoken.toml"
    config.write_text('[site]\nparent_mytoken_file = "/nonexistent/mt"\nmax_walltim_s = 5\n')
    r = _check(node, "--config", str(config), "--offline")
    assert r.returncode == 2
    first = r.stdout.splitlines()[0]
    assert first.startswith("FAIL config: ") and "unknown setting site.max_walltim_s" in first
    assert "SKIP server: not asked (--offline)" in r.stdout
    assert "parent mytoken" in r.stdout  # checked with the defaults


def test_paths_the_config_names_are_checked(tmp_path: Path, node: Dict[str, Any]) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir(mode=0o755)
    config = tmp_path / "jobtoken.toml"
    config.write_text(f'[server]\nca_file = "{tmp_path}/nope.pem"\n'
                      f'[renewal]\nmetrics_dir = "{metrics}"\n')
    r = _check(node, "--config", str(config), "--offline")
    assert r.returncode == 2
    assert f"FAIL config: server.ca_file = {tmp_path}/nope.pem does not exist" in r.stdout
    assert f"WARN config: renewal.metrics_dir {metrics} has uid" in r.stdout
    assert "chmod 1777" in r.stdout


def test_htcondor_hooks_are_checked_through_the_real_bindings(
        tmp_path: Path, node: Dict[str, Any]) -> None:
    need(any(importlib.util.find_spec(name) for name in ("htcondor2", "htcondor")),
         "the HTCondor Python bindings are not installed (.ci/install-htcondor.sh)")
    libexec = tmp_path / "libexec"
    libexec.mkdir()
    hook = libexec / "jobtoken-prepare-hook"
    shutil.copy(ROOT / "condor" / "jobtoken-prepare-hook", hook)
    hook.chmod(0o755)
    node["condor_config"].write_text(
        f"JOBTOKEN_LIBEXEC = {libexec}\n"
        "JOBTOKEN_HOOK_PREPARE_JOB = $(JOBTOKEN_LIBEXEC)/jobtoken-prepare-hook\n"
        "JOBTOKEN_HOOK_JOB_EXIT = $(JOBTOKEN_LIBEXEC)/jobtoken-exit-hook\n"
        "STARTER_DEFAULT_JOB_HOOK_KEYWORD = JOBTOKEN\n")
    r = _check(node, "--offline")
    assert r.returncode == 2, r.stdout
    assert f"OK htcondor: JOBTOKEN_HOOK_PREPARE_JOB = {hook} mode 0755" in r.stdout
    assert f"FAIL htcondor: JOBTOKEN_HOOK_JOB_EXIT = {libexec}/jobtoken-exit-hook does not " \
           "exist" in r.stdout
    assert "FAIL htcondor: STARTER_DEFAULT_JOB_HOOK_KEYWORD = JOBTOKEN puts every job" in r.stdout


def test_the_arc_rte_is_found_through_arc_conf(tmp_path: Path, node: Dict[str, Any]) -> None:
    rte_dir = tmp_path / "rte"
    node["arc_conf"].write_text(f"[common]\n[arex]\nruntimedir = {rte_dir}\n")
    r = _check(node, "--offline")
    assert "WARN arc: " in r.stdout and "ENV/JOBTOKEN is missing" in r.stdout
    (rte_dir / "ENV").mkdir(parents=True)
    rte = rte_dir / "ENV" / "JOBTOKEN"
    shutil.copy(ROOT / "wrappers" / "arc" / "ENV" / "JOBTOKEN", rte)
    rte.chmod(0o644)
    r = _check(node, "--offline")
    assert f"OK arc: {rte} is installed" in r.stdout and "differs" not in r.stdout
    rte.write_text(rte.read_text() + "# an older copy\n")
    assert "differs from this jobtoken's RTE" in _check(node, "--offline").stdout
    rte.chmod(0o666)
    r = _check(node, "--offline")
    assert r.returncode == 2 and "FAIL arc: " in r.stdout and "chmod 644" in r.stdout


def test_an_adopting_worker_node_needs_no_parent(tmp_path: Path, node: Dict[str, Any]) -> None:
    config = tmp_path / "jobtoken.toml"
    config.write_text('[server]\nurl = "https://mt.example.org"\n[broker]\nadopt = true\n')
    r = _check(node, "--config", str(config), "--offline")
    assert "SKIP parent mytoken: site.parent_mytoken_file is not set, and none is needed" \
        in r.stdout, r.stdout
    assert "WARN" not in r.stdout and r.returncode == 0, r.stdout
    # a parent named on the command line is still checked
    r = _check(node, "--config", str(config), "--offline", "--parent-mytoken-file",
               str(tmp_path / "nope.mt"))
    assert r.returncode == 2 and f"FAIL parent mytoken: {tmp_path}/nope.mt does not exist" \
        in r.stdout, r.stdout
