"""``_logs``: every log line jobtoken writes carries its time in UTC, a log file survives
logrotate (the shipped rule, run for real), and no log file is written through a symlink."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from jobtoken._logs import JsonFormatter, UtcFormatter, file_handler
from tests.prerequisites import need

ROOT = Path(__file__).resolve().parents[1]
STAMP = 1_700_000_000  # 2023-11-14T22:13:20Z


@pytest.fixture
def far_time_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """UTC+14: a formatter that uses local time shows the wrong date."""
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


def _record(message: str = "renewed") -> logging.LogRecord:
    record = logging.LogRecord("jobtoken._sidecar", logging.INFO, __file__, 1, message, None, None)
    record.created = float(STAMP)
    return record


def test_log_times_are_utc_iso8601_whatever_the_host_time_zone(far_time_zone: None) -> None:
    assert UtcFormatter().format(_record()) == "2023-11-14T22:13:20Z INFO renewed"
    assert json.loads(JsonFormatter().format(_record()))["time"] == "2023-11-14T22:13:20Z"


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("jobtoken.test_logs")
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        yield log
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()


def test_the_file_handler_follows_a_rotation(tmp_path: Path, logger: logging.Logger) -> None:
    path = tmp_path / "JobtokenCredmonLog"
    logger.addHandler(file_handler(str(path)))
    logger.info("before\r\nforged line")
    os.rename(path, tmp_path / "JobtokenCredmonLog.1")  # what logrotate does
    logger.info("after")
    rotated = (tmp_path / "JobtokenCredmonLog.1").read_text()
    assert rotated.endswith("INFO before\\r\\nforged line\n") and rotated.count("\n") == 1
    assert path.read_text().endswith(" INFO after\n") and "before" not in path.read_text()


def test_the_file_handler_never_writes_through_a_symlink(
    tmp_path: Path, logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    path = tmp_path / "log"
    path.symlink_to(victim)
    with pytest.raises(OSError):
        file_handler(str(path))
    path.unlink()
    logger.addHandler(file_handler(str(path)))
    logger.info("one")
    path.unlink()
    path.symlink_to(victim)  # planted where the rotated file was
    monkeypatch.setattr(logging, "raiseExceptions", False)  # the handler's own report
    logger.info("two")
    assert victim.read_text() == "untouched\n"


def _logrotate() -> str:
    found = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin:/sbin")
    need(found, "logrotate is not installed (.ci/install-logrotate.sh installs it)")
    assert found is not None
    return found


def test_the_shipped_logrotate_rule_keeps_every_line(
    tmp_path: Path, logger: logging.Logger
) -> None:
    """``packaging/jobtoken.logrotate``, run by logrotate itself on a copy of its paths."""
    condor_log = tmp_path / "condor"
    audit_dir = tmp_path / "jobtoken"
    for d in (condor_log, audit_dir):
        d.mkdir(mode=0o755)
    rule = (ROOT / "packaging" / "jobtoken.logrotate").read_text()
    rule = rule.replace("/var/log/condor", str(condor_log)).replace("/var/log/jobtoken",
                                                                    str(audit_dir))
    # the credmon's and the node broker's default files, each held open by its daemon
    daemon_logs = [condor_log / "JobtokenCredmonLog", condor_log / "JobtokenBrokerLog"]
    for path in daemon_logs:
        assert str(path) in rule
    config = tmp_path / "jobtoken.logrotate"
    config.write_text(rule)
    config.chmod(0o644)
    for path in daemon_logs:
        logger.addHandler(file_handler(str(path)))  # as the running daemon holds it
    logger.info("daemon line before")
    (audit_dir / "alice.log").write_text("audit line before\n")
    result = subprocess.run(
        [_logrotate(), "--force", "--state", str(tmp_path / "state"), str(config)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    logger.info("daemon line after")
    for path in daemon_logs:
        assert "daemon line before" in path.with_name(path.name + ".1").read_text()
        assert "daemon line after" in path.read_text()
        assert "before" not in path.read_text()
    # the audit file is rotated away and not re-created: a hook creates it as its user
    # (a root-owned one made by "create" would lock the user out of their audit file)
    assert (audit_dir / "alice.log.1").read_text() == "audit line before\n"
    assert not (audit_dir / "alice.log").exists()
