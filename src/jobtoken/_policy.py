"""Renewal policy: when to renew, how long to back off, when to give up, how to exit.

Every function here is pure: it takes the instants it needs (``now``, ``iat``, ``exp``,
all epoch seconds from one clock) and returns a decision. This module must NOT do I/O,
read a clock, log, sleep, draw its own randomness (callers pass a seeded
``random.Random`` or a number in [0, 1)), or import anything beyond small stdlib
modules. Invalid arguments are programming errors and raise ``ValueError``; user
input is validated (and turned into ``ConfigError``) by ``_config``.

The renewal rule (DESIGN.md, after Vault's lifetime watcher)::

    renew_at = iat + (fraction - jitter) * (exp - iat),  but never later than exp - margin

``jitter`` is derived from the job identity (``job_jitter``) so that a fleet of jobs
started together spreads its renewals, and a restarted sidecar keeps its slot.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

__all__ = [
    "ASSUMED_LIFETIME_S",
    "CHILD_STARTUP_S",
    "Escalation",
    "EscalationSteps",
    "Health",
    "HealthThresholds",
    "MIN_JOB_MYTOKEN_S",
    "RENEWAL_LOCK_WAIT_S",
    "RenewalSettings",
    "backoff_s",
    "child_timeout_s",
    "escalation",
    "escalation_steps",
    "exit_code_from_returncode",
    "job_jitter",
    "margin_for",
    "next_attempt_at",
    "next_renewal_at",
    "parent_expires_too_soon",
    "renewal_settings",
    "token_health",
    "worst_health",
    "renewals_per_hour",
    "usages_budget",
    "revocation_retry_delay",
    "wait_status_to_exit",
    "within_horizon",
]

#: Lifetime assumed for a token without ``iat`` when the caller cannot say when it was
#: obtained either: the shortest lifetime the WLCG JWT profile recommends (15 min).
#: A shorter assumed lifetime puts the renewal later, never earlier than the rule would
#: for a compliant token, so a missing ``iat`` cannot cause a renewal storm; the
#: ``exp - margin`` cap still keeps the renewal safely before expiry.
ASSUMED_LIFETIME_S = 900.0

_MAX_MARGIN_SHARE = 1.0 / 3.0


@dataclass(frozen=True)
class RenewalSettings:
    """Knobs of the renewal rule; defaults follow DESIGN.md ("Renewal rule").

    Attributes:
        fraction: share of the token lifetime after which to renew (before jitter).
        jitter_fraction: upper bound of the per-job jitter subtracted from ``fraction``.
        min_margin_s: smallest margin before ``exp`` for ordinary lifetimes.
        default_margin_s: margin before ``exp`` by which a renewal must have happened.
        max_backoff_s: cap of the exponential backoff after failed renewals.
        min_backoff_s: no retry is ever scheduled sooner than this after a failure.
        quick_retries: retries on the short backoff before they spread over the time
            the token can still wait (``next_attempt_at``).
    """

    fraction: float = 2.0 / 3.0
    jitter_fraction: float = 0.1
    min_margin_s: float = 60.0
    default_margin_s: float = 300.0
    max_backoff_s: float = 300.0
    min_backoff_s: float = 2.0
    quick_retries: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"renewal fraction must be in (0, 1), got {self.fraction}")
        if not 0.0 <= self.jitter_fraction < self.fraction:
            raise ValueError(
                f"jitter_fraction must be in [0, fraction), got {self.jitter_fraction}"
            )
        if not 0.0 <= self.min_margin_s <= self.default_margin_s:
            raise ValueError("margins must satisfy 0 <= min_margin_s <= default_margin_s")
        if not 0.0 < self.min_backoff_s <= self.max_backoff_s:
            raise ValueError("backoff must satisfy 0 < min_backoff_s <= max_backoff_s")
        if self.quick_retries < 0:
            raise ValueError(f"quick_retries must be >= 0, got {self.quick_retries}")


def renewal_settings(fraction: float, margin_s: float, max_backoff_s: float) -> RenewalSettings:
    """The rule's knobs for a job's configured ``fraction``, ``margin_s`` and backoff cap.

    The one derivation both ``prepare`` (sizing ``usages_AT``) and the sidecar (planning
    renewals) use, so the budget counts the renewals the sidecar will really make.
    ``min_margin_s`` never exceeds the configured margin; ``min_backoff_s`` shrinks for
    short test margins (a 2 s retry would outlast a 4 s token) but stays 2 s in production.

    Raises:
        ValueError: settings the rule cannot use (see ``RenewalSettings``).
    """
    return RenewalSettings(
        fraction=fraction,
        min_margin_s=min(60.0, margin_s),
        default_margin_s=margin_s,
        max_backoff_s=max_backoff_s,
        min_backoff_s=min(2.0, max(0.2, margin_s / 4), max_backoff_s),
    )


#: Python start-up and imports of a renewal child on a loaded worker node.
CHILD_STARTUP_S = 15.0
#: How long a renewal child waits for another renewal of the same directory to finish.
RENEWAL_LOCK_WAIT_S = 60.0


def child_timeout_s(
    request_timeout_s: float, *, requests: int, lock_wait_s: float = 0.0,
    cap_s: Optional[float] = None,
) -> float:
    """How long a renewal child may run before the waiting process gives up on it.

    ``requests`` server round trips of ``request_timeout_s`` each (a renewal: discovery,
    JWKS, access token and one spare; a revocation: discovery and revoke), the child's
    start-up, and ``lock_wait_s`` when it may first queue behind another renewal.
    ``cap_s`` bounds it where the caller itself has a deadline (cleanup at job end).
    """
    limit = requests * request_timeout_s + CHILD_STARTUP_S + lock_wait_s
    return limit if cap_s is None else min(limit, cap_s)


#: How long the sidecar may spend revoking the job mytoken at the job's end: batch
#: systems give a stopping job a short kill grace (HTCondor: the starter's, ARC: the LRMS's).
REVOKE_BUDGET_S = 25.0


def revocation_retry_delay(
    attempt: int, retry_after_s: Optional[float], left_s: float, *, first_s: float = 1.0
) -> Optional[float]:
    """How long to wait before revocation attempt ``attempt + 1``; None: give up now.

    Doubling from ``first_s``, raised to the server's ``Retry-After``; None when the
    wait would not leave ``left_s`` room for another attempt (the record of a pending
    revocation then hands it to whoever can retry later).
    """
    delay = first_s * 2.0 ** max(0, min(attempt - 1, 16))
    if retry_after_s is not None and retry_after_s > delay:
        delay = retry_after_s
    return delay if delay < left_s else None


#: A job mytoken that would live shorter than this is not worth minting (the job
#: would start only to lose its credential minutes later).
# NOTE for the condor engineer (issue 9): condor._fit_into_parent's literal 300.0 is this rule.
MIN_JOB_MYTOKEN_S = 300.0


def parent_expires_too_soon(parent_exp: float, now: float) -> bool:
    """Whether a parent mytoken expiring at ``parent_exp`` leaves too little for a job.

    A sub-mytoken cannot outlive its parent; below ``MIN_JOB_MYTOKEN_S`` a job would
    be started with a chain that ends before it can do useful work.
    """
    return parent_exp - now < MIN_JOB_MYTOKEN_S


class Escalation(enum.Enum):
    """What a failing renewal should make the sidecar do."""

    NONE = "none"  # keep retrying quietly
    WARN = "warn"  # tell the payload (signal) that its token is about to run out
    CREDENTIAL_LOST = "credential_lost"  # give up: record, stop the payload, exit 69


def job_jitter(job_id: str, fraction: float) -> float:
    """A per-job value in [0, fraction), stable across restarts.

    Derived from a SHA-256 of the job identity rather than from ``random`` so that a
    restarted sidecar keeps its renewal slot while jobs submitted together (cluster
    ids differing in the last digit) land far apart.

    Raises:
        ValueError: ``fraction`` is negative.
    """
    if fraction < 0.0:
        raise ValueError(f"jitter fraction must be >= 0, got {fraction}")
    if fraction == 0.0:
        return 0.0
    digest = hashlib.sha256(job_id.encode("utf-8")).digest()
    unit = (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)  # 53 bits: in [0, 1)
    return min(unit * fraction, math.nextafter(fraction, 0.0))


def margin_for(lifetime_s: float, settings: RenewalSettings) -> float:
    """How long before ``exp`` a renewal must have happened.

    The default margin, but never more than a third of the lifetime, so very short
    tokens (tests, a 6 s token gets 2 s) still get a renewal point after issue. For
    lifetimes under three minutes this drops below ``min_margin_s`` on purpose: there
    the third-of-lifetime rule is the only margin that still leaves a token to use.

    Raises:
        ValueError: never; a non-positive lifetime gives a margin of 0.
    """
    if lifetime_s <= 0.0:
        return 0.0
    margin = max(settings.default_margin_s, settings.min_margin_s)
    return min(margin, lifetime_s * _MAX_MARGIN_SHARE)


def _effective_issued_at(
    issued_at: Optional[float], expires_at: float, obtained_at: Optional[float]
) -> float:
    """``iat`` if usable, else when we obtained the token, else ``exp - ASSUMED_LIFETIME_S``."""
    for candidate in (issued_at, obtained_at):
        if candidate is not None and candidate < expires_at:
            return candidate
    return expires_at - ASSUMED_LIFETIME_S


def next_renewal_at(
    issued_at: Optional[float],
    expires_at: float,
    *,
    jitter: float,
    settings: RenewalSettings,
    obtained_at: Optional[float] = None,
) -> float:
    """The instant at which to renew a token that is working normally.

    ``iat + (fraction - jitter) * lifetime``, capped at ``exp - margin``. A missing (or
    nonsensical, ``iat >= exp``) ``iat`` is replaced by ``obtained_at`` (the ``now``
    captured before the request that returned the token), and failing that by
    ``exp - ASSUMED_LIFETIME_S``.

    Raises:
        ValueError: ``jitter`` is outside [0, fraction).
    """
    if not 0.0 <= jitter < settings.fraction:
        raise ValueError(f"jitter must be in [0, {settings.fraction}), got {jitter}")
    iat = _effective_issued_at(issued_at, expires_at, obtained_at)
    lifetime = expires_at - iat
    planned = iat + (settings.fraction - jitter) * lifetime
    return min(planned, expires_at - margin_for(lifetime, settings))


def backoff_s(
    attempt: int, *, rnd: Union[random.Random, float], settings: RenewalSettings
) -> float:
    """Delay before retry number ``attempt`` (1 = first retry after one failure).

    Capped exponential backoff with full jitter between ``min_backoff_s`` and the cap
    ``min(max_backoff_s, min_backoff_s * 2**(attempt-1))``, so a fleet that failed
    together (server outage) does not come back in lock-step.

    Args:
        rnd: a ``random.Random`` (draws one number) or a number in [0, 1) (tables).

    Raises:
        ValueError: ``attempt`` < 1 or ``rnd`` outside [0, 1).
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    unit = rnd.random() if isinstance(rnd, random.Random) else float(rnd)
    if not 0.0 <= unit < 1.0:
        raise ValueError(f"random unit must be in [0, 1), got {unit}")
    low = settings.min_backoff_s
    cap = min(settings.max_backoff_s, low * 2.0 ** min(attempt - 1, 64))
    return low + unit * (cap - low)


