"""Getting messages onto the bus: many small sends coalesced into one, and retried until sent.

Both are shared by every sender: the client coalesces requests, a step service its
outcomes, and the engine's outbox relay and the step service retry a publish until the
broker confirms it, so that a committed step or a finished handler's outcome is never lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

from bus_adapters.base import Bus, BusError, Message, UnroutableError
from hms_mgmt.logs import get_logger
from hms_mgmt.wire.codec import batches

log = get_logger("sending")

T = TypeVar("T")

FIRST_RETRY = 0.1
LAST_RETRY = 5.0


class Coalescer(Generic[T]):
    """Items added in one turn of the event loop are sent together, in the next.

    A busy sender thus sends one message for many items, and a quiet one a message per
    item at once (no timer, no wait for more). ``send`` gets batches of at most
    :data:`hms_mgmt.wire.codec.MAX_BATCH` items and ``BATCH_BYTES``, each in a task.
    """

    def __init__(
        self, send: Callable[[list[T]], Coroutine[Any, Any, None]], size_of: Callable[[T], int]
    ) -> None:
        self._send = send
        self._size_of = size_of
        self._pending: list[T] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, item: T) -> None:
        self._pending.append(item)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        pending, self._pending = self._pending, []
        for batch in batches(pending, self._size_of):
            task = loop.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()


async def publish_until_sent(
    bus: Bus,
    message: Message,
    *,
    what: str,
    on_unroutable: Callable[[], Awaitable[None]] | None = None,
    copies: int = 1,
) -> None:
    """Publish, confirmed, retrying with backoff (0.1 s to 5 s) until the broker takes it.

    An unroutable message is an error worth a line each time (its queue is missing), and
    ``on_unroutable`` may declare it again; any other broker trouble is waited out.
    ``copies`` > 1 sends the message that many times (the chaos suite's duplicate outcomes).
    """
    delay = FIRST_RETRY
    while True:
        try:
            for _ in range(copies):
                await bus.publish(message)
            return
        except UnroutableError as exc:
            log.error(
                f"unroutable publish of {what}: kept, retrying",
                routing_key=message.routing_key,
                exchange=message.exchange,
                message_id=message.message_id,
                error=str(exc),
            )
            if on_unroutable is not None:
                try:
                    await on_unroutable()
                except BusError as declare_error:
                    log.error("declaring its queue again failed", error=str(declare_error))
        except BusError as exc:
            log.warning(
                f"publish of {what} failed: kept, retrying",
                routing_key=message.routing_key,
                error=str(exc),
                retry_in=delay,
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, LAST_RETRY)
