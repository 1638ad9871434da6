"""Fixtures for the batch-system integrations: one dev server per module, site config files.

Everything runs against ``jobtoken.devserver`` on 127.0.0.1 over plain http
(``allow_http``); the HTCondor and ARC pieces are the real scripts and bindings.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from jobtoken.devserver import DevServer, DevServerConfig

REPO = Path(__file__).resolve().parents[2]
CONDOR_DIR = REPO / "condor"
WRAPPERS_DIR = REPO / "wrappers"
PAYLOADS = REPO / "tests" / "payloads"
JOBTOKEN_BIN = str(Path(sys.executable).parent / "jobtoken")
AUDIENCE = "https://se.example.org"
VO = "dteam"


_INSTALLED: Dict[str, str] = {}


def condor_script(name: str) -> str:
    """``condor/NAME`` as a site installs it: the fixed /usr/bin/jobtoken in it replaced by
    this checkout's jobtoken (the scripts take no path from the environment)."""
    if name not in _INSTALLED:
        import tempfile

        directory = Path(tempfile.mkdtemp(prefix="jobtoken-libexec-"))
        text = (CONDOR_DIR / name).read_text().replace("/usr/bin/jobtoken", JOBTOKEN_BIN)
        path = directory / name
        path.write_text(text)
        path.chmod(0o755)
        _INSTALLED[name] = str(path)
    return _INSTALLED[name]


@pytest.fixture(scope="module")
def srv() -> Iterator[DevServer]:
    server = DevServer(DevServerConfig(default_audience=AUDIENCE, at_lifetime_s=1200))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def write_secret(path: Path, value: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    return path


@pytest.fixture
def parent_file(srv: DevServer, tmp_path: Path) -> Path:
    """The site's (VO robot's) parent mytoken, able to mint job tokens."""
    mt = srv.issue_mytoken(capabilities=["AT", "create_mytoken", "tokeninfo"])
    return write_secret(tmp_path / "parent.mytoken", mt)


def toml_config(
    path: Path,
    *,
    server: str,
    parent: Optional[Path] = None,
    extra_site: Optional[Dict[str, Any]] = None,
    timeout_s: float = 5.0,
) -> Path:
    site: Dict[str, Any] = {
        "allowed_scopes": ["storage.create:/dteam"],
        "allowed_audiences": [AUDIENCE],
        "vo": VO,
        "scope_templates": ["storage.create:/{vo}/jobs/{job_id}"],
        "default_walltime_s": 3600.0,
        "walltime_slack_s": 600.0,
    }
    if parent is not None:
        site["parent_mytoken_file"] = str(parent)
    site.update(extra_site or {})

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(float(v))
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v) + '"'

    lines = [
        "[server]",
        f'url = "{server}"',
        "allow_http = true",
        f"timeout_s = {timeout_s}",
        "",
        "[token]",
        f'audiences = ["{AUDIENCE}"]',
        "",
        "[site]",
    ]
    lines += [f"{k} = {value(v)}" for k, v in site.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def closed_port_url() -> str:
    """An http URL on loopback where nothing listens (a server that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def base_env(**extra: str) -> Dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JOBTOKEN", "BEARER_TOKEN", "_CONDOR_", "MYTOKEN"))
    }
    env["JOBTOKEN_BIN"] = JOBTOKEN_BIN
    # hooks run here outside a pool: no audit file on the host (/var/log/jobtoken); the
    # audit log itself is tested on its own and in the real pool
    env["_CONDOR_JOBTOKEN_AUDIT_LOG"] = "none"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    env.update(extra)
    return env


def job_ad_text(**attrs: Any) -> str:
    """A job ad in the starter's old format, built with the real bindings."""
    import classad2

    ad = classad2.ClassAd()
    for name, val in attrs.items():
        if val is not None:
            ad[name] = val
    return str(ad.printOld())


def argv_python(*args: str) -> List[str]:
    return [sys.executable, *args]
