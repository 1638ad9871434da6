"""Per-client-IP fixed-window rate limit, like the fiber limiter in front of the real server.

Must NOT: read a clock itself (``monotonic`` is injected) or build responses.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

__all__ = ["RateDecision", "RateLimiter"]


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the window resets


class RateLimiter:
    """Counts every request of an IP in windows of ``window_s`` starting at its first hit."""

    def __init__(self, max_requests: int, window_s: float, monotonic: Callable[[], float]) -> None:
        self.max_requests = max_requests
        self.window_s = window_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._windows: Dict[str, Tuple[float, int]] = {}  # ip -> (window end, hits)

    def hit(self, client_ip: str) -> RateDecision:
        now = self._monotonic()
        with self._lock:
            end, hits = self._windows.get(client_ip, (0.0, 0))
            if now >= end:
                end, hits = now + self.window_s, 0
            hits += 1
            self._windows[client_ip] = (end, hits)
        reset = max(1, int(math.ceil(end - now)))
        return RateDecision(
            allowed=hits <= self.max_requests,
            limit=self.max_requests,
            remaining=max(0, self.max_requests - hits),
            reset_s=reset,
        )