def _attempt_cap(now: float, expires_at: float, margin_s: float) -> Optional[float]:
    """Latest instant the next try may have while the token still works.

    Before ``exp - margin/2``: that instant. Inside the last half-margin: halfway to
    ``exp`` (a few attempts, logarithmically many, instead of a retry every
    ``min_backoff_s``). After ``exp``: no cap, plain backoff.
    """
    if now >= expires_at:
        return None
    deadline = expires_at - margin_s / 2.0
    if now < deadline:
        return deadline
    return now + (expires_at - now) / 2.0


def next_attempt_at(
    now: float,
    *,
    attempt: int,
    retry_after_s: Optional[float],
    expires_at: float,
    settings: RenewalSettings,
    rnd: Union[random.Random, float],
    margin_s: Optional[float] = None,
) -> float:
    """When to try again after ``attempt`` consecutive failed renewals.

    The first ``quick_retries`` retries follow the short backoff (``backoff_s``): most
    failures are blips. After that the failure is an outage that the whole fleet sees at
    once, and exponential backoff would bring every job back within ``max_backoff_s`` of
    the recovery. Each job knows how long its token can still wait, so the delay is drawn
    over that instead: uniformly up to ``exp - margin`` (never shorter than the backoff).
    Jobs with slack come back late, jobs near their deadline early, and the recovery burst
    keeps roughly the spread the due times had (``benchmarks/fleet.py``).

    That delay is raised to the server's ``Retry-After`` and then capped so
    that, while the token still works, we never wait past ``exp - margin/2`` without
    another try (inside that last stretch: halfway to ``exp`` each time). Retry-After
    handling, chosen deliberately:

    * ends before ``exp``: honoured up to the cap. Retry-After is usually a fixed
      limiter window (an upper bound); one early request to save the job's credential
      is not hammering.
    * ends at or after ``exp``: honoured in full. The token cannot be saved by asking
      a server that said it will refuse us, and retrying a rate-limited server (shared
      by a whole site behind one NAT) hurts every other job. Escalation then reports
      the credential lost.

    Never sooner than ``now + min_backoff_s``.

    Args:
        margin_s: the token's margin (``margin_for(exp - iat)``); default
            ``settings.default_margin_s``.

    Raises:
        ValueError: as ``backoff_s``.
    """
    unit = rnd.random() if isinstance(rnd, random.Random) else float(rnd)
    floor = now + settings.min_backoff_s
    at = now + backoff_s(attempt, rnd=unit, settings=settings)
    margin = settings.default_margin_s if margin_s is None else margin_s
    renew_by = expires_at - margin
    if attempt > settings.quick_retries and renew_by - now > settings.min_backoff_s:
        # not a blip: spread over the time this token can still wait (same draw)
        at = max(at, floor + unit * (renew_by - now - settings.min_backoff_s))
    if retry_after_s is not None and retry_after_s > 0.0:
        retry_end = now + retry_after_s
        if retry_end >= expires_at:
            return max(at, retry_end, floor)
        at = max(at, retry_end)
    cap = _attempt_cap(now, expires_at, margin)
    if cap is not None:
        at = min(at, cap)
    return max(at, floor)


