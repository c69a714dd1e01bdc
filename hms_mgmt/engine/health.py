"""What the engine knows of its store's health: readiness, one clear log line, and when to give up.

A store in trouble (a full disk, a file deleted, truncated or replaced under the engine, a
read-only folder, corruption) must never be papered over: the engine stops acking, so what
it consumed stays in RabbitMQ, goes unready, logs the cause once, and exits if the trouble
lasts. Trouble that waiting can fix (a full disk, a read-only remount) clears on the next
successful commit; the rest lasts until an operator restores the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from hms_mgmt.errors import StoreError
from hms_mgmt.logs import get_logger
from hms_mgmt.store.base import Store

log = get_logger("engine")

READY_WITHIN = 5.0  # ready only if the store committed (a batch or a probe) this recently
REMIND_EVERY = 60.0
WATCH_EVERY = 1.0  # seconds between checks of the store


class StoreHealth:
    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self.clock = clock
        self.problem: StoreError | None = None
        self.since: float | None = None
        self.last_ok = clock()
        self._reminded = 0.0

    def ok(self) -> None:
        """A commit went through."""
        now = self.clock()
        self.last_ok = now
        if self.problem is None or self.problem.lasting:
            return
        assert self.since is not None
        log.warning("the store commits again", after_seconds=round(now - self.since, 1))
        self.problem = self.since = None

    def failed(self, error: StoreError) -> None:
        """A commit, a probe or a file check failed: say so once, clearly, without a traceback."""
        now = self.clock()
        if error.kind == "taken":  # not trouble to wait out: the engine stops, saying why
            self.problem, self.since = error, self.since or now
            return
        if self.problem is None or (error.lasting and not self.problem.lasting):
            self.problem = error
            self.since = self.since or now
            self._reminded = now
            log.error(
                "store trouble: not acking anything until it is fixed",
                cause=str(error),
                kind=error.kind,
                exits_in_seconds=self.grace,
            )
        elif now - self._reminded >= REMIND_EVERY:
            self._reminded = now
            assert self.since is not None
            log.error(
                "store trouble goes on",
                cause=str(self.problem),
                for_seconds=round(now - self.since),
                exits_in_seconds=round(max(0.0, self.grace - (now - self.since))),
            )

    @property
    def ready(self) -> bool:
        return self.problem is None and self.clock() - self.last_ok < READY_WITHIN

    @property
    def expired(self) -> bool:
        """The trouble has lasted past the grace period: time to exit."""
        return self.since is not None and self.clock() - self.since >= self.grace


async def watch_store(store: Store, health: StoreHealth, stopping: asyncio.Event) -> None:
    """Every second: is the file still there, whole, writable, and can it commit? Upkeep too.

    A deleted store's content (every commit the engine made) is copied beside it at once:
    it lives on only in the file the engine still has open.
    """
    rescued = False
    while not stopping.is_set():
        await asyncio.sleep(WATCH_EVERY)
        probe = time.monotonic() - health.last_ok > WATCH_EVERY
        problem = await store.watch(probe=probe)
        if problem is None:
            if probe:
                health.ok()
            continue
        health.failed(problem)
        if problem.kind == "deleted" and not rescued:
            rescued = True
            try:
                copy = await store.rescue()
            except StoreError as exc:
                log.error("could not copy the deleted store's content", error=str(exc))
            else:
                log.error(
                    "copied what the deleted store held (every commit the engine made) to a "
                    "new file: move it back to the store's path and restart the engine",
                    copy=copy,
                )
