"""The node broker's timer heap: when each job's next renewal or revocation retry is due.

Why a module of its own: one ``Retry-After`` from the server pauses every renewal of
the node (docs/broker.md), and the jobs due meanwhile must keep their order when the
pause ends; that rule lives here once, next to the heap it is about.

Must NOT read the clock or touch a file or socket: the loop passes ``now`` in.
"""

from __future__ import annotations

import heapq
from typing import Callable, List, Optional, Tuple

__all__ = ["TimerHeap"]


class TimerHeap:
    """Timers keyed by job id; a timer is stale once its job's ``generation`` moved on.

    Each entry is ``(at, due, seq, key, generation)``: ``at`` is when to look at it
    next, ``due`` and ``seq`` keep the order jobs were due in across a pause or retry.
    """

    def __init__(self) -> None:
        self._heap: List[Tuple[float, float, int, str, int]] = []
        self._seq = 0
        #: a Retry-After pauses every timer of the node until then
        self.paused_until = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, at: float, key: str, generation: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, at, self._seq, key, generation))

    def next_at(self) -> Optional[float]:
        """When the loop must look again (never before a pause ends); None: no timer."""
        if not self._heap:
            return None
        return max(self._heap[0][0], self.paused_until)

    def run_due(self, now: float, fire: Callable[[str, int], Optional[float]]) -> None:
        """Fire every timer due at ``now``, in order.

        ``fire(key, generation)`` returns None when done with the timer (or it is
        stale), else when to try it again (a busy job), keeping its place in the order.
        During a pause nothing fires: the due timers wait for its end.
        """
        while self._heap and self._heap[0][0] <= now:
            _, due, seq, key, generation = heapq.heappop(self._heap)
            if now < self.paused_until:
                heapq.heappush(self._heap, (self.paused_until, due, seq, key, generation))
                continue
            again = fire(key, generation)
            if again is not None:
                heapq.heappush(self._heap, (again, due, seq, key, generation))
