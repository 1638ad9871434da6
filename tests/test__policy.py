"""Tests for jobtoken._policy: tables for the documented decisions, properties for the rules."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobtoken import _policy as pol
from jobtoken._policy import (
    ASSUMED_LIFETIME_S,
    Escalation,
    RenewalSettings,
    backoff_s,
    escalation,
    exit_code_from_returncode,
    job_jitter,
    margin_for,
    next_attempt_at,
    next_renewal_at,
    renewals_per_hour,
    usages_budget,
    wait_status_to_exit,
    within_horizon,
)

S = RenewalSettings()
T0 = 1_800_000_000.0
HOUR = 3600.0

lifetimes = st.floats(min_value=1.0, max_value=6 * HOUR, allow_nan=False)
units = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraction": 0.0},
        {"fraction": 1.0},
        {"jitter_fraction": 0.7},
        {"jitter_fraction": -0.1},
        {"min_margin_s": 400.0},
        {"min_backoff_s": 0.0},
        {"min_backoff_s": 10.0, "max_backoff_s": 5.0},
    ],
)
def test_settings_reject_values_that_break_the_rule(kwargs):
    with pytest.raises(ValueError):
        RenewalSettings(**kwargs)


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        S.fraction = 0.5  # type: ignore[misc]


# --- jitter -------------------------------------------------------------------------------


def test_job_jitter_is_stable_for_a_job():
    assert job_jitter("schedd.example.org#1234.0#1700000000", 0.1) == job_jitter(
        "schedd.example.org#1234.0#1700000000", 0.1
    )


def test_job_jitter_spreads_a_cluster_submitted_together():
    values = [job_jitter(f"schedd#1234.{proc}#1700000000", 0.1) for proc in range(200)]
    assert len(set(values)) == 200
    # roughly uniform: every tenth of the range is hit
    buckets = {int(v / 0.01) for v in values}
    assert buckets == set(range(10))


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.1, 0.5])
def test_job_jitter_in_range(fraction):
    for job in ("a", "b", "", "ü#1.0"):
        value = job_jitter(job, fraction)
        assert 0.0 <= value < fraction or value == fraction == 0.0


def test_job_jitter_rejects_negative_fraction():
    with pytest.raises(ValueError):
        job_jitter("job", -0.1)


@given(st.text(), st.floats(min_value=1e-9, max_value=0.9))
def test_job_jitter_property_in_half_open_range(job_id, fraction):
    assert 0.0 <= job_jitter(job_id, fraction) < fraction


# --- margin -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime_s", "expected"),
    [
        (HOUR, 300.0),  # WLCG default 1 h: the default margin
        (6 * HOUR, 300.0),
        (900.0, 300.0),  # 15 min: exactly a third
        (600.0, 200.0),  # clamped to a third
        (6.0, 2.0),  # a 6 s test token gets ~2 s
        (0.0, 0.0),
        (-5.0, 0.0),
    ],
)
def test_margin_for_table(lifetime_s, expected):
    assert margin_for(lifetime_s, S) == pytest.approx(expected, abs=1e-6)


def test_margin_never_below_min_margin_for_ordinary_lifetimes():
    settings = RenewalSettings(default_margin_s=60.0, min_margin_s=60.0)
    assert margin_for(HOUR, settings) == 60.0


@given(lifetimes)
def test_margin_property_leaves_two_thirds_of_the_lifetime(lifetime):
    margin = margin_for(lifetime, S)
    assert 0.0 < margin <= lifetime / 3.0 + 1e-9
    assert margin <= S.default_margin_s


# --- renewal time -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime_s", "jitter", "expected_offset"),
    [
        (HOUR, 0.0, 2400.0),  # 2/3 of an hour
        (HOUR, 0.1, HOUR * (2 / 3 - 0.1)),  # jitter moves it earlier
        (1200.0, 0.0, 800.0),  # 20 min token: 2/3 is before exp - 300
        (900.0, 0.0, 600.0),  # 15 min: 2/3 == exp - 300
        (600.0, 0.0, 400.0),  # margin clamp to 1/3 coincides with 2/3
        (6.0, 0.0, 4.0),
    ],
)
def test_next_renewal_at_table(lifetime_s, jitter, expected_offset):
    at = next_renewal_at(T0, T0 + lifetime_s, jitter=jitter, settings=S)
    assert at - T0 == pytest.approx(expected_offset, abs=1e-6)


def test_next_renewal_never_later_than_exp_minus_margin():
    # a fraction close to 1 would renew too late; the margin wins
    settings = RenewalSettings(fraction=0.95, jitter_fraction=0.0)
    at = next_renewal_at(T0, T0 + HOUR, jitter=0.0, settings=settings)
    assert at == pytest.approx(T0 + HOUR - 300.0, abs=1e-6)


def test_missing_iat_uses_the_time_the_token_was_obtained():
    at = next_renewal_at(None, T0 + HOUR, jitter=0.0, settings=S, obtained_at=T0)
    assert at == pytest.approx(T0 + 2400.0, abs=1e-6)


def test_missing_iat_and_obtained_at_assume_the_shortest_wlcg_lifetime():
    exp = T0 + HOUR
    at = next_renewal_at(None, exp, jitter=0.0, settings=S)
    assert at == pytest.approx(exp - ASSUMED_LIFETIME_S / 3.0, abs=1e-6)
    # never earlier than the rule would put it for a real 1 h token
    assert at >= next_renewal_at(exp - HOUR, exp, jitter=0.0, settings=S)


def test_iat_after_exp_is_ignored():
    at = next_renewal_at(T0 + 2 * HOUR, T0 + HOUR, jitter=0.0, settings=S, obtained_at=T0)
    assert at == pytest.approx(T0 + 2400.0, abs=1e-6)


@pytest.mark.parametrize("jitter", [-0.01, 2 / 3, 1.0])
def test_next_renewal_rejects_jitter_outside_range(jitter):
    with pytest.raises(ValueError):
        next_renewal_at(T0, T0 + HOUR, jitter=jitter, settings=S)


@given(lifetimes, units)
def test_renewal_property_between_issue_and_exp_minus_margin(lifetime, unit):
    jitter = unit * S.jitter_fraction
    at = next_renewal_at(T0, T0 + lifetime, jitter=jitter, settings=S)
    assert T0 < at
    assert at <= T0 + lifetime - margin_for(lifetime, S) + 1e-6


@given(lifetimes, units, units)
def test_renewal_property_more_jitter_is_never_later(lifetime, a, b):
    low, high = sorted((a * S.jitter_fraction, b * S.jitter_fraction))
    early = next_renewal_at(T0, T0 + lifetime, jitter=high, settings=S)
    late = next_renewal_at(T0, T0 + lifetime, jitter=low, settings=S)
    assert early <= late


# --- backoff ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "unit", "expected"),
    [
        (1, 0.0, 2.0),
        (1, 0.999, 2.0),  # first retry: cap == min
        (2, 0.0, 2.0),
        (2, 0.5, 3.0),  # cap 4
        (4, 0.5, 9.0),  # cap 16
        (9, 0.5, 151.0),  # cap min(300, 512) = 300
        (10_000, 0.0, 2.0),  # huge attempt counts do not overflow
        (10_000, 0.5, 151.0),
    ],
)
def test_backoff_table(attempt, unit, expected):
    assert backoff_s(attempt, rnd=unit, settings=S) == pytest.approx(expected, abs=1e-6)


def test_backoff_accepts_a_seeded_random():
    a = backoff_s(5, rnd=random.Random(7), settings=S)
    b = backoff_s(5, rnd=random.Random(7), settings=S)
    assert a == b
    assert 2.0 <= a <= 32.0


@pytest.mark.parametrize(("attempt", "unit"), [(0, 0.5), (-1, 0.5), (1, 1.0), (1, -0.1)])
def test_backoff_rejects_bad_input(attempt, unit):
    with pytest.raises(ValueError):
        backoff_s(attempt, rnd=unit, settings=S)


@given(st.integers(min_value=1, max_value=200), units)
def test_backoff_property_within_bounds(attempt, unit):
    value = backoff_s(attempt, rnd=unit, settings=S)
    assert S.min_backoff_s <= value <= S.max_backoff_s


@given(st.integers(min_value=1, max_value=60), units)
def test_backoff_property_monotonic_in_attempt_for_same_draw(attempt, unit):
    assert backoff_s(attempt, rnd=unit, settings=S) <= backoff_s(attempt + 1, rnd=unit, settings=S)


# --- next attempt -------------------------------------------------------------------------

NOW = T0 + 2400.0
EXP = T0 + HOUR  # 1200 s left, margin 300 -> deadline at EXP - 150


@pytest.mark.parametrize(
    ("now", "attempt", "retry_after", "unit", "expected"),
    [
        # the first two retries: short backoff (a blip)
        (NOW, 1, None, 0.5, NOW + 2.0),
        (NOW, 2, None, 0.5, NOW + 3.0),
        # from the third: spread over the 900 s until exp - margin
        (NOW, 3, None, 0.5, NOW + 2.0 + 0.5 * 898.0),
        (NOW, 3, None, 0.0, NOW + 2.0),
        (NOW, 3, None, 0.999, NOW + 2.0 + 0.999 * 898.0),  # never past exp - margin
        # Retry-After shorter than the delay: the delay wins
        (NOW, 2, 1.0, 0.5, NOW + 3.0),
        (NOW, 3, 1.0, 0.5, NOW + 451.0),
        # Retry-After longer than backoff and before the deadline: honoured
        (NOW, 1, 600.0, 0.0, NOW + 600.0),
        # Retry-After ending after exp - margin/2 but before exp: one try at the deadline
        (NOW, 1, 1100.0, 0.0, EXP - 150.0),
        # Retry-After reaching beyond exp: honoured in full (do not hammer)
        (NOW, 1, 5000.0, 0.0, NOW + 5000.0),
        # long backoff is capped at the deadline
        (EXP - 200.0, 20, None, 0.999, EXP - 150.0),
        # inside the last half-margin: halfway to exp
        (EXP - 100.0, 20, None, 0.999, EXP - 50.0),
        # ...but never sooner than min_backoff
        (EXP - 3.0, 20, None, 0.999, EXP - 1.0),
        (EXP - 1.0, 20, None, 0.999, EXP + 1.0),
        # token already expired: plain backoff (capped by max_backoff)
        (EXP + 10.0, 20, None, 0.5, EXP + 10.0 + 151.0),
        # a zero Retry-After is no Retry-After
        (NOW, 1, 0.0, 0.0, NOW + 2.0),
    ],
)
def test_next_attempt_at_table(now, attempt, retry_after, unit, expected):
    at = next_attempt_at(
        now,
        attempt=attempt,
        retry_after_s=retry_after,
        expires_at=EXP,
        settings=S,
        rnd=unit,
        margin_s=300.0,
    )
    assert at == pytest.approx(expected, abs=1e-6)


def test_next_attempt_default_margin_is_the_settings_margin():
    at = next_attempt_at(
        EXP - 200.0, attempt=20, retry_after_s=None, expires_at=EXP, settings=S, rnd=0.9
    )
    assert at == pytest.approx(EXP - S.default_margin_s / 2.0, abs=1e-6)


def test_retries_near_expiry_are_few_not_a_storm():
    """From the deadline to exp, retries halve the remaining time: logarithmically many."""
    now, attempts = EXP - 150.0, 0
    while now < EXP:
        now = next_attempt_at(
            now,
            attempt=30,
            retry_after_s=None,
            expires_at=EXP,
            settings=S,
            rnd=0.999,
            margin_s=300.0,
        )
        attempts += 1
    assert attempts <= 8


@given(
    st.floats(min_value=-HOUR, max_value=2 * HOUR),
    st.integers(min_value=1, max_value=50),
    st.one_of(st.none(), st.floats(min_value=0.0, max_value=3 * HOUR)),
    units,
)
def test_next_attempt_properties(offset, attempt, retry_after, unit):
    now = EXP - offset
    at = next_attempt_at(
        now,
        attempt=attempt,
        retry_after_s=retry_after,
        expires_at=EXP,
        settings=S,
        rnd=unit,
        margin_s=300.0,
    )
    assert at >= now + S.min_backoff_s - 1e-6
    deadline = EXP - 150.0
    if retry_after is not None and now + retry_after >= EXP:
        assert at >= now + retry_after - 1e-6  # a Retry-After beyond exp is honoured
    elif now < deadline:
        assert at <= max(deadline, now + S.min_backoff_s) + 1e-6  # never past the deadline
    if now < EXP and (retry_after is None or now + retry_after < EXP):
        assert at <= max(now + (EXP - now), now + S.min_backoff_s) + 1e-6


# --- horizon and budget -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "job_end", "expected"),
    [(T0, T0 + 1, True), (T0 + 1, T0 + 1, False), (T0 + 2, T0 + 1, False), (T0, None, True)],
)
def test_within_horizon(at, job_end, expected):
    assert within_horizon(at, job_end) is expected


@pytest.mark.parametrize(
    ("walltime_s", "lifetime_s", "expected"),
    [
        # 48 h job, 1 h tokens: interval (2/3-0.1)*3600 = 2040 s -> 85 renewals, +22 extra
        (48 * HOUR, HOUR, 1 + 85 + 22),
        # short job, token outlives it: first AT + 1 renewal (ceil) + min_extra 2
        (600.0, HOUR, 1 + 1 + 2),
        # no wall time at all: just the first AT and the allowance
        (0.0, HOUR, 1 + 0 + 2),
        # 20 min tokens for 24 h: interval min(0.5667*1200=680, 900) = 680 s -> 128 renewals
        (24 * HOUR, 1200.0, 1 + 128 + 32),
    ],
)
def test_usages_budget_table(walltime_s, lifetime_s, expected):
    assert usages_budget(walltime_s, lifetime_s, S) == expected


def test_usages_budget_allowance_is_configurable():
    assert usages_budget(48 * HOUR, HOUR, S, retry_allowance=0.0, min_extra=0) == 86


@pytest.mark.parametrize(
    ("walltime_s", "lifetime_s", "allowance"), [(HOUR, 0.0, 0.2), (-1.0, HOUR, 0.2), (1, 1, -1)]
)
def test_usages_budget_rejects_bad_input(walltime_s, lifetime_s, allowance):
    with pytest.raises(ValueError):
        usages_budget(walltime_s, lifetime_s, S, retry_allowance=allowance)


@given(st.floats(min_value=0.0, max_value=400.0), lifetimes, units)
def test_usages_budget_covers_every_renewal_the_rule_makes(lifetimes_per_job, lifetime, unit):
    """Simulate the rule with any per-job jitter: the budget is never exceeded."""
    walltime = lifetimes_per_job * lifetime
    jitter = unit * S.jitter_fraction
    budget = usages_budget(walltime, lifetime, S, retry_allowance=0.0, min_extra=0)
    iat, used = 0.0, 1
    while True:
        at = next_renewal_at(iat, iat + lifetime, jitter=jitter, settings=S)
        if not within_horizon(at, walltime):
            break
        used += 1
        iat = at
        assert used <= budget


@pytest.mark.parametrize(
    ("lifetime_s", "jitter", "expected"),
    [(HOUR, 0.0, 1.5), (1200.0, 0.0, 4.5), (HOUR, 1 / 6, 2.0)],
)
def test_renewals_per_hour(lifetime_s, jitter, expected):
    assert renewals_per_hour(lifetime_s, S, jitter) == pytest.approx(expected, abs=1e-6)


def test_renewals_per_hour_rejects_non_positive_lifetime():
    with pytest.raises(ValueError):
        renewals_per_hour(0.0, S, 0.0)


# --- escalation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "next_at", "permanent", "failing", "expected"),
    [
        (EXP - 1000.0, EXP - 900.0, False, True, Escalation.NONE),
        (EXP - 500.0, EXP - 400.0, False, True, Escalation.WARN),
        (EXP - 600.0, EXP - 400.0, False, True, Escalation.WARN),  # boundary: warn at 600
        # issue 12 item 2: a retryable failure (429) with the token still valid is never
        # a lost credential, even when the next try can only come after exp
        (EXP - 500.0, EXP + 10.0, False, True, Escalation.WARN),  # next try too late
        (EXP - 3000.0, EXP + 10.0, False, True, Escalation.WARN),
        (EXP - 500.0, None, False, True, Escalation.WARN),
        (EXP, EXP + 5.0, False, True, Escalation.CREDENTIAL_LOST),
        (EXP - 3000.0, EXP - 2900.0, True, True, Escalation.CREDENTIAL_LOST),  # revoked
        (EXP + 100.0, None, False, False, Escalation.NONE),  # not failing
    ],
)
def test_escalation_table(now, next_at, permanent, failing, expected):
    result = escalation(now, EXP, next_at, 600.0, permanent=permanent, failing=failing)
    assert result is expected


# --- exit status --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "split", "code"),
    [
        (0, (0, None), 0),
        (1, (1, None), 1),
        (2, (2, None), 2),
        (127, (127, None), 127),
        (255, (255, None), 255),
        (-15, (None, 15), 143),
        (-9, (None, 9), 137),
        (-2, (None, 2), 130),
        (-64, (None, 64), 192),
    ],
)
def test_exit_status_mapping(returncode, split, code):
    assert wait_status_to_exit(returncode) == split
    assert exit_code_from_returncode(returncode) == code


_LEVEL = {Escalation.NONE: 0, Escalation.WARN: 1, Escalation.CREDENTIAL_LOST: 2}


@given(
    st.floats(min_value=-2 * HOUR, max_value=2 * HOUR),
    st.floats(min_value=0.0, max_value=HOUR),
    st.one_of(st.none(), st.floats(min_value=-HOUR, max_value=2 * HOUR)),
    st.floats(min_value=0.0, max_value=HOUR),
    st.booleans(),
)
def test_escalation_properties(offset, later_by, next_offset, warn_before, permanent):
    now = EXP - offset
    next_at = None if next_offset is None else EXP - next_offset
    level = escalation(now, EXP, next_at, warn_before, permanent=permanent)
    assert escalation(now, EXP, next_at, warn_before, permanent=permanent, failing=False) is (
        Escalation.NONE
    )
    if permanent or now >= EXP:
        assert level is Escalation.CREDENTIAL_LOST  # never silently past exp
    # waiting longer never calms things down
    later = escalation(now + later_by, EXP, next_at, warn_before, permanent=permanent)
    assert _LEVEL[later] >= _LEVEL[level]


# --- the derived settings, the child timeout, the parent rule, escalation steps ---------------


def test_one_derivation_of_the_settings_serves_prepare_and_the_sidecar() -> None:
    production = pol.renewal_settings(2 / 3, 300.0, 300.0)
    assert (production.min_margin_s, production.default_margin_s) == (60.0, 300.0)
    assert production.min_backoff_s == 2.0
    short = pol.renewal_settings(2 / 3, 2.0, 300.0)  # test tokens: quick retries, small margin
    assert short.min_margin_s == 2.0 and short.min_backoff_s == 0.5
    assert pol.renewal_settings(2 / 3, 300.0, 1.0).min_backoff_s == 1.0  # never above the cap


def test_the_child_timeout_covers_its_requests_start_up_and_lock_wait() -> None:
    renewal = pol.child_timeout_s(10.0, requests=4)
    assert renewal == 4 * 10.0 + pol.CHILD_STARTUP_S
    queued = pol.child_timeout_s(10.0, requests=4, lock_wait_s=pol.RENEWAL_LOCK_WAIT_S)
    assert queued == renewal + pol.RENEWAL_LOCK_WAIT_S
    assert pol.child_timeout_s(10.0, requests=2, cap_s=25.0) == 25.0


def test_a_parent_expiring_within_minutes_is_too_soon() -> None:
    assert pol.parent_expires_too_soon(1000.0 + pol.MIN_JOB_MYTOKEN_S - 1, 1000.0)
    assert not pol.parent_expires_too_soon(1000.0 + pol.MIN_JOB_MYTOKEN_S, 1000.0)


def _steps(now: float, **state: object) -> pol.EscalationSteps:
    next_at = state.pop("next_at", 990.0)
    base: dict = dict(permanent=False, failing=True, warned=False, credential_lost=False,
                      stop_on_loss=True, stopped=False)
    base.update(state)
    return pol.escalation_steps(now, 1000.0, next_at, 60.0, **base)  # type: ignore[arg-type]


def test_escalation_steps_warn_once_then_lose_then_stop_at_expiry() -> None:
    assert _steps(900.0) == pol.EscalationSteps()  # failing, but time left
    assert _steps(950.0) == pol.EscalationSteps(warn=True)
    assert _steps(950.0, warned=True) == pol.EscalationSteps()
    # no attempt before exp: the token still works, so nothing is lost yet
    assert _steps(995.0, warned=True, next_at=None) == pol.EscalationSteps()
    assert _steps(1000.0, warned=True, next_at=None) == pol.EscalationSteps(
        lose_credential=True, stop_payload=True
    )
    assert _steps(1000.0, warned=True, credential_lost=True) == pol.EscalationSteps(
        stop_payload=True
    )
    assert _steps(1000.0, warned=True, credential_lost=True, stopped=True) == pol.EscalationSteps()
    assert _steps(1000.0, warned=True, stop_on_loss=False) == pol.EscalationSteps(
        lose_credential=True
    )
    assert _steps(500.0, failing=False) == pol.EscalationSteps()


def test_a_permanent_refusal_loses_the_credential_but_lets_the_payload_work_on() -> None:
    # refused for good with half an hour left: record it now, warn later, stop only at exp
    assert _steps(100.0, permanent=True) == pol.EscalationSteps(lose_credential=True)
    assert _steps(950.0, permanent=True, credential_lost=True) == pol.EscalationSteps(warn=True)


# --- monitoring verdict (status / inspect exit codes) ----------------------------------------

H = pol.HealthThresholds(warn_s=300, crit_s=60)


@pytest.mark.parametrize(
    ("remaining", "facts", "verdict", "reason"),
    [
        (None, {}, pol.Health.UNKNOWN, "no token known"),
        (-5.0, {"renewer_expected": True, "renewer_alive": True}, pol.Health.CRITICAL, "expired"),
        (0.0, {}, pol.Health.CRITICAL, "expired"),
        (900.0, {"credential_lost": True}, pol.Health.CRITICAL, "credential lost"),
        (59.0, {"renewer_expected": True, "renewer_alive": True}, pol.Health.CRITICAL,
         "critical below 60 s"),
        (900.0, {"renewer_expected": True, "renewer_alive": False}, pol.Health.CRITICAL,
         "no renewer alive"),
        (299.0, {"renewer_expected": True, "renewer_alive": True}, pol.Health.WARNING,
         "warning below 300 s"),
        (299.0, {}, pol.Health.WARNING, "warning below"),
        (300.0, {}, pol.Health.OK, "valid for 300 s"),
        # no renewer, and none expected (just prepared): only the token counts
        (900.0, {"renewer_expected": False, "renewer_alive": False}, pol.Health.OK, "valid"),
        # the job ended: its token's life no longer matters, a live job mytoken does
        (-500.0, {"finished": True}, pol.Health.OK, "the job ended"),
        (None, {"finished": True, "revocation_pending": True}, pol.Health.WARNING, "pending"),
        (None, {"revocation_pending": True}, pol.Health.WARNING, "revocation is pending"),
        (900.0, {"revocation_pending": True}, pol.Health.WARNING, "jobtoken revoke"),
        (-1.0, {"revocation_pending": True}, pol.Health.CRITICAL, "expired"),
    ],
)
def test_token_health(remaining: object, facts: dict, verdict: pol.Health, reason: str) -> None:
    got, why = pol.token_health(remaining, H, **facts)  # type: ignore[arg-type]
    assert got is verdict and reason in why


def test_health_defaults_flag_only_an_expired_token() -> None:
    assert pol.token_health(1.0, pol.HealthThresholds())[0] is pol.Health.OK
    assert pol.token_health(-1.0, pol.HealthThresholds())[0] is pol.Health.CRITICAL
    assert [int(h) for h in pol.Health] == [0, 1, 2, 3]  # the Nagios plugin codes


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_health_thresholds_refuse_nonsense(bad: float) -> None:
    with pytest.raises(ValueError, match="--warn"):
        pol.HealthThresholds(warn_s=bad)
    with pytest.raises(ValueError, match="--crit"):
        pol.HealthThresholds(crit_s=bad)


def test_worst_health_puts_a_known_fault_over_not_knowing() -> None:
    W, C, U, OK = pol.Health.WARNING, pol.Health.CRITICAL, pol.Health.UNKNOWN, pol.Health.OK
    assert pol.worst_health([OK, U]) is U and pol.worst_health([U, W]) is W
    assert pol.worst_health([W, C, U]) is C and pol.worst_health([]) is OK
