"""The outbox relay: publishes committed outbox rows, confirmed, and reports them sent.

A row leaves the outbox only after the broker has confirmed it; a row whose
publish fails is retried with backoff until it goes, so a committed step is
never lost. A crash between the confirm and the row's deletion publishes it
again at start-up: consumers treat the copy as already applied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from bus_adapters.base import Bus, BusError, Message, UnroutableError
from hms_mgmt.logs import get_logger
from hms_mgmt.store.base import OutboxRow

log = get_logger("relay")


class OutboxRelay:
    def __init__(
        self,
        bus: Bus,
        *,
        on_unroutable: Callable[[OutboxRow], Awaitable[None]] | None = None,
        max_in_flight: int = 2000,
        crash_point: Callable[[str], None] = lambda _point: None,
    ) -> None:
        self._bus = bus
        self._on_unroutable = on_unroutable
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._queued: set[str] = set()
        self._confirmed: list[str] = []
        self._crash_point = crash_point
        self.unroutable_total = 0

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(self, rows: list[OutboxRow]) -> None:
        for row in rows:
            if row.message_id in self._queued:
                continue
            self._queued.add(row.message_id)
            task = asyncio.get_running_loop().create_task(self._publish(row))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def take_confirmed(self) -> list[str]:
        confirmed, self._confirmed = self._confirmed, []
        return confirmed

    def restore_confirmed(self, message_ids: list[str]) -> None:
        """Give back ids taken for a transaction that did not commit."""
        self._confirmed[:0] = message_ids

    @property
    def has_confirmed(self) -> bool:
        return bool(self._confirmed)

    async def drain(self, timeout: float) -> bool:
        """Wait for publishes in flight; True if all went out in time."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending

    async def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _publish(self, row: OutboxRow) -> None:
        delay = 0.1
        message = Message(
            body=row.body,
            exchange=row.exchange,
            routing_key=row.routing_key,
            headers=row.headers,
            message_id=row.message_id,
        )
        async with self._slots:
            while True:
                try:
                    self._crash_point("before_publish")
                    await self._bus.publish(message)
                    break
                except UnroutableError as exc:
                    self.unroutable_total += 1
                    log.error(
                        "unroutable publish: kept in the outbox, retrying",
                        routing_key=row.routing_key,
                        exchange=row.exchange,
                        message_id=row.message_id,
                        error=str(exc),
                    )
                    if self._on_unroutable is not None:
                        try:
                            await self._on_unroutable(row)
                        except BusError as declare_error:
                            log.error("re-declaring topology failed", error=str(declare_error))
                except BusError as exc:
                    log.warning(
                        "publish failed: kept in the outbox, retrying",
                        routing_key=row.routing_key,
                        error=str(exc),
                        retry_in=delay,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._crash_point("after_confirm")
        self._queued.discard(row.message_id)
        self._confirmed.append(row.message_id)
