"""The renewal scheduler of one token directory: decides when to renew and reacts to outcomes.

It is driven by ``tick()`` calls (from the payload supervisor's loop, or from the
standalone sidecar's loop) and never blocks: a renewal runs as a short-lived child
process (``_renewal``) that it starts and later collects. The decisions themselves
come from the pure ``_policy`` functions; this module only holds the state, talks to
the child, writes ``state.json``/metrics and logs one line per event.

It must NOT import httpx, jwt or cryptography (the waiting process stays small), and
it never reads or logs a token: everything it knows comes from the child's report.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from typing import Callable, List, Optional, Protocol

from . import _policy as policy
from ._clock import Clock, SystemClock, utc_text
from ._errors import JobtokenError, RenewalReport, ServerUnavailableError
from ._metrics import REFRESH_S, MetricValues, remove_metrics, write_metrics
from ._revocation import PendingRevocation, clear_pending, write_pending
from ._tokendir import JobRecord, RenewalState, TokenDir
from ._tokenfile import remove_secret_file, remove_stale_temps

__all__ = ["ChildHandle", "Sidecar", "run_renewal_child", "spawn_renewal"]

logger = logging.getLogger(__name__)

_POLL_S = 0.2  # how often a running child is checked; signals still wake the loop at once
_REVOKE_ATTEMPT_S = 3.0  # room a retried revocation needs (child start-up and one request)
_STAT_EVERY_S = 60.0  # idle wake-ups cost CPU on every job of a node; a minute is plenty


class ChildHandle(Protocol):
    def poll(self) -> Optional[RenewalReport]:
        """The child's report once it has ended, else None."""

    def kill(self) -> None: ...


class _ProcessChild:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    def poll(self) -> Optional[RenewalReport]:
        if self._proc.poll() is None:
            return None
        out, _err = self._proc.communicate()
        return RenewalReport.from_child(out, self._proc.returncode)

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate()


def spawn_renewal(tokendir: TokenDir, *args: str) -> ChildHandle:
    """Start ``python -m jobtoken._renewal DIR ARGS`` without waiting for it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobtoken._renewal", str(tokendir.path), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )
    return _ProcessChild(proc)


def run_renewal_child(tokendir: TokenDir, *args: str, timeout_s: float) -> RenewalReport:
    """Run one renewal child to its end (used before the payload starts and at cleanup)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobtoken._renewal", str(tokendir.path), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        close_fds=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return RenewalReport.failure(
            ServerUnavailableError(f"renewal did not finish within {timeout_s:.0f} s")
        )
    return RenewalReport.from_child(out, proc.returncode)


