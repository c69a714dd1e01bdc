"""Retention: finished workflows go, with their runs and history, once they are old enough.

In small transactions between batches (``PRUNE_STEP`` workflows each), so the loop never
stalls, and so that the store's size stops growing under steady load. An operator's prune
by hand (``hms store prune``) goes the same way, with its own cutoff.
"""

from __future__ import annotations

import asyncio

from hms_mgmt.engine.health import StoreHealth
from hms_mgmt.errors import StoreError
from hms_mgmt.logs import get_logger
from hms_mgmt.store.base import Store

log = get_logger("engine")

DEFAULT_RETENTION = 30 * 24 * 3600.0  # finished workflows are pruned after this long
REQUEST_MEMORY = 7 * 24 * 3600.0  # how long answers to repeated requests are kept
PRUNE_EVERY = 10.0  # seconds between prune steps while nothing is left to prune
PRUNE_STEP = 200  # workflows deleted per prune transaction


class Retention:
    def __init__(self, store: Store, health: StoreHealth, keep: float | None) -> None:
        self._store = store
        self._health = health
        self.keep = keep  # seconds a finished workflow is kept; None: for ever
        self.next_at = 0.0
        self._asked: list[tuple[float, asyncio.Future[int]]] = []  # by hand
        self._pruned = 0

    @property
    def due(self) -> bool:
        return bool(self._asked)

    async def step(self, now: float) -> None:
        """One small step; the next is soon if there is more to do, else in ``PRUNE_EVERY``."""
        cutoff = None if self.keep is None else now - self.keep
        if self._asked:
            asked = max(before for before, _ in self._asked)
            cutoff = asked if cutoff is None else max(cutoff, asked)
        try:
            pruned = 0 if cutoff is None else await self._store.prune(cutoff, PRUNE_STEP)
            forgotten = await self._store.forget_requests(now - REQUEST_MEMORY, PRUNE_STEP * 5)
        except StoreError as exc:
            self._health.failed(exc)
            return
        self._health.ok()
        self._pruned += pruned
        more = pruned == PRUNE_STEP or forgotten == PRUNE_STEP * 5
        self.next_at = now + (0.05 if more else PRUNE_EVERY)
        if pruned:
            log.debug("pruned finished workflows", count=pruned)
        if not more and self._asked:
            done, self._asked = self._asked, []
            for _, future in done:
                if not future.done():
                    future.set_result(self._pruned)
            self._pruned = 0

    async def prune(self, before: float) -> int:
        """Delete the workflows that finished before ``before`` now; return how many went."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pruned = 0
        self._asked.append((before, future))
        return await future
