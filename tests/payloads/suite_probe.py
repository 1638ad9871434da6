"""Run only by ``tests/test_suite_hygiene.py``: a nested pytest started the hostile way
(HUP and INT ignored, USR1 blocked, stdin closed, the host's token and jobtoken settings
in the environment) checks here what every fixture and test of the suite may rely on.

Not collected by the suite itself (its name does not start with ``test_``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict

import pytest
from tests.conftest import host_settings
from tests.suiteoptions import LONG


@pytest.fixture(scope="session")
def first_environment() -> Dict[str, str]:
    """The environment a session fixture (set up before any function fixture) sees."""
    return dict(os.environ)


def _status_masks(status: str) -> Dict[str, int]:
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return {name: int(fields[name], 16) for name in ("SigIgn", "SigBlk")}


def test_a_session_fixture_sees_no_host_setting(first_environment: Dict[str, str]) -> None:
    assert "BEARER_TOKEN_FILE" not in first_environment
    assert not any(n.startswith(("JOBTOKEN_", "CONDOR_")) for n in first_environment)
    assert "XDG_RUNTIME_DIR" not in first_environment
    assert host_settings() == []


def test_the_suite_knob_was_read_before_the_environment_was_cleaned() -> None:
    assert LONG


def test_a_child_starts_with_default_signals_and_an_empty_stdin() -> None:
    child = subprocess.run(
        [sys.executable, "-c",
         "import sys; data = sys.stdin.read(); print(open('/proc/self/status').read());"
         "print('stdin-bytes', len(data))"],
        stdout=subprocess.PIPE, text=True, timeout=60, check=True)
    masks = _status_masks(child.stdout)
    hup_int_usr1 = (1 << 0) | (1 << 1) | (1 << 9)
    assert masks["SigIgn"] & hup_int_usr1 == 0 and masks["SigBlk"] & hup_int_usr1 == 0
    assert "stdin-bytes 0" in child.stdout  # /dev/null, not a file the run opened
