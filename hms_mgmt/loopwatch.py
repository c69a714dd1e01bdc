"""Event-loop lag: notice, log, count and export a blocked event loop.

Everything a service does (handlers, broker heartbeats, outcome reports, HTTP
probes) shares one event loop, so a handler that blocks it (``time.sleep`` or
long CPU work in an ``async def``) stalls them all. :class:`LoopMonitor` has two
halves:

- a task on the loop that ticks every ``interval`` seconds, recording
  ``time.monotonic()``; a tick that comes more than ``threshold`` seconds late
  ends a block, logged with how long it lasted;
- a daemon watchdog thread that wakes a few times a second and, once the loop
  has not ticked for over ``threshold`` seconds, logs one warning while the
  loop is still blocked, naming what the loop's thread is running (its
  innermost Python frames, from ``sys._current_frames()``).

The watchdog needs the GIL to run: code that blocks while releasing it
(``time.sleep``, blocking I/O) or pure-Python loops (the interpreter switches
threads every few milliseconds) are caught in the act; a C extension holding
the GIL throughout is only reported when it lets go, by the tick.

:class:`LoopCollector` exports ``hms_event_loop_lag_seconds`` and
``hms_event_loop_blocks_total``; :meth:`LoopMonitor.liveness` is what
``/healthz`` answers with.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hms_mgmt.logs import get_logger
from hms_mgmt.settings import Settings

log = get_logger("loopwatch")

TICK_INTERVAL = 0.25
# After a stall longer than the liveness limit has ended, /healthz keeps failing for this
# long (one default Kubernetes probe period), so that the probe waiting through the stall
# fails too and a loop that stalls again and again is not passed in the short gaps between.
LIVENESS_HOLD = 10.0
STACK_FRAMES = 8


@dataclass
class Block:
    """One stall of the loop: from when its tick was due until the tick came."""

    started: float  # time.monotonic() when the late tick was due
    where: str | None = None  # the innermost frame of the loop's thread, when caught in the act
    stack: list[str] = field(default_factory=list)  # innermost first
    ended: float | None = None
    lasted: float | None = None


class LoopMonitor:
    """Watches the event loop it is started on; see the module's docstring."""

    def __init__(
        self,
        name: str,
        *,
        interval: float = TICK_INTERVAL,
        threshold: float = 1.0,
        liveness_limit: float = 30.0,
        liveness_hold: float = LIVENESS_HOLD,
    ) -> None:
        for label, value in (
            ("interval", interval),
            ("threshold", threshold),
            ("liveness_limit", liveness_limit),
        ):
            if not value > 0:
                raise ValueError(f"{label} must be > 0 seconds, not {value!r}")
        self.name = name
        self.interval = interval
        self.threshold = threshold
        self.liveness_limit = liveness_limit
        self.liveness_hold = liveness_hold
        self._lock = threading.Lock()
        self._last_tick: float | None = None
        self._blocks = 0
        self._current: Block | None = None  # caught by the watchdog; the loop is not back yet
        self._last_long: Block | None = None  # the latest ended block over the liveness limit
        self._loop_thread: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @classmethod
    def from_settings(cls, settings: Settings, name: str) -> LoopMonitor:
        return cls(
            name, threshold=settings.loop_block_threshold, liveness_limit=settings.liveness_lag
        )

    # -- running ------------------------------------------------------------------

    def start(self) -> None:
        """Start watching the running loop (call from within it); once per monitor."""
        if self.running:
            raise RuntimeError("this loop monitor is running already")
        loop = asyncio.get_running_loop()
        self._stopping = threading.Event()  # a fresh one: a watchdog still exiting keeps its own
        self._loop_thread = threading.get_ident()
        self._last_tick = time.monotonic()
        self._task = loop.create_task(self._ticks(), name=f"hms-loop-monitor-{self.name}")
        self._thread = threading.Thread(
            target=self._watch,
            args=(self._stopping,),
            name=f"hms-loopwatch-{self.name}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop ticking and watching; a stopped monitor reports no lag."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        self._task = self._thread = None
        with self._lock:
            self._last_tick = None
            self._current = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._ticked(time.monotonic())

    def _ticked(self, now: float) -> None:
        with self._lock:
            if self._last_tick is None:
                return
            due = self._last_tick + self.interval
            self._last_tick = now
            block, self._current = self._current, None
            caught = block is not None
            if block is None:
                if now - due <= self.threshold:
                    return
                block = Block(started=due)  # too short for the watchdog to catch: count it now
                self._blocks += 1
            block.ended = now
            block.lasted = now - block.started
            if block.lasted > self.liveness_limit:
                self._last_long = block
        fields = {"monitor": self.name, "blocked_for": round(block.lasted, 3)}
        if block.where is not None:
            fields["blocked_by"] = block.where
        if caught:
            log.info("event loop unblocked", **fields)
        else:
            log.warning("event loop was blocked", **fields)

    def _watch(self, stopping: threading.Event) -> None:
        poll = min(self.interval, self.threshold / 2)
        while not stopping.wait(poll):
            try:
                self.check(time.monotonic())
            except Exception:  # the watchdog must outlive any surprise
                log.exception("the event loop watchdog failed a check")

    def check(self, now: float) -> Block | None:
        """The watchdog's look at the loop: a new block it has caught, else None."""
        with self._lock:
            if self._last_tick is None or self._current is not None:
                return None
            due = self._last_tick + self.interval
            if now - due <= self.threshold:
                return None
            stack = self._loop_stack()
            block = Block(started=due, where=stack[0] if stack else None, stack=stack)
            self._current = block
            self._blocks += 1
        log.warning(
            "event loop blocked",
            monitor=self.name,
            blocked_for=round(now - due, 3),
            blocked_by=block.where,
            stack=block.stack,
        )
        return block

    def _loop_stack(self) -> list[str]:
        frame = sys._current_frames().get(self._loop_thread or -1)
        return describe_stack(frame, STACK_FRAMES)

    # -- reading ------------------------------------------------------------------

    @property
    def blocks(self) -> int:
        """Stalls over the threshold so far, the one in progress included."""
        return self._blocks

    def lag(self, now: float | None = None) -> float:
        """Seconds the loop's next tick is overdue by (0 while it keeps time)."""
        last = self._last_tick
        if last is None:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, now - last - self.interval)

    def liveness(self, now: float | None = None) -> dict[str, Any] | None:
        """None while the loop is responsive; else why it is not (for ``/healthz``).

        Not responsive: a stall longer than ``liveness_limit`` that is still going on,
        or that ended less than ``liveness_hold`` seconds ago.
        """
        now = time.monotonic() if now is None else now
        lag = self.lag(now)
        with self._lock:
            current, last_long = self._current, self._last_long
        if lag > self.liveness_limit:
            return {
                "status": "blocked",
                "blocked_for": round(lag, 3),
                "ongoing": True,
                "blocked_by": current.where if current is not None else None,
                "limit": self.liveness_limit,
            }
        if (
            last_long is not None
            and last_long.ended is not None
            and last_long.lasted is not None
            and now - last_long.ended < self.liveness_hold
        ):
            return {
                "status": "blocked",
                "blocked_for": round(last_long.lasted, 3),
                "ongoing": False,
                "ended_ago": round(now - last_long.ended, 3),
                "blocked_by": last_long.where,
                "limit": self.liveness_limit,
            }
        return None