def within_horizon(at: float, job_end_at: Optional[float]) -> bool:
    """Whether an action planned for ``at`` falls inside the job's wall time.

    Renewals planned at or after the job's end are not scheduled: the batch system
    will have ended the job, and an extra use of the mytoken only burns ``usages_AT``.
    ``None`` means no known end.
    """
    return job_end_at is None or at < job_end_at


def _min_interval_s(at_lifetime_s: float, settings: RenewalSettings) -> float:
    """Shortest time between two renewals the rule allows (largest jitter)."""
    worst_jitter = settings.jitter_fraction
    planned = (settings.fraction - worst_jitter) * at_lifetime_s
    return min(planned, at_lifetime_s - margin_for(at_lifetime_s, settings))


def usages_budget(
    walltime_s: float,
    at_lifetime_s: float,
    settings: RenewalSettings,
    *,
    retry_allowance: float = 0.25,
    min_extra: int = 2,
) -> int:
    """``usages_AT`` for the job mytoken: the first AT + renewals + retries.

    Renewals are counted with the smallest interval the rule can produce (largest
    jitter), over the whole wall time. The server counts only successful AT requests,
    but a success whose response we lose (timeout) or whose token fails our checks
    still counts, so ``retry_allowance`` (share of the renewals, rounded up, at least
    ``min_extra``) is added for those.

    Raises:
        ValueError: non-positive lifetime, negative wall time or allowance.
    """
    if at_lifetime_s <= 0.0:
        raise ValueError(f"access token lifetime must be > 0, got {at_lifetime_s}")
    if walltime_s < 0.0 or retry_allowance < 0.0 or min_extra < 0:
        raise ValueError("walltime, retry_allowance and min_extra must be >= 0")
    renewals = math.ceil(walltime_s / _min_interval_s(at_lifetime_s, settings))
    extra = max(min_extra, math.ceil(renewals * retry_allowance))
    return 1 + renewals + extra


