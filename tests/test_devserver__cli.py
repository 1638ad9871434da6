"""``jobtoken devserver`` command line: serve, fault, and never printing a token."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from jobtoken.devserver._cli import build_parser, main, serve
from tests.devserver_fixtures import access_token_request, client_for, running_devserver


def wait_for_file(path: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    poll = threading.Event()
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        poll.wait(0.02)
    raise AssertionError(f"{path} not written within {timeout_s}s")


def test_help_says_development_and_test_tool(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    assert "DEVELOPMENT AND TEST TOOL" in capsys.readouterr().out
    assert main(["serve", "--help"]) == 0
    assert "--force-remote" in capsys.readouterr().out


def test_non_loopback_host_refused(capsys: pytest.CaptureFixture) -> None:
    assert main(["--host", "0.0.0.0"]) == 78
    assert "not loopback" in capsys.readouterr().err


def test_bad_rate_limit_is_usage_error() -> None:
    assert main(["--rate-limit", "lots"]) == 2


def test_serve_writes_url_and_private_mytoken_never_prints_it(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    url_file, mt_file = tmp_path / "url", tmp_path / "parent.mt"
    args = build_parser().parse_args(
        [
            "serve",
            "--url-file",
            str(url_file),
            "--mytoken-out",
            str(mt_file),
            "--op-scope",
            "storage.create:/vo",
            "--parent-scope",
            "storage.create:/vo",
            "--parent-audience",
            "https://se",
            "--parent-capability",
            "AT",
            "--parent-capability",
            "create_mytoken",
            "--parent-usages-at",
            "5",
        ]
    )
    stop = threading.Event()
    result: list = []
    worker = threading.Thread(target=lambda: result.append(serve(args, stop)))
    worker.start()
    try:
        url = wait_for_file(url_file, timeout_s=10)
        mytoken = mt_file.read_text().strip()
        assert stat.S_IMODE(os.stat(mt_file).st_mode) == 0o600
        with httpx.Client(base_url=url, timeout=5) as c:
            r = access_token_request(c, mytoken, scope="storage.create:/vo", audience="https://se")
            assert r.status_code == 200
            info = c.post("/api/v0/tokeninfo", json={"action": "introspect", "mytoken": mytoken})
            assert info.status_code == 403  # parent capabilities were exactly AT, create_mytoken
    finally:
        stop.set()
        worker.join(timeout=10)
    assert result == [0]
    out, err = capfd.readouterr()
    assert mytoken not in out + err
    assert url in err


def control_file(srv, tmp_path: Path) -> str:
    path = tmp_path / "control"
    path.write_text(srv.control_token + "\n")
    path.chmod(0o600)
    return str(path)


def test_fault_subcommand(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    with running_devserver() as srv, client_for(srv) as c:
        own = ["--url", srv.url, "--control-file", control_file(srv, tmp_path)]
        argv = ["fault", *own, "--endpoint", "jwks", "--status", "503", "--count", "1"]
        assert main(argv) == 0
        assert c.get("/jwks").status_code == 503
        assert c.get("/jwks").status_code == 200
        assert main(["fault", *own, "--endpoint", "access", "--token", "hs256"]) == 0
        assert main(["fault", *own, "--clear"]) == 0
        assert srv.faults.active() == ()
        assert main(["fault", *own, "--endpoint", "jwks", "--token", "hs256"]) == 78
        assert main(["fault", *own]) == 2


def test_serve_writes_a_private_control_file_that_only_fault_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # issue 12 item 15: the owner steers the server without flags; nobody else can
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    url_file = tmp_path / "url"
    args = build_parser().parse_args(["serve", "--url-file", str(url_file)])
    stop = threading.Event()
    worker = threading.Thread(target=serve, args=(args, stop))
    worker.start()
    try:
        url = wait_for_file(url_file, timeout_s=10)
        [control] = list((tmp_path / "jobtoken-devserver").iterdir())
        assert stat.S_IMODE(control.stat().st_mode) == 0o600
        assert main(["fault", "--url", url, "--endpoint", "jwks", "--status", "503"]) == 0
        with httpx.Client(base_url=url, timeout=5) as c:
            assert c.get("/jwks").status_code == 503
            # a local user without the file gets nowhere
            r = c.delete("/_devserver/faults")
            assert r.status_code == 403
            assert c.get("/jwks").status_code == 503
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "elsewhere"))
        assert main(["fault", "--url", url, "--clear"]) == 78
        assert "only the user who started" in capsys.readouterr().err
    finally:
        stop.set()
        worker.join(timeout=10)
    assert not control.exists()  # removed when the server stops


def test_fault_subcommand_over_https(tmp_path: Path) -> None:
    with running_devserver(tls_dir=str(tmp_path)) as srv, client_for(srv) as c:
        argv = [
            "fault",
            "--url",
            srv.url,
            "--ca-file",
            str(srv.ca_file),
            "--control-file",
            control_file(srv, tmp_path),
            "--endpoint",
            "jwks",
            "--drop",
            "--count",
            "1",
        ]
        assert main(argv) == 0
        with pytest.raises(httpx.HTTPError):
            c.get("/jwks")


def test_runs_until_sigterm(tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    code = "import sys; from jobtoken.devserver._cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--url-file", str(url_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        url = wait_for_file(url_file, timeout_s=20)
        with httpx.Client(timeout=5) as c:
            assert c.get(url + "/jwks").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
