"""Real storage, real clients, tokens from the dev server: what a job's transfers rely on.

A token scoped ``storage.create:/jobs/<id> storage.read:/jobs/<id>`` must let each grid client
write a new file under ``/jobs/<id>`` and nothing else. Every test mints its own token for its
own job id, so the plugin's permission cache (about 60 s) cannot carry one test into another.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from ._clients import CREATED, StorageClients
from ._xrootd import XrootdServer
from .conftest import STORAGE_AUDIENCE, StorageIssuer

pytestmark = pytest.mark.e2e

_job_ids = itertools.count(int.from_bytes(os.urandom(2), "big") * 1000 + 1000)


def _job_scope(job_id: int) -> str:
    return f"storage.create:/jobs/{job_id} storage.read:/jobs/{job_id}"


@pytest.fixture
def job_id() -> int:
    return next(_job_ids)


@pytest.fixture
def job_token(storage_issuer: StorageIssuer, job_id: int) -> str:
    return storage_issuer.access_token(_job_scope(job_id))


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    src = tmp_path / "payload.dat"
    src.write_bytes(b"job output " + os.urandom(16).hex().encode() + b"\n")
    return src


def test_curl_put_creates_the_file_on_disk(
    xrootd: XrootdServer, clients: StorageClients, job_id: int, job_token: str, payload: Path
) -> None:
    url = f"{xrootd.url_https}jobs/{job_id}/out.dat"
    result = clients.curl("PUT", url, token=job_token, upload=payload)
    assert result.http_status in CREATED, result.output
    assert (xrootd.datadir / "jobs" / str(job_id) / "out.dat").read_bytes() == payload.read_bytes()


def test_issuer_keys_are_cached_in_this_run_only(
    xrootd: XrootdServer, clients: StorageClients, job_id: int, job_token: str, payload: Path
) -> None:
    # a cache shared with earlier runs would keep keys of an earlier dev server (same kid
    # never refetched); the fixture gives each run its own XDG_CACHE_HOME
    url = f"{xrootd.url_https}jobs/{job_id}/out.dat"
    assert clients.curl("PUT", url, token=job_token, upload=payload).http_status in CREATED
    assert list((xrootd.cache_dir / "scitokens").glob("*.sql*"))


def test_curl_get_reads_back_with_storage_read(
    xrootd: XrootdServer,
    clients: StorageClients,
    job_id: int,
    job_token: str,
    payload: Path,
    tmp_path: Path,
) -> None:
    url = f"{xrootd.url_https}jobs/{job_id}/out.dat"
    assert clients.curl("PUT", url, token=job_token, upload=payload).http_status in CREATED
    fetched = tmp_path / "fetched.dat"
    result = clients.curl("GET", url, token=job_token, output=fetched)
    assert result.http_status == 200, result.output
    assert fetched.read_bytes() == payload.read_bytes()


def test_create_scope_cannot_overwrite(
    xrootd: XrootdServer,
    clients: StorageClients,
    job_id: int,
    job_token: str,
    payload: Path,
    tmp_path: Path,
) -> None:
    url = f"{xrootd.url_https}jobs/{job_id}/out.dat"
    assert clients.curl("PUT", url, token=job_token, upload=payload).http_status in CREATED
    other = tmp_path / "other.dat"
    other.write_bytes(b"overwrite attempt\n")
    result = clients.curl("PUT", url, token=job_token, upload=other)
    assert result.http_status == 403, result.output
    assert (xrootd.datadir / "jobs" / str(job_id) / "out.dat").read_bytes() == payload.read_bytes()


def test_create_scope_cannot_delete(
    xrootd: XrootdServer, clients: StorageClients, job_id: int, job_token: str, payload: Path
) -> None:
    url = f"{xrootd.url_https}jobs/{job_id}/out.dat"
    assert clients.curl("PUT", url, token=job_token, upload=payload).http_status in CREATED
    result = clients.curl("DELETE", url, token=job_token)
    assert result.http_status == 403, result.output
    assert (xrootd.datadir / "jobs" / str(job_id) / "out.dat").exists()


def test_path_outside_the_scope_is_refused(
    xrootd: XrootdServer, clients: StorageClients, job_id: int, job_token: str, payload: Path
) -> None:
    # not a string-prefix of /jobs/<id>: XRootD 5.5.3 matches scope paths by prefix
    url = f"{xrootd.url_https}other/{job_id}/out.dat"
    result = clients.curl("PUT", url, token=job_token, upload=payload)
    assert result.http_status == 403, result.output
    assert not (xrootd.datadir / "other" / str(job_id)).exists()


def test_no_token_is_refused(
    xrootd: XrootdServer, clients: StorageClients, job_id: int, payload: Path
) -> None:
    url = f"{xrootd.url_https}jobs/{job_id}/out.dat"
    result = clients.curl("PUT", url, upload=payload)
    assert result.http_status == 403, result.output
    assert not (xrootd.datadir / "jobs" / str(job_id)).exists()


def test_token_for_another_audience_is_refused(
    xrootd: XrootdServer,
    clients: StorageClients,
    storage_issuer: StorageIssuer,
    job_id: int,
    payload: Path,
) -> None:
    token = storage_issuer.access_token(
        _job_scope(job_id), audience="https://elsewhere.jobtoken.test"
    )
    url = f"{xrootd.url_https}jobs/{job_id}/out.dat"
    result = clients.curl("PUT", url, token=token, upload=payload)
    assert result.http_status == 403, result.output
    assert not (xrootd.datadir / "jobs" / str(job_id)).exists()
    assert "'aud' claim verification failed" in xrootd.log_text()


def test_token_signed_by_another_key_is_refused(
    xrootd: XrootdServer,
    clients: StorageClients,
    storage_issuer: StorageIssuer,
    job_id: int,
    payload: Path,
) -> None:
    # every claim right, including iss; only the signature is not the issuer's
    now = int(time.time())
    claims = {
        "wlcg.ver": "1.0",
        "iss": storage_issuer.issuer_url,
        "sub": "forger",
        "aud": STORAGE_AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": str(uuid.uuid4()),
        "scope": _job_scope(job_id),
    }
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "forged"})
    url = f"{xrootd.url_https}jobs/{job_id}/out.dat"
    result = clients.curl("PUT", url, token=forged, upload=payload)
    assert result.http_status == 403, result.output
    assert not (xrootd.datadir / "jobs" / str(job_id)).exists()


def test_xrdcp_finds_the_token_through_bearer_token_file(
    xrootd: XrootdServer, clients: StorageClients, job_id: int, job_token: str, payload: Path
) -> None:
    token_file = clients.token_file(job_token)
    assert (token_file.stat().st_mode & 0o777) == 0o600  # xrdcp refuses anything looser
    result = clients.xrdcp(
        payload, f"{xrootd.url_root}/jobs/{job_id}/xrdcp.dat", token_file=token_file
    )
    assert result.returncode == 0, result.output
    on_disk = xrootd.datadir / "jobs" / str(job_id) / "xrdcp.dat"
    assert on_disk.read_bytes() == payload.read_bytes()


def test_davix_put_with_bearer_header(
    xrootd: XrootdServer, clients: StorageClients, job_id: int, job_token: str, payload: Path
) -> None:
    token_file = clients.token_file(job_token)
    url = f"{xrootd.url_https}jobs/{job_id}/davix.dat"
    result = clients.davix_put(payload, url, token_file=token_file)
    assert result.returncode == 0, result.output
    on_disk = xrootd.datadir / "jobs" / str(job_id) / "davix.dat"
    assert on_disk.read_bytes() == payload.read_bytes()


def test_gfal_copy_with_bearer_token_env(
    xrootd: XrootdServer, clients: StorageClients, job_id: int, job_token: str, payload: Path
) -> None:
    token_file = clients.token_file(job_token)
    url = f"{xrootd.url_https}jobs/{job_id}/gfal.dat"
    result = clients.gfal_copy(payload, url, token_file=token_file)
    assert result.returncode == 0, result.output
    on_disk = xrootd.datadir / "jobs" / str(job_id) / "gfal.dat"
    assert on_disk.read_bytes() == payload.read_bytes()