def describe_stack(frame: FrameType | None, limit: int) -> list[str]:
    """``function (file:line)`` for up to ``limit`` frames from ``frame`` outwards."""
    found: list[str] = []
    while frame is not None and len(found) < limit:
        code = frame.f_code
        found.append(f"{code.co_name} ({_short(code.co_filename)}:{frame.f_lineno})")
        frame = frame.f_back
    return found


def format_stack(frame: FrameType | None) -> str:
    """A traceback-style listing of ``frame`` and its callers, innermost last."""
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame))


def _short(path: str) -> str:
    """A path relative to the working directory when it is under it."""
    with contextlib.suppress(ValueError):
        relative = os.path.relpath(path)
        if not relative.startswith(".."):
            return relative
    return path


class LoopCollector(Collector):
    """``hms_event_loop_lag_seconds`` and ``hms_event_loop_blocks_total``, read at scrape time."""

    def __init__(self, monitor: LoopMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "hms_event_loop_lag_seconds",
            "Seconds the event loop's monitor tick is overdue by (0 while the loop keeps time).",
            value=self._monitor.lag(),
        )
        yield CounterMetricFamily(
            "hms_event_loop_blocks",
            f"Stalls of the event loop longer than {self._monitor.threshold:g}s.",
            value=self._monitor.blocks,
        )