def renewals_per_hour(at_lifetime_s: float, settings: RenewalSettings, jitter: float) -> float:
    """Renewals per hour the rule implies for one job with this jitter (no failures).

    Raises:
        ValueError: non-positive lifetime, or jitter outside [0, fraction).
    """
    if at_lifetime_s <= 0.0:
        raise ValueError(f"access token lifetime must be > 0, got {at_lifetime_s}")
    interval = next_renewal_at(0.0, at_lifetime_s, jitter=jitter, settings=settings)
    return 3600.0 / interval


def escalation(
    now: float,
    expires_at: float,
    next_attempt_at: Optional[float],
    warn_before_s: float,
    *,
    permanent: bool = False,
    failing: bool = True,
) -> Escalation:
    """What to do about a renewal that is failing.

    * not ``failing``: nothing.
    * ``permanent`` (mytoken revoked, expired, out of usages): CREDENTIAL_LOST at
      once; no retry can succeed, so retrying would only load the server.
    * token expired: CREDENTIAL_LOST.
    * a retryable failure while the token still works is never a lost credential, even
      when the next attempt comes after ``exp`` (a 429 whose Retry-After outlasts the
      token): the payload still holds a valid token, and a rate limit that anyone on
      the node can trip (issue 12) must not be able to fail someone else's job. When
      the next attempt (``None``: none planned) comes after ``exp``, or less than
      ``warn_before_s`` is left: WARN.
    """
    if not failing:
        return Escalation.NONE
    if permanent or now >= expires_at:
        return Escalation.CREDENTIAL_LOST
    if next_attempt_at is None or next_attempt_at >= expires_at:
        return Escalation.WARN
    if expires_at - now <= warn_before_s:
        return Escalation.WARN
    return Escalation.NONE


