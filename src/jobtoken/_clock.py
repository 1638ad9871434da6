"""The one seam for time: wall clock, monotonic clock and interruptible waits.

Policy code never reads a clock; orchestration code gets a ``Clock`` injected so
tests can move time without sleeping.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock", "utc_text"]


def utc_text(epoch_s: float, *, sep: str = "T") -> str:
    """``epoch_s`` as ISO UTC text; token times come from servers, so any float may arrive.

    A time the platform cannot represent (``exp`` = 1e20) is shown as such rather than
    crashing the command that displays it.
    """
    try:
        return time.strftime(f"%Y-%m-%d{sep}%H:%M:%SZ", time.gmtime(epoch_s))
    except (OverflowError, OSError, ValueError):
        return f"out of range ({epoch_s:.0f})"


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch (token ``exp``/``iat`` live here)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (for timeouts and intervals)."""

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` or until ``event`` is set; return whether it is set."""


class SystemClock:
    """The real clocks."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        return event.wait(max(0.0, timeout_s))
