"""The renewal scheduler, driven by a fake clock and fake renewal children (no waiting)."""

from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from jobtoken._errors import ConfigError, RenewalReport
from jobtoken._sidecar import Sidecar, signal_number
from jobtoken._tokendir import JobRecord, TokenDir
from tests.fakes import FakeClock

LIFETIME = 3600.0


class FakeChild:
    def __init__(self, report: RenewalReport, polls: int = 0) -> None:
        self.report = report
        self.polls_left = polls
        self.killed = False

    def poll(self) -> Optional[RenewalReport]:
        if self.polls_left > 0:
            self.polls_left -= 1
            return None
        return self.report

    def kill(self) -> None:
        self.killed = True


class Harness:
    def __init__(self, tmp_path: Path, **spec: Any) -> None:
        self.clock = FakeClock()
        self.tokendir = TokenDir.create(tmp_path / "job")
        defaults: Dict[str, Any] = dict(
            job_id="job-7", server_url="https://mt.example.org",
            mytoken_path=str(self.tokendir.mytoken), scopes=("storage.create:/vo/x",),
        )
        defaults.update(spec)
        self.spec = JobRecord(**defaults)
        self.tokendir.write_spec(self.spec)
        self.outcomes: List[RenewalReport] = []
        self.spawned: List[tuple] = []
        self.signals: List[int] = []
        self.stopped = 0
        self.sidecar = Sidecar(
            self.tokendir, self.spec, clock=self.clock, spawn=self._spawn,
            send_signal=self.signals.append, stop_payload=self._stop,
        )

    def _spawn(self, *args: str) -> FakeChild:
        self.spawned.append(args)
        return FakeChild(self.outcomes.pop(0))

    def _stop(self) -> None:
        self.stopped += 1

    def ok(self, lifetime: float = LIFETIME, **extra: Any) -> RenewalReport:
        now = self.clock.now()
        return RenewalReport(ok=True, expires_at=now + lifetime, issued_at=now, jti="j",
                             subject="s", scopes=("storage.create:/vo/x",),
                             audiences=("https://se",), **extra)

    def fail(self, *, retryable: bool = True, error_type: str = "ServerUnavailableError",
             **extra: Any) -> RenewalReport:
        return RenewalReport(ok=False, error="boom", error_type=error_type,
                             retryable=retryable, exit_code=75, **extra)

    def run_until(self, t: float) -> None:
        """Call tick at every instant it asks for, up to clock time t."""
        while True:
            wake = self.sidecar.tick()
            if wake is None or wake > t:
                return
            self.clock.advance(max(0.0, wake - self.clock.now()))


