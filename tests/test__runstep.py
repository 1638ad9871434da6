"""The step of ``jobtoken run`` (``_runstep``): the renewal it runs in process is bounded.

A renewal child that hangs is killed by the sidecar after its time limit; a renewal run
inside the step must end at the same limit with the same retryable failure, or a hung
server would hold the step (and the waiter's next instant) forever.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from jobtoken import _renewal, _runstep
from jobtoken._tokendir import TokenDir


def test_a_renewal_past_its_limit_is_a_retryable_failure(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    def hang(tokendir: TokenDir, *, min_valid_s: float | None = None) -> None:
        time.sleep(30)

    monkeypatch.setattr(_renewal, "renew", hang)
    started = time.monotonic()
    handle = _runstep._InProcessRenewal(TokenDir(tmp_path), 0.2, ())
    report = handle.poll()
    assert time.monotonic() - started < 10
    assert report is not None and not report.ok and not report.permanent
    assert "took longer than" in str(report.error)


def test_the_renewal_gets_the_min_valid_the_sidecar_asked_for(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    seen = []

    def fake(tokendir: TokenDir, *, min_valid_s: float | None = None) -> object:
        seen.append(min_valid_s)
        raise RuntimeError("no server here")

    monkeypatch.setattr(_renewal, "renew", fake)
    report = _runstep._InProcessRenewal(TokenDir(tmp_path), 5.0, ("--min-valid", "0")).poll()
    assert seen == [0.0] and report is not None and not report.ok
    _runstep._InProcessRenewal(TokenDir(tmp_path), 5.0, ())
    assert seen == [0.0, None]
