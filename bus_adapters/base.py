"""The seam between HMS-MGMT and a message broker.

The engine, workers and clients talk to a :class:`Bus` only. An adapter gives
these semantics, whatever the broker underneath:

* ``publish`` returns once the broker has taken responsibility for the message
  (a publisher confirm) and raises :class:`UnroutableError` when no queue took
  it: a message is never dropped silently.
* consumers ack manually; ``reject(requeue=False)`` hands the message to the
  queue's dead-letter exchange; deliveries unacked when a consumer or
  connection goes away are redelivered with ``redelivered=True``.
* declarations are idempotent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

JSON_CONTENT_TYPE = "application/json"


class BusError(Exception):
    """Something went wrong between us and the broker."""


class BrokerConnectError(BusError):
    """The broker cannot be reached, or it refused the connection; the message names the URL
    without its password.

    ``refused`` is True when the broker answered and said no (a wrong user name or password,
    a vhost that does not exist or that the user may not use): trying again will not help.
    False when nothing listens there, or the network failed.
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class UnroutableError(BusError):
    """The broker had no queue for a message published as mandatory."""


class PublishNotConfirmedError(BusError):
    """The broker refused a message or did not confirm it in time."""


class ResourceLockedError(BusError):
    """Another connection holds the exclusive queue asked for."""


class AccessRefusedError(BusError):
    """The broker user may not do this (RabbitMQ permissions)."""


class QueueMismatchError(BusError):
    """A queue exists with other arguments than those declared (another type, say)."""


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue; quorum queues may dead-letter and limit deliveries."""

    name: str
    quorum: bool = False
    dead_letter_exchange: str | None = None
    delivery_limit: int | None = None
    max_length: int | None = None  # the oldest messages are dropped beyond it


@dataclass
class Message:
    """A message to publish."""

    body: bytes
    exchange: str = ""
    routing_key: str = ""
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    content_type: str = JSON_CONTENT_TYPE
    persistent: bool = True
    reply_to: str | None = None
    correlation_id: str | None = None
    expiration: float | None = None  # seconds until the broker may drop it
    user_id: str | None = None  # RabbitMQ checks it is the publisher's own user


@dataclass
class Delivery:
    """A message received from a queue; ack or reject it exactly once."""

    body: bytes
    queue: str
    routing_key: str
    exchange: str
    headers: dict[str, Any]
    message_id: str | None
    content_type: str | None
    correlation_id: str | None
    reply_to: str | None
    redelivered: bool
    _ack: Callable[[], Awaitable[None]]
    _reject: Callable[[bool], Awaitable[None]]
    user_id: str | None = None  # the publisher's broker user, as the broker validated it

    async def ack(self) -> None:
        await self._ack()

    async def reject(self, requeue: bool = False) -> None:
        await self._reject(requeue)


async def settle(ack_or_reject: Awaitable[None]) -> bool:
    """Ack or reject; False if it failed. A failure means the channel went away: the broker
    redelivers the message, and what it carries is applied at most once."""
    try:
        await ack_or_reject
    except Exception:  # aio-pika raises its own channel errors, not only ours
        return False
    return True


OnDelivery = Callable[[Delivery], None]
"""Called once per delivery, on the event loop; it must not block (start a task)."""


class Subscription(Protocol):
    async def cancel(self) -> None:
        """Stop receiving; unacked deliveries stay with the caller to ack or reject."""

    async def set_prefetch(self, count: int) -> None:
        """Change how many deliveries may be unacked at once (from the next delivery on)."""


class BusLock(Protocol):
    """An exclusive queue held on a connection of its own, for as long as the process lives."""

    lost: asyncio.Event  # set when the connection holding it drops: the lock is gone

    async def release(self) -> None: ...


class Bus(Protocol):
    """What HMS-MGMT needs from a broker."""

    url: str
    user: str | None  # the broker user this bus publishes as (None: the broker has no users)

    @property
    def connected(self) -> bool:
        """Whether the bus is connected right now (readiness checks)."""
        ...

    @property
    def cluster(self) -> bool:
        """Whether the broker URL names several nodes (a cluster): then every queue a workflow
        depends on is a quorum queue, replicated across them."""
        ...

    @property
    def reconnects(self) -> int:
        """Connections re-established after a drop (metrics)."""
        ...

    async def connect(self) -> None: ...

    async def declare_exchange(self, name: str, kind: str = "topic") -> None: ...

    async def declare_queue(self, spec: QueueSpec) -> None: ...

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None: ...

    async def publish(self, message: Message, *, confirm: bool = True) -> None:
        """Publish; with ``confirm`` wait for the broker's confirm and refuse unroutable ones.

        Without ``confirm`` the message is sent best-effort (replies whose loss
        the requester recovers from by asking again).
        """
        ...

    async def consume(self, queue: str, on_delivery: OnDelivery, prefetch: int) -> Subscription: ...

    async def reply_queue(self, on_delivery: OnDelivery) -> str:
        """Declare an exclusive queue for replies to this process, auto-acked; return its name."""
        ...

    async def queue_length(self, queue: str) -> int:
        """The number of ready messages in a queue (0 if it does not exist)."""
        ...

    async def get(self, queue: str) -> Delivery | None:
        """Take one message from a queue without a consumer (for operators' tools)."""
        ...

    async def hold(self, queue: str) -> BusLock:
        """Declare ``queue`` exclusive to this process: a lock the broker frees when the process
        dies or its connection drops. Raises :class:`ResourceLockedError` if another holds it."""
        ...

    async def close(self) -> None: ...


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names: ``/`` when its path is empty (RabbitMQ's default). Of a
    list of URLs (several nodes, comma-separated), the first's: they all name the same."""
    path = urlsplit(url.split(",", 1)[0].strip()).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def redact_url(url: str) -> str:
    """The URL without its password, for logs and error messages; each URL of a
    comma-separated list (the nodes of a broker cluster)."""
    if "," in url and url.count("://") > 1:
        return ",".join(redact_url(part.strip()) for part in url.split(","))
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
