"""The renewal child: one JSON report line, the documented exit code, nothing secret."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from jobtoken._mytoken import clear_discovery_cache
from jobtoken._renewal import main as renewal_main
from jobtoken._renewal import renew
from jobtoken.devserver import DevServer, DevServerConfig
from tests.runhelpers import AUD, prepare


@pytest.fixture()
def srv() -> Iterator[DevServer]:
    with DevServer(DevServerConfig(at_lifetime_s=LIFETIME_S, op_scopes=("storage.create:/",),
                                   default_audience=AUD)) as server:
        yield server


LIFETIME_S = 600


def longer_tokens(srv: DevServer, step: int = 1) -> None:
    """The server's next tokens live ``step`` s longer than the first ones: a renewed token
    must expire later than the one it replaces (exp has one-second resolution), and this
    makes it so without waiting a second for the clock."""
    srv.set_at_lifetime(LIFETIME_S + step)


def child(directory: Path, *args: str) -> tuple:
    r = subprocess.run([sys.executable, "-m", "jobtoken._renewal", str(directory), *args],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout.strip().splitlines()[-1]), r.stdout + r.stderr


def test_report_is_one_non_secret_line(srv: DevServer, tmp_path: Path) -> None:
    job = prepare(srv, tmp_path, lifetime_s=600)
    longer_tokens(srv)
    code, report, output = child(job.tokendir.path)
    assert code == 0 and report["ok"] and not report["reused"]
    assert report["expires_at"] > job.token.expires_at
    token = job.tokendir.bearer_token.read_text().strip()
    assert token not in output and job.tokendir.mytoken.read_text() not in output


def test_valid_token_is_kept_without_a_request(srv: DevServer, tmp_path: Path) -> None:
    job = prepare(srv, tmp_path, lifetime_s=600)
    before = len(srv.requests("access"))
    code, report, _ = child(job.tokendir.path, "--min-valid", "60")
    assert code == 0 and report["reused"] is True
    assert len(srv.requests("access")) == before


def test_discovery_is_kept_in_the_token_directory(srv: DevServer, tmp_path: Path) -> None:
    job = prepare(srv, tmp_path, lifetime_s=600)
    clear_discovery_cache()
    srv.clear_requests()
    for step in (1, 2):
        longer_tokens(srv, step)
        renew(job.tokendir)
        clear_discovery_cache()  # as a fresh child process would start
    assert [r.endpoint for r in srv.requests()].count("discovery") == 1
    assert (job.tokendir.path / "discovery.json").is_file()


def test_stale_discovery_is_forgotten_after_a_404(srv: DevServer, tmp_path: Path) -> None:
    job = prepare(srv, tmp_path, lifetime_s=600)
    kept = job.tokendir.path / "discovery.json"
    import httpx

    doc = httpx.get(f"{srv.url}/.well-known/mytoken-configuration").json()
    doc["access_token_endpoint"] = f"{srv.url}/api/v0/token/moved"
    kept.write_text(json.dumps(doc))
    code, report, _ = child(job.tokendir.path)
    assert code == 77 and not report["ok"]
    assert not kept.exists()
    longer_tokens(srv)
    code, report, _ = child(job.tokendir.path)
    assert code == 0 and report["ok"]


@pytest.mark.parametrize(
    ("fault", "code", "retryable"),
    [(dict(status=503), 75, True), (dict(status=401, error="invalid_token"), 77, False),
     (dict(garbage=True), 76, True), (dict(token="wider_scope"), 65, False)],
)
def test_failure_reports(srv: DevServer, tmp_path: Path, fault: dict, code: int,
                         retryable: bool) -> None:
    job = prepare(srv, tmp_path, lifetime_s=600)
    before = job.tokendir.bearer_token.read_bytes()
    srv.faults.add("access", **fault)
    rc, report, _ = child(job.tokendir.path)
    assert rc == code and report["exit_code"] == code and report["retryable"] is retryable
    assert job.tokendir.bearer_token.read_bytes() == before


def test_missing_directory_is_reported(tmp_path: Path, capsys) -> None:
    assert renewal_main([str(tmp_path / "nope")]) == 78
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and "does not exist" in report["error"]
