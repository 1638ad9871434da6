"""``jobtoken credmon`` against a credential directory laid out as the credd lays it out.

``<cred dir>/<user>/<name>.top`` as stored by the storer (and a foreign Vault ``.top``),
``<user>.mark`` sweep markers; the credmon must write ``.use`` atomically, touch
``CREDMON_COMPLETE``, drop its pid and rescan on SIGHUP.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from jobtoken._errors import ConfigError
from jobtoken.devserver import DevServer
from jobtoken.integrations.condor import extract_mytoken
from jobtoken.integrations.condor_credmon import (
    COMPLETE_MARKER,
    PID_FILE,
    check_cred_dir,
    run_credmon,
    scan_credentials,
)

from .conftest import base_env

NOW = 1_800_000_000.0


def top_json(mytoken: str, expires_at: float = NOW + 3600) -> str:
    return json.dumps(
        {
            "mytoken": mytoken,
            "mytoken_server": "https://mytoken.example",
            "mom_id": "m-1",
            "expires_at": int(expires_at),
            "scopes": ["storage.create:/dteam"],
            "audiences": [],
        }
    )


@pytest.fixture
def cred_dir(tmp_path: Path) -> Path:
    d = tmp_path / "oauth_credentials"
    d.mkdir(mode=0o2770)
    os.chmod(d, 0o2770)
    (d / "alice").mkdir(mode=0o700)
    (d / "bob").mkdir(mode=0o700)
    (d / "bob.mark").write_text("")
    return d


def put(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, text.encode())
    os.close(fd)
    return path


def test_scan_writes_use_for_jobtoken_top_only(srv: DevServer, cred_dir: Path) -> None:
    mt = srv.issue_mytoken(capabilities=["AT", "create_mytoken"])
    put(cred_dir / "alice" / "jobtoken_prod.top", top_json(mt))
    vault = put(cred_dir / "alice" / "dune.top", '{"vault_token": "hvs.x", "vault_url": "u"}')
    report = scan_credentials(cred_dir, now=NOW)
    assert report.written == ("alice/jobtoken_prod",)
    assert report.foreign == ("alice/dune",)
    use = cred_dir / "alice" / "jobtoken_prod.use"
    assert stat.S_IMODE(use.stat().st_mode) == 0o600
    data = json.loads(use.read_text())
    assert data["mytoken"] == mt and "access_token" not in data
    assert not (cred_dir / "alice" / "dune.use").exists()
    assert vault.read_text().startswith('{"vault_token"')
    # what the job receives as $_CONDOR_CREDS/jobtoken_prod.use, the prepare hook can read
    assert extract_mytoken(use.read_text(), "jobtoken_prod.use") == mt
    # unchanged credential: the file is not rewritten
    inode = use.stat().st_ino
    again = scan_credentials(cred_dir, now=NOW)
    assert again.unchanged == ("alice/jobtoken_prod",) and use.stat().st_ino == inode


def test_scan_removes_use_of_expired_mytoken(srv: DevServer, cred_dir: Path) -> None:
    mt = srv.issue_mytoken()
    put(cred_dir / "alice" / "jobtoken.top", top_json(mt, expires_at=NOW + 10))
    scan_credentials(cred_dir, now=NOW)
    assert (cred_dir / "alice" / "jobtoken.use").exists()
    report = scan_credentials(cred_dir, now=NOW + 11)
    assert report.expired == ("alice/jobtoken",)
    assert not (cred_dir / "alice" / "jobtoken.use").exists()
    assert (cred_dir / "alice" / "jobtoken.top").exists()  # the credd sweeps .top, not us


def test_scan_skips_unusable_and_filtered_credentials(srv: DevServer, cred_dir: Path) -> None:
    put(cred_dir / "alice" / "jobtoken.top", json.dumps({"mytoken": "short"}))
    put(cred_dir / "bob" / "other.top", top_json(srv.issue_mytoken()))
    report = scan_credentials(cred_dir, now=NOW, providers=["jobtoken"])
    assert report.errors == ("alice/jobtoken",)
    assert report.foreign == ("bob/other",)
    assert list(cred_dir.glob("*/*.use")) == []


def test_cred_dir_open_to_others_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o755)
    with pytest.raises(ConfigError, match="accessible by others"):
        check_cred_dir(d)


def test_run_once_marks_complete_and_drops_pid(srv: DevServer, cred_dir: Path) -> None:
    put(cred_dir / COMPLETE_MARKER, "")
    put(cred_dir / "alice" / "jobtoken.top", top_json(srv.issue_mytoken(), NOW + 1e9))
    ready = []
    assert run_credmon(cred_dir, once=True, on_ready=lambda: ready.append(True)) == 0
    assert (cred_dir / COMPLETE_MARKER).exists()
    assert (cred_dir / PID_FILE).read_text() == str(os.getpid())
    assert (cred_dir / "alice" / "jobtoken.use").exists()
    assert ready == [True]


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_credmon_daemon_rescans_on_sighup_and_stops_on_term(srv: DevServer, cred_dir: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobtoken",
            "credmon",
            "--cred-dir",
            str(cred_dir),
            "--interval",
            "3600",
        ],
        env=base_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: (cred_dir / COMPLETE_MARKER).exists())
        assert int((cred_dir / PID_FILE).read_text()) == proc.pid
        # the credd stores a new .top and sends SIGHUP to the pid in the pid file
        put(cred_dir / "bob" / "jobtoken.top", top_json(srv.issue_mytoken(), time.time() + 3600))
        os.kill(int((cred_dir / PID_FILE).read_text()), signal.SIGHUP)
        wait_for(lambda: (cred_dir / "bob" / "jobtoken.use").exists())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
