"""Fixed-window per-IP rate limiting (pure, injected monotonic clock)."""

from __future__ import annotations

from jobtoken.devserver._ratelimit import RateLimiter
from tests.fakes import FakeClock


def test_window_per_ip_and_reset() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2, 10, clock.monotonic)
    assert limiter.hit("a").allowed and limiter.hit("a").allowed
    denied = limiter.hit("a")
    assert not denied.allowed and denied.remaining == 0 and denied.reset_s == 10
    assert limiter.hit("b").allowed  # other IPs have their own window
    clock.advance(4)
    assert limiter.hit("a").reset_s == 6
    clock.advance(6)
    assert limiter.hit("a").allowed
