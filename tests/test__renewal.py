"""The renewal child: one JSON report line, the documented exit code, nothing secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest

from jobtoken._config import Config
from jobtoken._errors import TokenCheckError, TokenFileError
from jobtoken._mytoken import clear_discovery_cache
from jobtoken._renewal import main as renewal_main
from jobtoken._renewal import renew
from jobtoken.devserver import DevServer, DevServerConfig
from tests.devserver_fixtures import is_live
from tests.runhelpers import AUD, prepare


@pytest.fixture()
def srv() -> Iterator[DevServer]:
    with DevServer(DevServerConfig(at_lifetime_s=600, op_scopes=("storage.create:/",),
                                   default_audience=AUD)) as server:
        yield server


def child(directory: Path, *args: str) -> tuple:
    r = subprocess.run([sys.executable, "-m", "jobtoken._renewal", str(directory), *args],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout.strip().splitlines()[-1]), r.stdout + r.stderr


def test_report_is_one_non_secret_line(srv: DevServer, tmp_path: Path) -> None:
    job = prepare(srv, tmp_path, lifetime_s=600)
    time.sleep(1.05)  # exp has one-second resolution: a new token must expire later
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
    for _ in range(2):
        time.sleep(1.05)
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
    time.sleep(1.05)
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


# --- one renewal routine, two writers: the sidecar's and the node broker's ------------------


class RenewalPath:
    """One prepared job renewed the way the sidecar (``renew``) or the broker
    (``_brokerwork.PoolWork.renew``) does it; ``token_files`` are what payloads read."""

    def __init__(self, kind: str, srv: DevServer, tmp_path: Path) -> None:
        self.kind = kind
        self.job = prepare(srv, tmp_path, lifetime_s=600)
        self.tokendir = self.job.tokendir
        spec = self.tokendir.read_spec()
        # a rotating job mytoken: every exchange kills the one used
        self.tokendir.mytoken.write_text(srv.issue_mytoken(
            capabilities=["AT"], rotation={"on_AT": True},
            restrictions=[{"scope": " ".join(spec.scopes), "audience": list(spec.audiences)}]))
        self.token_files = [self.tokendir.bearer_token]
        if kind == "broker":
            self._broker_job(srv, tmp_path, spec)

    def _broker_job(self, srv: DevServer, tmp_path: Path, spec: Any) -> None:
        from jobtoken._brokeridentity import JobIdentity, ProcessAnchor
        from jobtoken._brokerstore import ACTIVE, BrokerJob
        from jobtoken._brokerwork import PoolWork, write_job_token
        from jobtoken._mytoken import MytokenClient
        from jobtoken._tokenfile import open_job_directory

        jobdir = tmp_path / "sandbox"
        jobdir.mkdir(mode=0o700)
        with open_job_directory(str(jobdir), os.geteuid()) as directory:
            dir_identity = directory.identity
        raw = self.tokendir.bearer_token.read_text().strip()
        write_job_token(str(jobdir), os.geteuid(), dir_identity, raw)
        self.broker_job = BrokerJob(
            identity=JobIdentity(job_id=spec.job_id, uid=os.geteuid(), owner=None,
                                 anchor=ProcessAnchor(os.getpid(), 0)),
            store=self.tokendir, phase=ACTIVE, tokendir=str(jobdir),
            dir_identity=dir_identity, spec=spec)
        self.client = MytokenClient(srv.url, allow_http=True)
        self.work = PoolWork(Config(), self.client, None)
        self.token_files.append(jobdir / "bt")

    def renew(self) -> None:
        if self.kind == "sidecar":
            renew(self.tokendir)
        else:
            _, unwritten = self.work.renew(self.broker_job, time.time())
            assert unwritten is None

    def contents(self) -> List[bytes]:
        return [path.read_bytes() for path in self.token_files]

    def close(self) -> None:
        if self.kind == "broker":
            self.client.close()


@pytest.fixture(params=["sidecar", "broker"])
def path(request: pytest.FixtureRequest, srv: DevServer, tmp_path: Path
         ) -> Iterator[RenewalPath]:
    renewal = RenewalPath(request.param, srv, tmp_path)
    yield renewal
    renewal.close()


def test_each_path_writes_a_fresh_token_everywhere_and_keeps_the_rotated_mytoken(
        path: RenewalPath, srv: DevServer) -> None:
    for _ in range(2):  # the second exchange works only with the mytoken the first saved
        old = path.tokendir.mytoken.read_text()
        before = path.contents()
        time.sleep(1.05)  # exp has one-second resolution: a new token must expire later
        path.renew()
        after = path.contents()
        assert after[0] != before[0] and len(set(after)) == 1  # the same new token in each
        new = path.tokendir.mytoken.read_text()
        assert new != old and is_live(srv, new) and not is_live(srv, old)


@pytest.mark.parametrize("bad", ["wider_scope", "wrong_audience", "stale_exp", "expired"])
def test_on_each_path_a_token_that_fails_a_check_never_replaces_the_valid_one(
        path: RenewalPath, srv: DevServer, bad: str) -> None:
    if bad == "stale_exp":  # the last token's exp with a later iat: renew once first
        time.sleep(1.05)
        path.renew()
        time.sleep(1.05)
    before = path.contents()
    old = path.tokendir.mytoken.read_text()
    srv.faults.add("access", token=bad, count=1)
    with pytest.raises(TokenCheckError):
        path.renew()
    assert path.contents() == before
    # the server rotated the mytoken with that answer: the new one was saved all the same
    saved = path.tokendir.mytoken.read_text()
    assert saved != old and is_live(srv, saved)


def test_on_each_path_the_rotated_mytoken_is_saved_before_the_token_is_written(
        path: RenewalPath, srv: DevServer) -> None:
    # the token cannot be written where the renewal puts it first (the broker's copy or
    # the sidecar's bt): the mytoken the server rotated must be on disk already
    first = path.token_files[0]
    first.unlink()
    first.mkdir()
    old = path.tokendir.mytoken.read_text()
    with pytest.raises(TokenFileError):
        path.renew()
    saved = path.tokendir.mytoken.read_text()
    assert saved != old and is_live(srv, saved)
