"""The outbox relay: publishes committed outbox rows, confirmed, and reports them sent.

Rows for the same step queue that are handed over together go out as one
message (``{"steps": [...]}``), up to :data:`STEP_BATCH` runs or
:data:`BATCH_BYTES`: a busy engine sends one message for many runs, a quiet
one a message per run. Step batches stay small because a message is acked,
and after a crash redone, as a whole, and so that several step services share
the work. Retries (attempt > 1) always travel alone, so a run
that crashes its worker cannot take the same neighbours down twice.

A row leaves the outbox only after the broker has confirmed its message; a
publish that fails is retried with backoff until it goes, so a committed step
is never lost. A crash between the confirm and the row's deletion publishes it
again at start-up: consumers treat the copy as already applied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from bus_adapters.base import Bus, Message
from hms_mgmt.faults import Faults
from hms_mgmt.logs import get_logger
from hms_mgmt.sending import publish_until_sent
from hms_mgmt.store.base import OutboxRow
from hms_mgmt.topology import STEPS_EXCHANGE
from hms_mgmt.wire.codec import batch_body, batches

log = get_logger("relay")

STEP_BATCH = 64
"""Runs in one step message at most."""


def group(rows: list[OutboxRow]) -> list[tuple[list[OutboxRow], Message]]:
    """Rows as messages: step runs for one queue batched together, the rest one by one."""
    by_key: dict[str, list[OutboxRow]] = {}
    messages: list[tuple[list[OutboxRow], Message]] = []
    for row in rows:
        if row.exchange != STEPS_EXCHANGE:
            message = Message(
                body=row.body,
                exchange=row.exchange,
                routing_key=row.routing_key,
                headers=row.headers,
                message_id=row.message_id,
            )
            messages.append(([row], message))
        elif row.headers.get("hms-attempt", 1) != 1:
            by_key[f"{row.routing_key}#{row.message_id}"] = [row]  # a retry goes alone
        else:
            by_key.setdefault(row.routing_key, []).append(row)
    for same_queue in by_key.values():
        for batch in batches(same_queue, lambda row: len(row.body), max_items=STEP_BATCH):
            first = batch[0]
            several = len(batch) > 1
            messages.append(
                (
                    batch,
                    Message(
                        body=batch_body("steps", [row.body for row in batch]),
                        exchange=first.exchange,
                        routing_key=first.routing_key,
                        headers={"hms-count": len(batch)} if several else dict(first.headers),
                        message_id=f"{first.message_id}+{len(batch) - 1}"
                        if several
                        else first.message_id,
                    ),
                )
            )
    return messages


class OutboxRelay:
    def __init__(
        self,
        bus: Bus,
        *,
        on_unroutable: Callable[[OutboxRow], Awaitable[None]] | None = None,
        max_in_flight: int = 256,
        faults: Faults | None = None,
    ) -> None:
        self._bus = bus
        self._on_unroutable = on_unroutable
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        # Rows handed over and not yet confirmed by the broker: message id -> created_at.
        self._queued: dict[str, float] = {}
        self._confirmed: list[str] = []
        self._faults = faults or Faults()

    def submit(self, rows: list[OutboxRow]) -> None:
        fresh = [row for row in rows if row.message_id not in self._queued]
        self._queued.update((row.message_id, row.created_at) for row in fresh)
        loop = asyncio.get_running_loop()
        for batch, message in group(fresh):
            task = loop.create_task(self._publish(batch, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def resubmit(self, rows: list[OutboxRow]) -> None:
        """Rows read back from the outbox (a commit whose outcome was unknown may have made
        them), less those confirmed and not yet deleted; any already queued are skipped too."""
        confirmed = set(self._confirmed)
        self.submit([row for row in rows if row.message_id not in confirmed])

    def take_confirmed(self) -> list[str]:
        confirmed, self._confirmed = self._confirmed, []
        return confirmed

    def restore_confirmed(self, message_ids: list[str]) -> None:
        """Give back ids taken for a transaction that did not commit."""
        self._confirmed[:0] = message_ids

    @property
    def has_confirmed(self) -> bool:
        return bool(self._confirmed)

    def backlog(self, now: float) -> tuple[int, float]:
        """Rows handed over and not yet confirmed, and the age of the oldest (0 with none).

        Read at scrape time, never on the hot path: the minimum is taken then.
        """
        if not self._queued:
            return 0, 0.0
        return len(self._queued), max(0.0, now - min(self._queued.values()))

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

    async def _publish(self, rows: list[OutboxRow], message: Message) -> None:
        async with self._slots:
            if self._faults.due("after_publish"):  # sent, then dead before the confirm
                sending = asyncio.ensure_future(self._bus.publish(message))
                await asyncio.sleep(0.02)
                self._faults.crash("after_publish")
                await sending

            async def redeclare() -> None:
                if self._on_unroutable is not None:
                    await self._on_unroutable(rows[0])

            await publish_until_sent(
                self._bus, message, what="an outbox message", on_unroutable=redeclare
            )
        self._faults.reached("after_confirm")
        for row in rows:
            self._queued.pop(row.message_id, None)
            self._confirmed.append(row.message_id)
