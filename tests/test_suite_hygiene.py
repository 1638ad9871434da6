"""The suite itself: independent of the signal dispositions it was started with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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
