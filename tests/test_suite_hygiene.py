"""The suite itself: independent of how it was started, one rule for missing prerequisites."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from tests.prerequisites import need

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import signal, subprocess, sys
sys.path.insert(0, {root!r})
from tests.conftest import reset_inherited_signal_dispositions
if {reset}:
    reset_inherited_signal_dispositions()
status = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True).stdout
print(status)
"""


def _grandchild_masks(reset: bool) -> tuple:
    """Ignored and blocked signal masks of a process started by a suite launched the way
    ``nohup`` (HUP ignored) and ``cmd &`` (INT, QUIT ignored) launch it, USR1 blocked."""

    def inherit_a_hostile_start() -> None:
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])

    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(root=str(ROOT), reset=reset)],
        capture_output=True, text=True, timeout=60, check=True, cwd=ROOT,
        preexec_fn=inherit_a_hostile_start,
    ).stdout
    fields = dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)
    return int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)


def _bits(*sigs: int) -> int:
    return sum(1 << (int(s) - 1) for s in sigs)


def test_children_of_the_suite_start_with_default_signal_handling() -> None:
    hostile = _bits(signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
    ignored, blocked = _grandchild_masks(reset=False)
    assert ignored & hostile == hostile and blocked & _bits(signal.SIGUSR1)  # the hazard
    ignored, blocked = _grandchild_masks(reset=True)
    assert ignored & hostile == 0 and blocked & _bits(signal.SIGUSR1) == 0


def test_this_run_hands_its_children_no_ignored_test_signal() -> None:
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["SigIgn"], 16) & _bits(signal.SIGHUP, signal.SIGINT, signal.SIGTERM) == 0


@pytest.mark.parametrize("ci", ["true", "1", "yes", "TRUE"])
def test_a_missing_prerequisite_fails_under_ci(ci: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI installs every prerequisite: a skip there would hide a broken set-up."""
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="CI prerequisite missing: no frobnicator"):
        need(False, "no frobnicator")
    need(True, "present")  # a met prerequisite neither skips nor fails


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_a_missing_prerequisite_skips_elsewhere(
    ci: Optional[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no frobnicator"):
        need("", "no frobnicator")


def test_every_prerequisite_check_goes_through_the_one_rule() -> None:
    """No test reads ``CI`` itself to decide between skip and fail (six copies had drifted)."""
    readers = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if path.name != "prerequisites.py"
        and re.search(r"""environ(\.get)?[\[(]["']CI["']""", path.read_text())
    ]
    assert readers == []


def test_the_suite_runs_the_same_when_started_hostile(tmp_path: Path) -> None:
    """Started under ``nohup`` and ``trap '' INT``, with stdin closed and the host's token
    and jobtoken settings exported, the suite still gives every fixture (whatever its
    scope) and every child a neutral start: the probe tests in a nested pytest say so."""
    token_file = tmp_path / "host-bt"
    token_file.write_text("eyJhbGciOiJub25lIn0.eyJzdWIiOiJob3N0In0.\n")
    hostile = dict(
        os.environ,
        BEARER_TOKEN_FILE=str(token_file),
        BEARER_TOKEN="host-token",
        JOBTOKEN_CONFIG=str(tmp_path / "host.toml"),
        JOBTOKEN_SCOPE="storage.modify:/",
        JOBTOKEN_DIR=str(tmp_path),
        XDG_RUNTIME_DIR=str(tmp_path),
        CONDOR_CONFIG=str(tmp_path / "condor_config"),
        _CONDOR_SCRATCH_DIR=str(tmp_path),
        JOBTOKEN_LONG_TESTS="1",
    )

    def hostile_start() -> None:
        for sig in (signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
        os.close(0)

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "payloads" / "suite_probe.py")],
        cwd=ROOT, env=hostile, stdin=None, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=300, preexec_fn=hostile_start,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 passed" in result.stdout, result.stdout[-3000:]
