"""``jobtoken broker`` clients: one line and a documented exit code when the broker is away."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jobtoken.cli import main


@pytest.mark.parametrize("args", [["status"], ["ensure", "--min-valid", "60"], ["release"],
                                  ["prepare", "--dir", "/tmp"], ["ping"],
                                  ["register", "--job-id", "j", "--uid", "1",
                                   "--anchor-pid", "2"]])
def test_an_unreachable_broker_is_exit_75_in_one_line(
        args: list, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["broker", *args, "--socket", str(tmp_path / "none.sock")])
    err = capsys.readouterr().err
    assert code == 75
    assert err.count("\n") == 1 and "cannot reach the node broker" in err


def test_the_socket_comes_from_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBTOKEN_BROKER_SOCKET", str(tmp_path / "env.sock"))
    assert main(["broker", "ping"]) == 75
    assert "env.sock" in capsys.readouterr().err


def test_broker_without_a_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["broker"]) == 2
    assert "serve" in capsys.readouterr().err


def test_serve_log_file_gets_the_events_and_survives_logrotate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """``broker serve --log-file``: events (INFO) in the file, a rename by logrotate followed
    by a new file, stderr at the user's level (no duplicate of every event)."""
    import logging
    import os

    log = tmp_path / "broker.log"
    config = tmp_path / "jobtoken.toml"
    config.write_text("")

    def serve(config: object) -> int:  # stands in for the loop: logs as the broker does
        logger = logging.getLogger("jobtoken._broker")
        logger.info("broker listening")
        os.rename(log, tmp_path / "broker.log.1")  # what logrotate does (no copytruncate)
        logger.info("job registered job=j1")
        logger.warning("renewal failed job=j1")
        return 0

    monkeypatch.setattr("jobtoken._broker.serve", serve)
    assert main(["broker", "serve", "--config", str(config), "--log-file", str(log)]) == 0
    assert "broker listening" in (tmp_path / "broker.log.1").read_text()
    # after the rename, the next line opened a new file: "<UTC time> LEVEL message"
    lines = log.read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "INFO job registered job=j1", "WARNING renewal failed job=j1"], lines
    assert lines[0].split(" ", 1)[0].endswith("Z")
    assert capsys.readouterr().err == "jobtoken: renewal failed job=j1\n"


def test_serve_log_file_that_is_a_symlink_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "jobtoken.toml"
    config.write_text("")
    (tmp_path / "target").write_text("")
    (tmp_path / "broker.log").symlink_to(tmp_path / "target")
    assert main(["broker", "serve", "--config", str(config), "--log-file",
                 str(tmp_path / "broker.log")]) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot open the broker log" in err
    assert (tmp_path / "target").read_text() == ""


def test_serve_logs_to_its_file_across_logrotate_and_outlives_sighup() -> None:
    """Under condor_master the broker's stdout and stderr are /dev/null: its log is the
    file. logrotate renames it (no copytruncate) and the next line starts a new file;
    condor_reconfig sends a daemon outside DaemonCore SIGHUP, which must not end it."""
    import signal
    import subprocess
    import sys

    from jobtoken._brokerclient import BrokerClient
    from jobtoken._errors import JobtokenError
    from jobtoken.devserver import DevServer, DevServerConfig
    from tests.brokerhelpers import Site, base_dir, wait_for

    with DevServer(DevServerConfig()) as srv:
        for base in base_dir():
            site = Site(srv, base, at_lifetime_s=60, margin_s=10)
            log = base / "JobtokenBrokerLog"
            proc = subprocess.Popen(
                [sys.executable, "-m", "jobtoken", "broker", "serve", "--config",
                 str(site.config), "--log-file", str(log)], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            client = BrokerClient(site.socket, timeout_s=30.0)

            def pong(proc: Any = proc, client: Any = client) -> bool:
                assert proc.poll() is None, proc.communicate(timeout=30)[1]
                try:
                    client.ping()
                except JobtokenError:
                    return False
                return True

            try:
                wait_for(pong, 60, "the broker answers a ping")
                assert "broker listening socket=" in log.read_text()
                log.rename(base / "JobtokenBrokerLog.1")  # logrotate
                proc.send_signal(signal.SIGHUP)  # condor_reconfig
                # the signal is pending before the ping connects: a broker it ended
                # could not answer
                assert pong(), "the broker answers after SIGHUP"
                proc.terminate()
                assert proc.wait(timeout=60) == 0
                assert "broker stopped" in log.read_text(), "the line after the rotation " \
                    "starts a new file"
                assert "broker stopped" not in (base / "JobtokenBrokerLog.1").read_text()
                stderr = proc.communicate(timeout=30)[1]
                assert "broker listening" not in stderr, "events go to the file only"
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)


def test_serve_says_in_its_log_file_why_it_cannot_run(tmp_path: Path) -> None:
    """Under condor_master stderr is /dev/null: a broker that cannot start says why in
    its log file (here: the site's parent mytoken is missing)."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    config = tmp_path / "jobtoken.toml"
    config.write_text(f'[server]\nurl = "https://mytoken.example.org"\n[site]\n'
                      f'parent_mytoken_file = "{tmp_path / "none.mytoken"}"\n')
    log = tmp_path / "JobtokenBrokerLog"
    result = subprocess.run(
        [sys.executable, "-m", "jobtoken", "broker", "serve", "--config", str(config),
         "--socket", str(run / "b.sock"), "--state-dir", str(tmp_path / "state"),
         "--log-file", str(log)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("JOBTOKEN")})
    assert result.returncode == 78 and result.stderr.count("\n") == 1, result.stderr
    (line,) = log.read_text().splitlines()
    assert "broker cannot run" in line and "none.mytoken" in line, line