def test_first_renewal_follows_the_rule(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sidecar.adopt(h.ok())
    st = h.sidecar.state
    start = h.clock.now()
    assert st.next_attempt_at is not None
    lead = st.next_attempt_at - start
    # renew at (2/3 - jitter) of the lifetime, jitter < 10 %: between 57 % and 67 %
    assert 0.56 * LIFETIME <= lead <= 0.67 * LIFETIME
    assert h.sidecar.tick() == pytest.approx(st.next_attempt_at, abs=1e-6)  # nothing to do yet
    assert h.spawned == []


def test_renewal_is_spawned_when_due_and_success_moves_on(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sidecar.adopt(h.ok())
    due = h.sidecar.state.next_attempt_at
    h.clock.advance(due - h.clock.now())
    h.outcomes.append(h.ok())
    h.sidecar.tick()  # starts the child
    assert len(h.spawned) == 1
    h.sidecar.tick()  # collects it
    st = h.sidecar.state
    assert st.renewals == 1 and st.consecutive_failures == 0
    assert st.next_attempt_at > due
    saved = json.loads(h.tokendir.state_file.read_text())
    assert saved["renewals"] == 1 and saved["job_id"] == "job-7"


def test_transient_failures_back_off_and_keep_the_old_token(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sidecar.adopt(h.ok())
    exp = h.sidecar.state.expires_at
    h.clock.advance(h.sidecar.state.next_attempt_at - h.clock.now())
    h.outcomes += [h.fail(), h.fail(), h.fail(), h.ok()]
    h.run_until(exp)
    st = h.sidecar.state
    assert st.renewals == 1 and st.failures_total == 3 and st.consecutive_failures == 0
    assert st.expires_at > exp
    assert not st.credential_lost and h.stopped == 0


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sidecar.adopt(h.ok())
    h.clock.advance(h.sidecar.state.next_attempt_at - h.clock.now())
    h.outcomes.append(h.fail(retry_after_s=240.0))
    h.sidecar.tick()
    h.sidecar.tick()
    assert h.sidecar.state.next_attempt_at - h.clock.now() >= 240.0


def test_permanent_refusal_is_not_retried_and_escalates(tmp_path: Path, caplog) -> None:
    h = Harness(tmp_path, warn_signal="USR1", on_failure="stop")
    h.sidecar.adopt(h.ok())
    exp = h.sidecar.state.expires_at
    h.clock.advance(h.sidecar.state.next_attempt_at - h.clock.now())
    h.outcomes.append(h.fail(retryable=False, error_type="MytokenRejectedError"))
    with caplog.at_level(logging.WARNING, logger="jobtoken"):
        h.run_until(exp + 10)
    st = h.sidecar.state
    assert len(h.spawned) == 1  # no retry storm
    assert st.credential_lost and st.last_error_permanent
    assert h.signals == [signal.SIGUSR1]  # warned once
    assert h.stopped == 1  # stopped once the token had expired
    assert any("credential lost" in r.getMessage() for r in caplog.records)


def test_keep_running_is_the_default(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sidecar.adopt(h.ok())
    exp = h.sidecar.state.expires_at
    h.clock.advance(h.sidecar.state.next_attempt_at - h.clock.now())
    h.outcomes.append(h.fail(retryable=False, error_type="MytokenRejectedError"))
    h.run_until(exp + 10)
    assert h.sidecar.state.credential_lost and h.stopped == 0 and h.signals == []


def test_refused_token_is_retried_not_final(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sidecar.adopt(h.ok())
    h.clock.advance(h.sidecar.state.next_attempt_at - h.clock.now())
    h.outcomes += [h.fail(retryable=False, error_type="TokenCheckError"), h.ok()]
    h.run_until(h.sidecar.state.expires_at)
    assert h.sidecar.state.renewals == 1 and len(h.spawned) == 2


def test_no_renewal_past_the_wall_time_horizon(tmp_path: Path) -> None:
    clock_start = FakeClock().now()
    h = Harness(tmp_path, job_end_at=clock_start + 0.3 * LIFETIME)
    h.sidecar.adopt(h.ok())
    assert h.sidecar.state.next_attempt_at is None
    h.run_until(clock_start + LIFETIME - 1)
    assert h.spawned == []


def test_slow_child_is_killed_and_counted_as_transient(tmp_path: Path) -> None:
    h = Harness(tmp_path, timeout_s=5.0)
    h.sidecar.adopt(h.ok())
    h.clock.advance(h.sidecar.state.next_attempt_at - h.clock.now())
    child = FakeChild(h.ok(), polls=10_000)
    h.sidecar._spawn = lambda *a: child  # type: ignore[assignment]
    h.sidecar.tick()
    h.clock.advance(4 * 5.0 + 16)
    h.sidecar.tick()
    assert child.killed
    st = h.sidecar.state
    assert st.consecutive_failures == 1 and not st.last_error_permanent
    assert "killed" in (st.last_error or "")


def test_external_renewal_is_noticed(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.tokendir.bearer_token.write_text("a.b.c\n")
    h.sidecar.adopt(h.ok())
    h.tokendir.bearer_token.write_text("d.e.f.longer\n")  # `jobtoken ensure` renewed
    h.outcomes.append(h.ok(reused=True))
    h.sidecar.tick()
    assert h.spawned == [("--min-valid", "0")]


def test_metrics_are_written_and_removed(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    h = Harness(tmp_path, metrics_dir=str(metrics))
    h.sidecar.adopt(h.ok())
    [prom] = list(metrics.iterdir())
    text = prom.read_text()
    expires_at = h.clock.now() + LIFETIME
    assert f'jobtoken_token_expiry_timestamp_seconds{{job_id="job-7"}} {expires_at:.3f}' in text
    assert "jobtoken_credential_lost" in text
    h.sidecar.finish(revoke=False)
    assert list(metrics.iterdir()) == []


def test_metrics_are_rewritten_between_events(tmp_path: Path) -> None:
    """The file's mtime (node_textfile_mtime_seconds) shows the sidecar lives even when
    nothing happens for a long token lifetime; and its own stale-file expiry never takes
    a live job's file."""
    from jobtoken._metrics import REFRESH_S, STALE_AFTER_S

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    h = Harness(tmp_path, metrics_dir=str(metrics))
    h.sidecar.adopt(h.ok(lifetime=10 * STALE_AFTER_S))
    [prom] = list(metrics.iterdir())
    first = prom.stat().st_ino
    start = h.clock.now()
    wake = h.sidecar.tick()
    assert wake is not None and wake <= start + REFRESH_S  # not at the next renewal only
    h.clock.advance(REFRESH_S)
    h.sidecar.tick()
    assert prom.stat().st_ino != first  # replaced (atomic rename), same content otherwise
    assert h.spawned == []  # no renewal was due


def test_a_metrics_directory_that_went_away_is_logged_once(tmp_path: Path, caplog) -> None:
    from jobtoken._metrics import REFRESH_S

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    h = Harness(tmp_path, metrics_dir=str(metrics))
    h.sidecar.adopt(h.ok(lifetime=100 * REFRESH_S))
    shutil.rmtree(metrics)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            h.clock.advance(REFRESH_S)
            h.sidecar.tick()
    assert caplog.text.count("cannot write metrics") == 1


def test_finish_removes_token_files_but_not_a_borrowed_mytoken(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.tokendir.bearer_token.write_text("tok\n")
    h.tokendir.mytoken.write_text("user mytoken\n")
    h.sidecar.finish()
    assert not h.tokendir.bearer_token.exists()
    assert h.tokendir.mytoken.exists()  # not ours: the user's own mytoken file
    assert json.loads(h.tokendir.state_file.read_text())["finished"] is True


def test_finish_revokes_an_owned_mytoken(tmp_path: Path, mocker) -> None:
    h = Harness(tmp_path, mytoken_owned=True, revoke_at_end=True)
    h.tokendir.mytoken.write_text("job mytoken\n")
    child = mocker.patch("jobtoken._sidecar.run_renewal_child",
                         return_value=RenewalReport(ok=False, error="server down"))
    h.sidecar.finish()
    assert child.call_args.args[1] == "--revoke"
    # not revoked: the file stays so that an exit hook or `jobtoken revoke` can still do it
    assert h.tokendir.mytoken.exists()


def test_finish_lets_a_renewal_in_flight_land(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sidecar.adopt(h.ok())
    h.clock.advance(h.sidecar.state.next_attempt_at - h.clock.now())
    h.sidecar._spawn = lambda *a: FakeChild(h.ok(), polls=3)  # type: ignore[assignment]
    h.sidecar.tick()  # child started
    h.sidecar.finish(revoke=False)
    assert h.sidecar.state.renewals == 1


@pytest.mark.parametrize(("name", "number"), [("USR1", signal.SIGUSR1),
                                              ("SIGTERM", signal.SIGTERM), ("2", 2)])
def test_signal_number(name: str, number: int) -> None:
    assert signal_number(name) == number


def test_signal_number_rejects_nonsense() -> None:
    with pytest.raises(ConfigError, match="unknown signal"):
        signal_number("BOGUS")
