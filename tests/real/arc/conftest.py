"""Package fixture: a real A-REX with ``ENV/JOBTOKEN`` enabled, and a Mytoken dev server over TLS.

``arc_site`` configures and starts the CE (tests/real/arc/_ce.py), installs jobtoken's Debian
package with apt where the CE runs (the host on Debian 12, the Debian 12 chroot elsewhere),
writes the site configuration and the robot mytoken, enables the package's system RTE with
``arcctl`` (its ``JOBTOKEN_BIN`` default, /usr/bin/jobtoken, is the package's command) and
waits until ``arcsub`` accepts it. Everything it started is stopped by pid at the end, even
when a test failed, its directory is removed and the package purged (package scope: before
tests/test_packages.py installs the package on the host itself).

Must NOT: skip under CI (a missing package is a failure naming .ci/install-arc.sh), put a
mytoken into argv or a message, or leave a daemon, mount or file behind.
"""

from __future__ import annotations

import os
import shutil
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List

import httpx
import pytest

from jobtoken.devserver import DevServer, DevServerConfig
from tests.debpackages import SharedInstall
from tests.prerequisites import unavailable

from ._ce import (
    ARC_CHROOT,
    INSTALL_HINT,
    POOL_USER,
    ArcCE,
    CEError,
    make_base,
    missing_prerequisites,
    use_chroot,
    wait_for,
)

AUDIENCE = "https://se.arc.jobtoken.test"
VO = "dteam"
AT_LIFETIME_S = 30


@dataclass
class ArcSite:
    ce: ArcCE
    server: DevServer
    parent: str = field(repr=False)  # the robot mytoken: kept out of every message
    http: httpx.Client

    def live_job_mytokens(self) -> List[str]:
        """Names of the robot mytoken's live descendants, as the server lists them."""
        response = self.http.post(f"{self.server.url}/api/v0/tokeninfo",
                                  json={"action": "subtokens", "mytoken": self.parent})
        assert response.status_code == 200, response.status_code
        names: List[str] = []
        pending = list(response.json()["mytokens"].get("children") or ())
        while pending:
            node = pending.pop()
            names.append(node["token"].get("name", "?"))
            pending.extend(node.get("children") or ())
        return names

    def wait_no_live_job_mytoken(self, timeout_s: float = 60) -> None:
        wait_for("every job mytoken to be revoked",
                 lambda: True if not self.live_job_mytokens() else None, timeout_s, 1.0)


def _site_config(ce: ArcCE, server_url: str, ca_file: Path) -> Path:
    path = ce.base / "etc" / "jobtoken.toml"
    ce.host(path).parent.mkdir(exist_ok=True)
    ce.host(path).write_text(
        f"""[server]
url = "{server_url}"
ca_file = "{ca_file}"
timeout_s = 5.0

[token]
audiences = ["{AUDIENCE}"]

[site]
allowed_scopes = ["storage.create:/{VO}"]
allowed_audiences = ["{AUDIENCE}"]
vo = "{VO}"
scope_templates = ["storage.create:/{{vo}}/jobs/{{job_id}}"]
default_walltime_s = 600.0
walltime_slack_s = 120.0
expected_at_lifetime_s = {float(AT_LIFETIME_S)}
""",
        encoding="utf-8",
    )
    return path


def _robot_mytoken(ce: ArcCE, value: str) -> Path:
    """The robot mytoken, root-owned and readable by the pool account's group only."""
    path = ce.base / "etc" / "robot.mytoken"
    host = ce.host(path)
    fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    gid = int(ce.run(["getent", "group", POOL_USER]).stdout.split(":")[2])
    os.chown(host, 0, gid)
    os.chmod(host, 0o640)
    return path


def probe_rte(ce: ArcCE) -> bool:
    """Whether ``arcsub`` would send a job asking for ENV/JOBTOKEN here (brokering only)."""
    xrsl = '&(executable="/bin/true")(runtimeenvironment="ENV/JOBTOKEN")'
    proc = ce.arc("arcsub", "-C", ce.url, "-T", "arcrest", "-Q", "arcrest", "-x", "-e", xrsl,
                  check=False)
    return proc.returncode == 0 and "ENV/JOBTOKEN" in proc.stdout


@pytest.fixture(scope="package")
def arc_site(request: pytest.FixtureRequest) -> Iterator[ArcSite]:
    if os.geteuid() != 0:
        unavailable("ARC CE tests need root (A-REX maps jobs to a local account)")
    chroot = ARC_CHROOT if use_chroot() else None
    missing = missing_prerequisites(chroot)
    if missing:
        unavailable(f"ARC CE tests need {', '.join(missing)} ({INSTALL_HINT})")
    debs: Dict[str, Path] = request.getfixturevalue("jobtoken_debs")  # once checks passed
    base = make_base(chroot)
    ce = ArcCE(chroot=chroot, base=base)
    package = SharedInstall(chroot or Path("/"), debs["jobtoken"])
    installed = False
    tls_dir = ce.host(base / "mytoken-tls")
    server = DevServer(DevServerConfig(
        tls_dir=str(tls_dir), default_audience=AUDIENCE, at_lifetime_s=AT_LIFETIME_S,
        op_scopes=(f"storage.create:/{VO}",)))
    http = None
    started = time.monotonic()
    try:
        server.start()
        os.chmod(tls_dir, 0o755)
        ca_file = base / "mytoken-tls" / "ca.pem"
        os.chmod(ce.host(ca_file), 0o644)
        parent = server.issue_mytoken(capabilities=["AT", "create_mytoken", "tokeninfo"])
        config = _site_config(ce, server.url, ca_file)
        ce.configure()
        package.acquire()  # after configure(): a chroot has /proc for the maintainer scripts
        installed = True
        robot = _robot_mytoken(ce, parent)
        ce.enable_rte({"JOBTOKEN_PARENT_MT": str(robot),
                       "JOBTOKEN_SCOPE_TEMPLATE": f"storage.create:/{VO}/jobs/{{job_id}}",
                       "JOBTOKEN_AUDIENCE": AUDIENCE, "JOBTOKEN_VO": VO,
                       "JOBTOKEN_CONFIG": str(config)})
        ce.start()
        wait_for("arcsub to accept ENV/JOBTOKEN", lambda: True if probe_rte(ce) else None,
                 240, 5.0)
        http = httpx.Client(verify=ssl.create_default_context(cafile=str(tls_dir / "ca.pem")),
                            timeout=10)
        print(f"\nARC CE ready in {time.monotonic() - started:.0f} s at {ce.url} "
              f"({'chroot ' + str(chroot) if chroot else 'host'})", file=sys.stderr)
        yield ArcSite(ce=ce, server=server, parent=parent, http=http)
    except CEError as exc:
        pytest.fail(f"ARC CE: {exc}\n{ce.logs_tail()}", pytrace=False)
    finally:
        if http is not None:
            http.close()
        ce.stop()
        server.stop()
        if installed:
            package.release()
        if os.environ.get("JOBTOKEN_ARC_KEEP") == "1":  # for debugging a CE run by hand
            print(f"kept {ce.host(base)}", file=sys.stderr)
        else:
            shutil.rmtree(ce.host(base), ignore_errors=True)
