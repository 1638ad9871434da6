"""Fixtures for the real HTCondor pool: a TLS dev server (the Mytoken server and the OP), the
site's robot mytoken, and one personal pool, with jobtoken's Debian package installed, that
every test in this package shares (package scope: the package is purged again when the last
test here is done, before tests/test_packages.py installs its own).

Outside CI, a machine without the pool's prerequisites (root, ``.ci/install-htcondor.sh``)
skips these tests with the reason; under ``CI=true`` the same reason fails them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import pytest

from jobtoken.devserver import DevServer, DevServerConfig
from tests.debpackages import SharedInstall
from tests.prerequisites import unavailable

from ._pool import Pool, PoolEnv, missing_prerequisite, pool_root

AUDIENCE = "https://se.example.org"
VO = "dteam"
AT_LIFETIME_S = 20
OP_SCOPES = ("storage.create:/dteam", "storage.read:/dteam")


def site_toml(pool: Pool, server: DevServer, *, site: Optional[Dict[str, Any]] = None,
              renewal: Optional[Dict[str, Any]] = None, extra: str = "") -> str:
    """The site's jobtoken.toml for this pool (TLS to the dev server, the robot mytoken)."""
    site_values: Dict[str, Any] = {
        "parent_mytoken_file": f"{pool.etc}/robot.mytoken",
        "vo": VO,
        "allowed_scopes": list(OP_SCOPES),
        "allowed_audiences": [AUDIENCE],
        "scope_templates": ["storage.create:/{vo}/jobs/{job_id}"],
        "default_walltime_s": 600.0,
        "walltime_slack_s": 60.0,
        "expected_at_lifetime_s": float(AT_LIFETIME_S),
    }
    site_values.update(site or {})
    renewal_values: Dict[str, Any] = {"margin_s": 8.0, "max_backoff_s": 5.0}
    renewal_values.update(renewal or {})
    lines = ["[server]", f"url = {json.dumps(server.url)}",
             f"ca_file = {json.dumps(pool.etc + '/ca.pem')}", "timeout_s = 5", "", "[site]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in site_values.items() if v is not None]
    lines += ["", "[renewal]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in renewal_values.items()]
    return "\n".join(lines) + "\n" + extra


@pytest.fixture(scope="session")
def devserver() -> Iterator[DevServer]:
    tls_dir = Path(tempfile.mkdtemp(prefix="jobtoken-condor-ca-"))
    config = DevServerConfig(tls_dir=str(tls_dir), op_scopes=OP_SCOPES,
                             default_audience=AUDIENCE, at_lifetime_s=AT_LIFETIME_S)
    try:
        with DevServer(config) as server:
            yield server
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def robot(devserver: DevServer) -> str:
    """The site's robot mytoken: may mint job mytokens and tokens for the VO's storage."""
    return devserver.issue_mytoken(capabilities=["AT", "create_mytoken", "tokeninfo"],
                                   name="site robot")


def require_pool() -> None:
    """Skip (outside CI) or fail (CI) when no pool can start here, with the reason."""
    reason = missing_prerequisite()
    if reason:
        unavailable(f"real HTCondor pool: {reason}")


@pytest.fixture(scope="package")
def jobtoken_package(request: pytest.FixtureRequest) -> Iterator[Path]:
    """jobtoken's .deb, installed into the pool environment once for every pool here (each
    pool holds it as well, so a pool started alone installs it itself)."""
    require_pool()  # before building the package for nothing
    deb = request.getfixturevalue("jobtoken_debs")["jobtoken"]
    package = SharedInstall(pool_root(), deb)
    package.acquire()
    try:
        yield deb
    finally:
        package.release()


@pytest.fixture(scope="package")
def pool(devserver: DevServer, robot: str, jobtoken_package: Path) -> Iterator[Pool]:
    require_pool()
    started = time.monotonic()
    the_pool = Pool(PoolEnv(pool_root()), deb=jobtoken_package, jobtoken_toml="")
    with the_pool:
        pass_ca = the_pool.dir / "etc" / "ca.pem"
        shutil.copy(str(devserver.ca_file), pass_ca)
        pass_ca.chmod(0o644)
        the_pool.write_site_secret("robot.mytoken", robot)
        the_pool.set_jobtoken_toml(site_toml(the_pool, devserver))
        the_pool.setup_s = time.monotonic() - started  # type: ignore[attr-defined]
        print(f"\nreal HTCondor pool up in {the_pool.setup_s:.1f} s at {the_pool.dir}")
        yield the_pool


@pytest.fixture
def site(pool: Pool, devserver: DevServer) -> Iterator[Pool]:
    """The pool with the default site config again after a test that changed it."""
    yield pool
    pool.set_jobtoken_toml(site_toml(pool, devserver))
    devserver.faults.clear()