@dataclass(frozen=True)
class EscalationSteps:
    """What the sidecar must do now about a failing renewal; each at most once per job."""

    warn: bool = False  # signal the payload that its token is about to run out
    lose_credential: bool = False  # record (state.json, log) that the credential is lost
    stop_payload: bool = False  # stop the payload (``on_failure = "stop"``, token expired)


def escalation_steps(
    now: float,
    expires_at: float,
    next_attempt_at: Optional[float],
    warn_before_s: float,
    *,
    permanent: bool,
    failing: bool,
    warned: bool,
    credential_lost: bool,
    stop_on_loss: bool,
    stopped: bool,
) -> EscalationSteps:
    """The steps ``escalation`` calls for that were not taken yet.

    The payload is warned once, when its token is inside the warning window (or the
    failure already asks for a warning); it is stopped only when the credential is
    lost, the site asked for it, and the token has really expired: a lost credential
    with time left still lets the payload finish its work.
    """
    decision = escalation(
        now, expires_at, next_attempt_at, warn_before_s, permanent=permanent, failing=failing
    )
    if decision is Escalation.NONE:
        return EscalationSteps()
    lost = decision is Escalation.CREDENTIAL_LOST
    return EscalationSteps(
        warn=not warned and (decision is Escalation.WARN or expires_at - now <= warn_before_s),
        lose_credential=lost and not credential_lost,
        stop_payload=(
            (lost or credential_lost) and stop_on_loss and now >= expires_at and not stopped
        ),
    )


