"""Outcomes on their way to the engine: many to a message, each confirmed before its step is acked."""

from __future__ import annotations

import asyncio

from bus_adapters.base import Bus
from hms_mgmt.faults import Faults
from hms_mgmt.sending import Coalescer, publish_until_sent
from hms_mgmt.wire.outcomes import Outcome, outcomes_message


class OutcomeReporter:
    """Publishes outcomes, confirmed, many to a message.

    Outcomes reported in one turn of the event loop go out together, so a busy worker
    sends one message for many steps and a quiet one a message per step, at once.
    ``report`` returns a future that resolves once the broker has confirmed the message
    carrying the outcome; a failed publish is retried until it goes through.
    """

    def __init__(self, bus: Bus, faults: Faults | None = None) -> None:
        self._bus = bus
        self._copies = (faults or Faults()).outcome_copies
        self._outgoing: Coalescer[tuple[bytes, asyncio.Future[None]]] = Coalescer(
            self._send, lambda item: len(item[0])
        )

    def report(self, outcome: Outcome) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outgoing.add((outcome.encoded, future))
        return future

    async def _send(self, batch: list[tuple[bytes, asyncio.Future[None]]]) -> None:
        message = outcomes_message([encoded for encoded, _ in batch])
        await publish_until_sent(self._bus, message, what="outcomes", copies=self._copies)
        for _, future in batch:
            if not future.done():
                future.set_result(None)