class Sidecar:
    """Keeps one token directory's access token fresh; see the module docstring.

    Args:
        send_signal: delivers a signal to the payload (warning before expiry).
        stop_payload: asks the payload to stop (``on_failure = "stop"``).
        spawn: starts a renewal child (tests pass a fake).
    """

    def __init__(
        self,
        tokendir: TokenDir,
        spec: JobRecord,
        *,
        clock: Optional[Clock] = None,
        rnd: Optional[random.Random] = None,
        spawn: Optional[Callable[..., ChildHandle]] = None,
        send_signal: Optional[Callable[[int], None]] = None,
        stop_payload: Optional[Callable[[], None]] = None,
    ) -> None:
        self.tokendir = tokendir
        self.spec = spec
        self.clock: Clock = clock or SystemClock()
        self.rnd = rnd or random.Random()
        self._spawn = spawn or (lambda *args: spawn_renewal(tokendir, *args))
        self._send_signal = send_signal
        self._stop_payload = stop_payload
        self.settings = policy.renewal_settings(spec.fraction, spec.margin_s, spec.max_backoff_s)
        self.jitter = policy.job_jitter(spec.job_id, self.settings.jitter_fraction)
        self.state = RenewalState(job_id=spec.job_id, sidecar_pid=os.getpid())
        self.stopped_payload = False
        self._child: Optional[ChildHandle] = None
        self._child_started = 0.0
        self._child_limit_s = policy.child_timeout_s(spec.timeout_s, requests=4)
        self._bt_mtime: Optional[int] = None
        self._metrics_at = float("-inf")  # when the metrics file was last written
        self._metrics_error: Optional[str] = None

    def resume(
        self, state: Optional[RenewalState], *, watched_mtime: Optional[int], stopped: bool
    ) -> None:
        """Continue where an earlier process of this job left off (``_runstep``): its
        ``state.json``, the token file's mtime it knew, whether it stopped the payload."""
        if state is not None:
            self.state = state
        self._bt_mtime = watched_mtime
        self.stopped_payload = stopped

    @property
    def busy(self) -> bool:
        """A renewal child is in flight (``tick`` again to collect it)."""
        return self._child is not None

    @property
    def watched_mtime(self) -> Optional[int]:
        """The token file's mtime after our last renewal; a change means someone else renewed."""
        return self._bt_mtime

    def next_wakeup(self, *, watch: bool = True) -> Optional[float]:
        """When ``tick`` has work next; without ``watch``, leave out the periodic look
        at the token file (the caller watches its mtime itself)."""
        return self._next_wakeup(self.clock.now(), watch=watch)

    # --- outcomes -----------------------------------------------------------------------

    def adopt(self, report: RenewalReport) -> None:
        """Take a renewal report (the first token, or one a child produced)."""
        now = self.clock.now()
        self.state.last_attempt_at = now
        if report.ok and report.expires_at is not None:
            self._success(report, report.expires_at, now)
        else:
            self._failure(report, now)
        self._save(now)

    def _margin(self) -> float:
        st = self.state
        if st.expires_at is None:
            return self.settings.default_margin_s
        lifetime = st.expires_at - (st.issued_at if st.issued_at is not None else st.expires_at)
        if lifetime <= 0:
            lifetime = policy.ASSUMED_LIFETIME_S
        return policy.margin_for(lifetime, self.settings)

    def _success(self, report: RenewalReport, expires_at: float, now: float) -> None:
        st = self.state
        renewed = not report.reused and st.expires_at is not None
        st.expires_at = expires_at
        st.issued_at = report.issued_at
        st.jti = report.jti
        st.subject = report.subject
        st.scopes = report.scopes
        st.audiences = report.audiences
        if renewed:
            st.renewals += 1
        st.consecutive_failures = 0
        st.last_error = None
        st.last_error_permanent = False
        st.warned = False
        st.credential_lost = False
        st.last_success_at = now
        st.next_attempt_at = self._plan_renewal(st.expires_at, st.issued_at, now)
        self._bt_mtime = self._mtime()
        logger.info(
            "%s exp=%s next=%s jti=%s sub=%s scope=%s aud=%s job=%s",
            "renewed" if renewed else ("token kept" if report.reused else "token obtained"),
            utc_text(st.expires_at),
            "none" if st.next_attempt_at is None else utc_text(st.next_attempt_at),
            st.jti,
            st.subject,
            " ".join(st.scopes),
            " ".join(st.audiences),
            self.spec.job_id,
        )

    def _plan_renewal(
        self, expires_at: float, issued_at: Optional[float], now: float
    ) -> Optional[float]:
        at = policy.next_renewal_at(
            issued_at, expires_at, jitter=self.jitter, settings=self.settings, obtained_at=now
        )
        at = max(at, now + self.settings.min_backoff_s)
        if not policy.within_horizon(at, self.spec.job_end_at):
            return None
        return at

    def _failure(self, report: RenewalReport, now: float) -> None:
        st = self.state
        st.consecutive_failures += 1
        st.failures_total += 1
        st.last_error = str(report.error)
        permanent = report.permanent
        st.last_error_permanent = permanent
        if permanent or st.expires_at is None:
            st.next_attempt_at = None if permanent else now + self.settings.min_backoff_s
        else:
            at = policy.next_attempt_at(
                now,
                attempt=st.consecutive_failures,
                retry_after_s=report.retry_after_s,
                expires_at=st.expires_at,
                settings=self.settings,
                rnd=self.rnd,
                margin_s=self._margin(),
            )
            st.next_attempt_at = at if policy.within_horizon(at, self.spec.job_end_at) else None
        logger.warning(
            "renewal failed status=%s error=%s permanent=%s retry_in=%s failures=%d job=%s: %s",
            report.status,
            report.oauth_error or report.error_type,
            "yes" if permanent else "no",
            "never" if st.next_attempt_at is None else f"{st.next_attempt_at - now:.0f}s",
            st.consecutive_failures,
            self.spec.job_id,
            st.last_error,
        )

    # --- the tick -----------------------------------------------------------------------

    def tick(self) -> Optional[float]:
        """Do what is due now; return the wall-clock instant of the next wake-up."""
        now = self.clock.now()
        if self._child is not None:
            report = self._child.poll()
            if report is None:
                if self.clock.monotonic() - self._child_started <= self._child_limit_s:
                    return now + _POLL_S
                self._child.kill()
                report = RenewalReport.failure(ServerUnavailableError(
                    f"renewal took longer than {self._child_limit_s:.0f} s; killed"
                ))
            self._child = None
            self.adopt(report)
            now = self.clock.now()
        elif self._bt_changed():
            # someone else (``jobtoken ensure``) renewed: learn the new exp, don't renew twice
            self._start_child(now, "--min-valid", "0")
            return now + _POLL_S
        st = self.state
        if st.next_attempt_at is not None and now >= st.next_attempt_at:
            self._start_child(now)
            return now + _POLL_S
        self._escalate(now)
        if self.spec.metrics_dir and now - self._metrics_at >= REFRESH_S:
            self._write_metrics(now)  # no event for a while: the mtime still shows we live
        return self._next_wakeup(now)

    def _start_child(self, now: float, *args: str) -> None:
        self.state.last_attempt_at = now
        self._child_started = self.clock.monotonic()
        self._child = self._spawn(*args)

    def _mtime(self) -> Optional[int]:
        try:
            return os.stat(self.tokendir.bearer_token).st_mtime_ns
        except OSError:
            return None

    def _bt_changed(self) -> bool:
        return self._bt_mtime is not None and self._mtime() != self._bt_mtime

    def _escalate(self, now: float) -> None:
        st = self.state
        if st.expires_at is None:
            return
        steps = policy.escalation_steps(
            now,
            st.expires_at,
            st.next_attempt_at,
            self.spec.warn_before_s,
            permanent=st.last_error_permanent,
            failing=st.consecutive_failures > 0,
            warned=st.warned,
            credential_lost=st.credential_lost,
            stop_on_loss=self.spec.on_failure == "stop",
            stopped=self.stopped_payload,
        )
        if steps.warn:
            st.warned = True
            self._warn_payload(now)
        if steps.lose_credential:
            st.credential_lost = True
            logger.error(
                "credential lost: token expires at %s (in %.0fs) and renewal %s job=%s: %s",
                utc_text(st.expires_at),
                st.expires_at - now,
                "was refused for good" if st.last_error_permanent else "keeps failing",
                self.spec.job_id,
                st.last_error,
            )
            self._save(now)
        if steps.stop_payload:
            self.stopped_payload = True
            logger.error("stopping the payload: its token has expired job=%s", self.spec.job_id)
            if self._stop_payload is not None:
                self._stop_payload()

    def _warn_payload(self, now: float) -> None:
        name = self.spec.warn_signal
        logger.warning(
            "token expires in %.0fs and renewal is failing; %s job=%s",
            self.state.expires_at - now if self.state.expires_at else 0,
            f"warning the payload with SIG{name}" if name else "no warn_signal configured",
            self.spec.job_id,
        )
        if name and self._send_signal is not None:
            self._send_signal(signal_number(name))

    def _next_wakeup(self, now: float, *, watch: bool = True) -> Optional[float]:
        st = self.state
        candidates: List[float] = []
        if st.next_attempt_at is not None:
            candidates.append(st.next_attempt_at)
        if st.expires_at is not None:
            for at in (st.expires_at - self.spec.warn_before_s, st.expires_at):
                if at > now:
                    candidates.append(at)
        if watch and self._bt_mtime is not None:
            candidates.append(now + _STAT_EVERY_S)  # notice a renewal by ``jobtoken ensure``
        if self.spec.metrics_dir:
            candidates.append(max(now, self._metrics_at + REFRESH_S))
        return min(candidates) if candidates else None

    # --- persistence and the end ------------------------------------------------------

    def _save(self, now: float) -> None:
        self.state.updated_at = now
        try:
            self.tokendir.write_state(self.state)
        except JobtokenError as exc:
            logger.warning("cannot write state error=%s", exc.message)
        if self.spec.metrics_dir:
            self._write_metrics(now)

    def _write_metrics(self, now: float) -> None:
        self._metrics_at = now  # a failure is not retried before the next event or refresh
        try:
            write_metrics(self.spec.metrics_dir or "", self.spec.job_id,
                          MetricValues.of_state(self.state), now)
        except JobtokenError as exc:
            if exc.message != self._metrics_error:  # once, not every refresh of a long job
                logger.warning("cannot write metrics error=%s", exc.message)
            self._metrics_error = exc.message
        else:
            self._metrics_error = None

    def set_payload_pid(self, pid: Optional[int]) -> None:
        self.state.payload_pid = pid
        self._save(self.clock.now())

    def finish(self, *, revoke: Optional[bool] = None) -> None:
        """Stop renewing, revoke the job mytoken if so configured, remove token files."""
        self._finish_child()
        spec = self.spec
        do_revoke = spec.revoke_at_end if revoke is None else revoke
        if spec.mytoken_owned and do_revoke:
            self._revoke()
        # The job mytoken goes only with a successful revocation (the child deletes it):
        # kept, a JOB_EXIT hook or ``jobtoken revoke`` can still revoke it later.
        try:
            remove_secret_file(self.tokendir.bearer_token)
        except JobtokenError as exc:
            logger.warning("cannot remove %s: %s", self.tokendir.bearer_token, exc.message)
        remove_stale_temps(self.tokendir.path)
        self.state = replace(self.state, finished=True, next_attempt_at=None)
        self._save(self.clock.now())
        if spec.metrics_dir:
            remove_metrics(spec.metrics_dir, spec.job_id)
        if spec.remove_dir_at_end:
            _remove_tree(self.tokendir)

    def _revoke(self) -> None:
        """Revoke the job mytoken, retrying within the kill grace; else record it pending.

        "Revoked" is logged only when the server said so. A failure is retried with
        backoff (honouring Retry-After) while ``REVOKE_BUDGET_S`` allows, then handed
        on: the mytoken file stays and a ``revoke.pending`` record says so, for
        ``jobtoken revoke``, the exit hook or stage 2 (see ``_revocation``).
        """
        spec = self.spec
        deadline = self.clock.monotonic() + policy.REVOKE_BUDGET_S
        never = threading.Event()
        attempt = 0
        while True:
            attempt += 1
            left = max(1.0, deadline - self.clock.monotonic())
            report = run_renewal_child(self.tokendir, "--revoke", timeout_s=policy.child_timeout_s(
                spec.timeout_s, requests=2, cap_s=left))
            if report.ok:
                clear_pending(self.tokendir)
                if report.revoked:
                    logger.info("job mytoken revoked job=%s mom_id=%s", spec.job_id, spec.mom_id)
                return
            delay = None if report.permanent else policy.revocation_retry_delay(
                attempt, report.retry_after_s,
                deadline - self.clock.monotonic() - _REVOKE_ATTEMPT_S)
            if delay is None:
                break
            logger.warning("revocation failed, retrying in %.0fs job=%s: %s", delay,
                           spec.job_id, report.error)
            self.clock.wait(never, delay)
        write_pending(self.tokendir, PendingRevocation(
            job_id=spec.job_id, mom_id=spec.mom_id, since=self.clock.now(), attempts=attempt,
            error=str(report.error)))
        self.state.last_error = f"revocation failed, pending: {report.error}"
        logger.error(
            "revocation failed, pending (the job mytoken stays live until revoked by "
            "'jobtoken revoke', the exit hook or stage 2) job=%s mom_id=%s attempts=%d: %s",
            spec.job_id, spec.mom_id, attempt, report.error,
        )

    def _finish_child(self, wait_s: float = 5.0) -> None:
        """Let a renewal in flight finish (its token may already be on disk), then stop it."""
        child, self._child = self._child, None
        if child is None:
            return
        deadline = self.clock.monotonic() + wait_s
        never = threading.Event()
        while True:
            report = child.poll()
            if report is not None:
                self.adopt(report)
                return
            if self.clock.monotonic() >= deadline:
                child.kill()
                return
            self.clock.wait(never, 0.05)


def _remove_tree(tokendir: TokenDir) -> None:
    for problem in tokendir.remove():
        logger.warning("%s", problem)


def signal_number(name: str) -> int:
    """``USR1``/``SIGUSR1``/``10`` → the signal number.

    Raises:
        JobtokenError: not a signal name.
    """
    text = name.strip().upper()
    if text.isascii() and text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(getattr(signal, text))
    except AttributeError:
        from ._config import setting
        from ._errors import ConfigError

        raise ConfigError(
            f"{setting('renewal.warn_signal')}: unknown signal name {name!r}"
        ) from None