def wait_status_to_exit(returncode: int) -> Tuple[Optional[int], Optional[int]]:
    """Split a ``subprocess`` returncode into ``(exit_status, signal)``.

    ``subprocess`` reports death by signal N as ``-N``; exactly one of the two is set.
    """
    if returncode < 0:
        return None, -returncode
    return returncode, None


def exit_code_from_returncode(returncode: int) -> int:
    """The shell's view of a returncode: the exit status, or ``128 + N`` for signal N.

    Reduced mod 256 like tini, since an exit status has 8 bits.
    """
    if returncode < 0:
        return (128 - returncode) % 256
    return returncode % 256


class Health(enum.IntEnum):
    """A monitoring verdict; the values are the Nagios plugin exit codes."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True)
class HealthThresholds:
    """``status``/``inspect --warn S --crit S``: WARNING (CRITICAL) when a token has less
    than ``warn_s`` (``crit_s``) seconds left. 0: only an expired token is CRITICAL."""

    warn_s: float = 0.0
    crit_s: float = 0.0

    def __post_init__(self) -> None:
        for name, value in (("warn", self.warn_s), ("crit", self.crit_s)):
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"--{name} must be a number of seconds >= 0, got {value}")


def token_health(
    remaining_s: Optional[float],
    thresholds: HealthThresholds,
    *,
    renewer_expected: bool = False,
    renewer_alive: bool = False,
    credential_lost: bool = False,
    finished: bool = False,
    revocation_pending: bool = False,
) -> Tuple[Health, str]:
    """The verdict on a job's token and why, in the order an operator must act on it.

    * the job ended (its sidecar finished): OK, or WARNING while its mytoken's revocation
      is pending (a live job mytoken nobody uses); the token's own lifetime no longer matters;
    * no token known (``remaining_s`` None): UNKNOWN (WARNING with a pending revocation);
    * expired, or the sidecar recorded the credential as lost: CRITICAL;
    * less than ``crit_s`` left: CRITICAL;
    * a renewer should be running (a sidecar started and did not finish) and none is:
      CRITICAL, as the token will run out with nobody to renew it;
    * a pending revocation, or less than ``warn_s`` left: WARNING; else OK.
    """
    pending = (Health.WARNING, "the job mytoken's revocation is pending (jobtoken revoke DIR)")
    if finished:
        return pending if revocation_pending else (Health.OK, "the job ended")
    if remaining_s is None:
        return pending if revocation_pending else (Health.UNKNOWN, "no token known")
    left = int(remaining_s)
    if remaining_s <= 0.0:
        return Health.CRITICAL, f"expired {-left} s ago"
    if credential_lost:
        return Health.CRITICAL, f"credential lost: renewal keeps failing ({left} s left)"
    if remaining_s < thresholds.crit_s:
        return Health.CRITICAL, (
            f"expires in {left} s (critical below {thresholds.crit_s:g} s)")
    if renewer_expected and not renewer_alive:
        return Health.CRITICAL, f"no renewer alive ({left} s left)"
    if revocation_pending:
        return pending
    if remaining_s < thresholds.warn_s:
        return Health.WARNING, (
            f"expires in {left} s (warning below {thresholds.warn_s:g} s)")
    return Health.OK, f"valid for {left} s"


def worst_health(verdicts: Iterable[Health]) -> Health:
    """The verdict of several checks: CRITICAL over WARNING over UNKNOWN over OK (the
    Nagios plugin convention: a known fault outranks not knowing)."""
    order = (Health.OK, Health.UNKNOWN, Health.WARNING, Health.CRITICAL)
    return max(verdicts, key=order.index, default=Health.OK)
