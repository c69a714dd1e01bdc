"""The intake stage: messages from the engine's three queues become typed events, or are refused.

Requests (``hms.engine.commands``), outcomes (``hms.engine.results``) and the step messages
the broker dead-lettered (``hms.engine.deadletters``) are decoded and checked here, once:
a message that cannot be decoded, an item that does not validate, an outcome or dead
letter without its run's token, a request or outcome from a broker user who may not send
it — each is dead-lettered with the reason (and a request's sender told at once), and the
message acked. What passes goes into the inbox as :class:`~hms_mgmt.engine.events.Received`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bus_adapters.base import (
    JSON_CONTENT_TYPE,
    Bus,
    BusError,
    Delivery,
    Message,
    UnroutableError,
    settle,
)
from hms_mgmt.engine.events import (
    DeadLetterEvent,
    Event,
    OutcomeEvent,
    Received,
    RequestEvent,
)
from hms_mgmt.engine.work import Reply
from hms_mgmt.errors import InvalidMessageError
from hms_mgmt.logs import get_logger
from hms_mgmt.tokens import Signer
from hms_mgmt.topology import DEAD_EXCHANGE, dlq_name
from hms_mgmt.wire.codec import batch_body, dumps
from hms_mgmt.wire.fields import Refused
from hms_mgmt.wire.outcomes import decode_outcomes
from hms_mgmt.wire.requests import decode_requests
from hms_mgmt.wire.steps import StepMessage

log = get_logger("engine")

UNSIGNED = (
    "its token does not match its step run: forged, replayed across runs, or signed by "
    "another engine's store"
)


class Access:
    """Which broker users may send what, on RabbitMQ's validated ``user_id``.

    With neither ``client_users`` nor ``service_users`` set, every user of the vhost is
    trusted. Otherwise client users may send every request, service users outcomes and
    definitions, and the engine's own user (its HTTP API's requests) everything.
    """

    def __init__(
        self,
        own_user: str | None,
        client_users: frozenset[str] | None,
        service_users: frozenset[str] | None,
    ) -> None:
        self.own_user = own_user
        self.client_users = client_users
        self.service_users = service_users

    def forbidden(self, user: str | None, what: str) -> str | None:
        """Why ``user`` may not send ``what`` (a request type, or "outcome"); None if it may."""
        if self.client_users is None and self.service_users is None:
            return None
        if user is None:
            return (
                f"{what!r} without a user_id: the engine obeys only messages whose broker user "
                "is named (and checked by RabbitMQ)"
            )
        if user == self.own_user:
            return None
        if what != "outcome" and user in (self.client_users or ()):
            return None
        if what in ("outcome", "define") and user in (self.service_users or ()):
            return None
        return f"broker user {user!r} may not send {what!r} messages to this engine"


class Intake:
    def __init__(
        self,
        bus: Bus,
        access: Access,
        send_replies: Callable[[list[Reply]], Awaitable[None]],
    ) -> None:
        self._bus = bus
        self._access = access
        self._send_replies = send_replies
        self.signer = Signer(b"")  # the store's, once it is open
        self.inbox: asyncio.Queue[Received] = asyncio.Queue()
        self.dead_lettered = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def on_request(self, delivery: Delivery) -> None:
        try:
            requests, refused = decode_requests(delivery)
        except InvalidMessageError as exc:
            self.refuse(delivery, str(exc))
            return
        allowed = []
        for request in requests:
            reason = self._access.forbidden(delivery.user_id, request.kind)
            if reason is None:
                allowed.append(request)
            else:
                refused.append((request.raw, reason))
        if refused and delivery.reply_to:
            self._answer_refused(delivery.reply_to, refused)
        received = Received(delivery, refused=refused, key="requests")
        received.events = [RequestEvent(request, received) for request in allowed]
        self.inbox.put_nowait(received)

    def on_outcome(self, delivery: Delivery) -> None:
        try:
            outcomes, refused = decode_outcomes(delivery)
        except InvalidMessageError as exc:
            self.refuse(delivery, str(exc))
            return
        sender = self._access.forbidden(delivery.user_id, "outcome")
        if sender is not None:
            self.refuse(delivery, sender)
            return
        received = Received(delivery, refused=refused, key="outcomes")
        events: list[Event] = []
        for outcome in outcomes:
            if self.signer.valid(outcome.workflow_id, outcome.seq, outcome.attempt, outcome.token):
                events.append(OutcomeEvent(outcome, received))
            elif outcome.malformed is not None:
                refused.append((outcome.as_sent, f"{UNSIGNED}; and malformed: {outcome.malformed}"))
            else:
                refused.append((outcome.as_sent, UNSIGNED))
        received.events = events
        self.inbox.put_nowait(received)

    def on_dead_letter(self, delivery: Delivery) -> None:
        deaths = delivery.headers.get("x-death") or []
        death = deaths[0] if deaths and isinstance(deaths[0], dict) else {}
        queue, reason = str(death.get("queue", "")), str(death.get("reason", "unknown"))
        try:
            steps = StepMessage.decode(delivery)
            if queue and queue != steps[0].topic:
                raise InvalidMessageError(
                    f"message for {steps[0].topic!r} came from queue {queue!r}"
                )
            for step in steps:
                if not self.signer.valid(step.workflow_id, step.seq, step.attempt, step.token):
                    raise InvalidMessageError(f"a step in it: {UNSIGNED}")
        except InvalidMessageError as exc:
            self.refuse(delivery, str(exc), step_queue=queue or None)
            return
        received = Received(delivery, key="steps", dead_queue=steps[0].topic)
        received.events = [DeadLetterEvent(step, reason, received) for step in steps]
        self.inbox.put_nowait(received)

    # -- refusal ---------------------------------------------------------------------------

    def _answer_refused(self, reply_to: str, refused: list[Refused]) -> None:
        """Tell the client at once why its request was refused, rather than let it time out."""
        replies: list[Reply] = [
            (
                reply_to,
                str(item["request_id"]),
                False,
                {"type": "InvalidMessageError", "message": reason},
            )
            for item, reason in refused
            if isinstance(item, dict) and isinstance(item.get("request_id"), str)
        ]
        if replies:
            self._spawn(self._send_replies(replies))

    def refuse(self, delivery: Delivery, reason: str, *, step_queue: str | None = None) -> None:
        """Dead-letter a message that cannot be decoded, with the reason; then ack it."""
        log.warning(
            "invalid message dead-lettered",
            queue=step_queue or delivery.queue,
            reason=reason,
            message_id=delivery.message_id,
        )
        self._spawn(
            self._dead_letter_and_ack(
                delivery, delivery.body, delivery.content_type, reason, step_queue
            )
        )

    def refuse_items(self, received: Received) -> None:
        """Dead-letter the items of a message that did not validate; then ack the message."""
        assert received.delivery is not None
        reasons = "; ".join(sorted({reason for _, reason in received.refused}))
        log.warning(
            "invalid items dead-lettered",
            queue=received.dead_queue or received.delivery.queue,
            count=len(received.refused),
            reason=reasons[:500],
        )
        body = batch_body(received.key, [dumps(item) for item, _ in received.refused])
        self._spawn(
            self._dead_letter_and_ack(
                received.delivery, body, JSON_CONTENT_TYPE, reasons, received.dead_queue
            )
        )

    async def _dead_letter_and_ack(
        self,
        delivery: Delivery,
        body: bytes,
        content_type: str | None,
        reason: str,
        step_queue: str | None,
    ) -> None:
        headers = {k: v for k, v in delivery.headers.items() if isinstance(k, str)}
        headers["x-hms-reason"] = f"invalid message: {reason}"[:1000]
        headers["x-hms-queue"] = step_queue or delivery.queue
        headers["x-hms-dead-at"] = time.time()
        targets = [(DEAD_EXCHANGE, step_queue)] if step_queue else []
        targets.append(("", dlq_name(delivery.queue)))
        for exchange, key in targets:
            try:
                await self._bus.publish(
                    Message(
                        body=body,
                        exchange=exchange,
                        routing_key=key,
                        headers=headers,
                        message_id=delivery.message_id,
                        content_type=content_type or "application/octet-stream",
                    )
                )
                break
            except UnroutableError:
                continue
            except BusError as exc:
                log.error(
                    "could not dead-letter an invalid message; it stays queued", error=str(exc)
                )
                with contextlib.suppress(BusError, OSError):
                    await delivery.reject(requeue=True)
                return
        self.dead_lettered += 1
        await settle(delivery.ack())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
