"""The broker's timer heap: order, stale timers, and the node-wide Retry-After pause."""

from __future__ import annotations

from typing import List, Optional, Tuple

from jobtoken._brokertimers import TimerHeap


def fired(heap: TimerHeap, now: float, again: Optional[dict] = None) -> List[Tuple[str, int]]:
    """Run what is due at ``now``; ``again`` maps a key to the time it asks to be retried."""
    seen: List[Tuple[str, int]] = []

    def fire(key: str, generation: int) -> Optional[float]:
        seen.append((key, generation))
        return (again or {}).pop(key, None)

    heap.run_due(now, fire)
    return seen


def test_due_timers_fire_in_time_order_and_later_ones_wait() -> None:
    heap = TimerHeap()
    heap.push(30.0, "c", 1)
    heap.push(10.0, "a", 1)
    heap.push(20.0, "b", 1)
    assert heap.next_at() == 10.0
    assert fired(heap, 25.0) == [("a", 1), ("b", 1)]
    assert heap.next_at() == 30.0 and len(heap) == 1


def test_a_pause_holds_every_due_timer_until_it_ends_keeping_their_order() -> None:
    heap = TimerHeap()
    for at, key in ((10.0, "first"), (11.0, "second"), (12.0, "third")):
        heap.push(at, key, 1)
    heap.paused_until = 100.0
    assert heap.next_at() == 100.0  # the loop does not wake for a timer it may not fire
    assert fired(heap, 50.0) == []
    heap.push(60.0, "late", 1)  # due during the pause, but after the others
    assert fired(heap, 99.0) == []
    assert fired(heap, 100.0) == [("first", 1), ("second", 1), ("third", 1), ("late", 1)]


def test_a_retried_timer_keeps_its_place_before_later_ones() -> None:
    heap = TimerHeap()
    heap.push(10.0, "busy", 1)
    heap.push(10.5, "next", 1)
    assert fired(heap, 10.0, again={"busy": 10.5}) == [("busy", 1)]
    # both are due at 10.5: the retried one was due first, so it goes first
    assert fired(heap, 10.5) == [("busy", 1), ("next", 1)]
    assert heap.next_at() is None
