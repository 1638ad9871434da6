"""Session fixtures for the end-to-end storage tests: a token issuer and an XRootD trusting it.

``storage_issuer`` is the package's own ``DevServer`` over TLS (the OP part signs the access
tokens); ``xrootd`` is a real xrootd on 127.0.0.1 that trusts exactly that issuer.

Must NOT: install anything (that is .ci/install-system-packages.sh), skip when software is
missing (CI must run these tests: a missing binary is a failure naming the install script), or
put a token into argv, logs or assertion messages.
"""

from __future__ import annotations

import shutil
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ._clients import StorageClients, missing_clients
from ._xrootd import INSTALL_HINT, XrootdConfig, XrootdServer, missing_prerequisites

STORAGE_AUDIENCE = "https://storage.e2e.jobtoken.test"
STORAGE_OP_SCOPES = (
    "openid",
    "offline_access",
    "storage.read:/",
    "storage.create:/",
    "storage.modify:/",
)


def require_software() -> None:
    """Fail (never skip) when the storage or client software is absent."""
    missing = missing_prerequisites() + missing_clients()
    if missing:
        pytest.fail(f"e2e software missing: {', '.join(missing)}; {INSTALL_HINT}", pytrace=False)


class StorageIssuer:
    """The DevServer seen from a storage test: an issuer URL, its CA, and a way to get ATs.

    Access tokens come the way a job gets them: a mytoken restricted to exactly the job's
    scope and audience (as ``jobtoken prepare`` mints one), exchanged at
    ``POST /api/v0/token/access`` with ``grant_type=mytoken``. Without a restriction a Mytoken
    server ignores the requested scope and audience and hands out everything the OP allows.
    """

    def __init__(self, server: Any) -> None:
        self.server = server
        self.url: str = server.url
        self.issuer_url: str = server.op_issuer
        self.ca_file = Path(server.ca_file)
        tls = ssl.create_default_context(cafile=str(self.ca_file))
        self._http = httpx.Client(verify=tls, timeout=10.0)

    def access_token(self, scope: str, audience: str = STORAGE_AUDIENCE) -> str:
        """A fresh access token carrying exactly ``scope`` and ``audience``.

        Raises:
            AssertionError: the dev server refused, or granted something else than asked;
                messages carry no token.
        """
        mytoken = self.server.issue_mytoken(
            capabilities=["AT"], restrictions=[{"scope": scope, "audience": [audience]}]
        )
        response = self._http.post(
            f"{self.url}/api/v0/token/access",
            json={
                "grant_type": "mytoken",
                "mytoken": mytoken,
                "scope": scope,
                "audience": audience,
            },
        )
        assert response.status_code == 200, (
            f"dev server refused an access token status={response.status_code} "
            f"body={response.text[:200]}"
        )
        body = response.json()
        assert sorted(body["scope"].split()) == sorted(scope.split()), body["scope"]
        assert body["audience"] == [audience], body["audience"]
        token = body["access_token"]
        assert isinstance(token, str)
        return token

    def close(self) -> None:
        self._http.close()


@pytest.fixture(scope="session")
def storage_issuer() -> Iterator[StorageIssuer]:
    """The dev server with TLS, issuing WLCG ATs for ``STORAGE_AUDIENCE``."""
    try:
        from jobtoken.devserver import DevServer, DevServerConfig
    except ImportError as exc:
        pytest.fail(f"jobtoken.devserver.DevServer unavailable: {exc}", pytrace=False)
    tls_dir = Path(tempfile.mkdtemp(prefix="jobtoken-e2e-issuer-"))
    config = DevServerConfig(
        tls_dir=str(tls_dir),
        op_scopes=STORAGE_OP_SCOPES,
        default_audience=STORAGE_AUDIENCE,
        at_lifetime_s=600,
    )
    try:
        with DevServer(config) as server:
            issuer = StorageIssuer(server)
            try:
                yield issuer
            finally:
                issuer.close()
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def xrootd(storage_issuer: StorageIssuer) -> Iterator[XrootdServer]:
    """A real xrootd on 127.0.0.1 trusting only ``storage_issuer``."""
    require_software()
    server = XrootdServer(
        XrootdConfig(
            issuer_url=storage_issuer.issuer_url,
            issuer_ca_file=storage_issuer.ca_file,
            audiences=(STORAGE_AUDIENCE,),
        )
    )
    with server:
        yield server


@pytest.fixture
def clients(xrootd: XrootdServer, tmp_path: Path) -> StorageClients:
    """Grid clients trusting the storage's CA, with a private scratch directory."""
    return StorageClients(tmp_path / "client", xrootd.ca_file, xrootd.cert_dir)
