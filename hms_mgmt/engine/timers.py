"""Durable timers: kept in the store, only those due soon are held in memory; and when
timers and cron ticks come due, the events they make.

A workflow has at most one timer (a delayed or backed-off run, a deadline, a
wait's timeout): its ``timer_at`` and ``timer_kind`` columns. The engine scans
the store for timers due within :attr:`TimerQueue.horizon` and keeps just those
in a heap, so months-away timers cost no memory, and a timer that came due
while the engine was down fires at the first scan after start-up.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from hms_mgmt.engine.events import Received, TickEvent, TimerEvent
from hms_mgmt.schedules import Schedule


class TimerQueue:
    def __init__(self, horizon: float = 60.0) -> None:
        self.horizon = horizon
        self.loaded_until = float("-inf")  # every stored timer due before this is in the heap
        self._heap: list[tuple[float, str, str]] = []
        self._held: set[tuple[float, str, str]] = set()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, workflow_id: str, kind: str, due: float) -> None:
        """A timer a transition set; held now if it falls inside what was loaded."""
        if due <= self.loaded_until:
            self._push((due, workflow_id, kind))

    def push(self, workflow_id: str, kind: str, due: float) -> None:
        """A timer held in memory only, whatever was loaded (not in the store)."""
        self._push((due, workflow_id, kind))

    def needs_scan(self, now: float) -> bool:
        return now + self.horizon / 2 >= self.loaded_until

    def loaded(self, rows: list[tuple[str, str, float]], until: float, complete: bool) -> None:
        """Rows read from the store, due by ``until``; ``complete`` if the read hit no limit."""
        for workflow_id, kind, due in rows:
            self._push((due, workflow_id, kind))
        self.loaded_until = until if complete or not rows else rows[-1][2]

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[tuple[str, str]]:
        due: list[tuple[str, str]] = []
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            self._held.discard(entry)
            due.append((entry[1], entry[2]))
        return due

    def _push(self, entry: tuple[float, str, str]) -> None:
        if entry not in self._held:
            self._held.add(entry)
            heapq.heappush(self._heap, entry)


def due_events(
    timers: TimerQueue, schedules: Mapping[str, Schedule], now: float
) -> Received | None:
    """The timers and schedule ticks due by ``now``, as events (with nothing to ack)."""
    due = timers.pop_due(now)
    ticking = [schedule.id for schedule in schedules.values() if schedule.next_at <= now]
    if not due and not ticking:
        return None
    received = Received(None)
    received.events = [TimerEvent(workflow_id, kind) for workflow_id, kind in due]
    received.events += [TickEvent(schedule_id) for schedule_id in ticking]
    return received
