"""``jobtoken broker`` clients: one line and a documented exit code when the broker is away."""

from __future__ import annotations

from pathlib import Path

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
