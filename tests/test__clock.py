"""`SystemClock`: the real clocks behind the one time seam.

Token ``exp``/``iat`` are epoch seconds, so ``now`` must be wall-clock time; timeouts must
use a clock that does not jump; and the renewer's waits must end as soon as shutdown is
asked for, or a finished payload would be held up until the next renewal.
"""

from __future__ import annotations

import threading
import time

from jobtoken._clock import SystemClock


def test_now_is_epoch_seconds_comparable_with_token_times() -> None:
    before = time.time()
    now = SystemClock().now()
    after = time.time()
    assert before <= now <= after


def test_monotonic_is_the_clock_that_never_jumps() -> None:
    clock = SystemClock()
    before = time.monotonic()
    first = clock.monotonic()
    second = clock.monotonic()
    after = time.monotonic()
    assert before <= first <= second <= after


def test_wait_returns_at_once_when_shutdown_was_already_asked_for() -> None:
    event = threading.Event()
    event.set()
    start = time.monotonic()
    assert SystemClock().wait(event, 60.0) is True
    assert time.monotonic() - start < 5.0


def test_wait_is_woken_by_another_thread() -> None:
    # the supervisor stops the renewer from another thread; the wait must not run its course
    event = threading.Event()
    setter = threading.Thread(target=event.set)
    start = time.monotonic()
    setter.start()
    assert SystemClock().wait(event, 60.0) is True
    setter.join()
    assert time.monotonic() - start < 5.0


def test_wait_lasts_the_timeout_when_nothing_happens() -> None:
    # a wait that returned early would make the renewer spin and hammer the server
    event = threading.Event()
    start = time.monotonic()
    assert SystemClock().wait(event, 0.05) is False
    assert time.monotonic() - start >= 0.045


def test_a_deadline_already_past_neither_blocks_nor_raises() -> None:
    # schedules computed as "expires_at - margin - now" go negative when renewal is late
    event = threading.Event()
    clock = SystemClock()
    start = time.monotonic()
    assert clock.wait(event, -1.0) is False
    assert clock.wait(event, -3600.0) is False
    assert clock.wait(event, 0.0) is False
    assert time.monotonic() - start < 5.0
