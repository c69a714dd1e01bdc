"""An in-process broker with RabbitMQ's semantics, for unit tests and the one-process demo.

Brokers are named by URL (``memory://demo``): every :class:`MemoryBus` on the
same URL in one process shares one :class:`MemoryBroker`. It routes like
RabbitMQ (default, direct and topic exchanges), refuses unroutable publishes,
tracks unacked deliveries per consumer, requeues them when the consumer goes
away, counts deliveries against a queue's delivery limit and dead-letters with
an ``x-death`` header. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from bus_adapters.base import (
    BusError,
    Delivery,
    Message,
    OnDelivery,
    QueueMismatchError,
    QueueSpec,
    ResourceLockedError,
    UnroutableError,
)


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


@dataclass
class _Stored:
    message: Message
    exchange: str
    routing_key: str
    delivery_count: int = 0
    expires_at: float | None = None


@dataclass
class _Consumer:
    tag: int
    on_delivery: OnDelivery
    prefetch: int
    unacked: dict[int, _Stored] = field(default_factory=dict)
    active: bool = True


@dataclass
class _Queue:
    spec: QueueSpec
    ready: deque[_Stored] = field(default_factory=deque)
    consumers: list[_Consumer] = field(default_factory=list)
    next_consumer: int = 0


@dataclass
class MemoryBroker:
    exchanges: dict[str, str] = field(default_factory=dict)  # name -> kind
    bindings: dict[str, list[tuple[str, str]]] = field(
        default_factory=dict
    )  # exchange -> (key, queue)
    queues: dict[str, _Queue] = field(default_factory=dict)
    tags: itertools.count[int] = field(default_factory=itertools.count)
    held: dict[str, _MemoryLock] = field(default_factory=dict)  # exclusive queues by name

    def route(self, exchange: str, routing_key: str) -> list[str]:
        if exchange == "":
            return [routing_key] if routing_key in self.queues else []
        kind = self.exchanges.get(exchange)
        if kind is None:
            raise BusError(f"NOT_FOUND - no exchange {exchange!r}")
        found: list[str] = []
        for key, queue in self.bindings.get(exchange, []):
            hit = (
                kind == "fanout"
                or (kind == "direct" and key == routing_key)
                or (kind == "topic" and topic_matches(key, routing_key))
            )
            if hit and queue not in found:
                found.append(queue)
        return found

    def enqueue(self, queue_name: str, stored: _Stored) -> None:
        queue = self.queues[queue_name]
        queue.ready.append(stored)
        limit = queue.spec.max_length
        while limit is not None and len(queue.ready) > limit:
            queue.ready.popleft()  # x-max-length: the oldest go
        self.dispatch(queue)

    def dispatch(self, queue: _Queue) -> None:
        now = time.monotonic()
        while queue.ready:
            head = queue.ready[0]
            if head.expires_at is not None and head.expires_at <= now:
                queue.ready.popleft()
                continue
            consumer = self._free_consumer(queue)
            if consumer is None:
                return
            queue.ready.popleft()
            self._deliver(queue, consumer, head)

    def _free_consumer(self, queue: _Queue) -> _Consumer | None:
        for offset in range(len(queue.consumers)):
            index = (queue.next_consumer + offset) % len(queue.consumers)
            consumer = queue.consumers[index]
            if consumer.active and (
                consumer.prefetch <= 0 or len(consumer.unacked) < consumer.prefetch
            ):
                queue.next_consumer = index + 1
                return consumer
        return None

    def _deliver(self, queue: _Queue, consumer: _Consumer, stored: _Stored) -> None:
        tag = next(self.tags)
        redelivered = stored.delivery_count > 0
        stored.delivery_count += 1
        consumer.unacked[tag] = stored
        settled = False

        async def ack() -> None:
            nonlocal settled
            if settled or tag not in consumer.unacked:
                return  # like an ack on a closed channel: the delivery was already requeued
            settled = True
            del consumer.unacked[tag]
            self.dispatch(queue)

        async def reject(requeue: bool) -> None:
            nonlocal settled
            if settled or tag not in consumer.unacked:
                return
            settled = True
            del consumer.unacked[tag]
            if requeue:
                self.requeue(queue, stored)
            else:
                self.dead_letter(queue, stored, "rejected")
            self.dispatch(queue)

        message = stored.message
        delivery = Delivery(
            body=message.body,
            queue=queue.spec.name,
            routing_key=stored.routing_key,
            exchange=stored.exchange,
            headers=dict(message.headers),
            message_id=message.message_id,
            content_type=message.content_type,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            redelivered=redelivered,
            _ack=ack,
            _reject=reject,
            user_id=message.user_id,
        )
        asyncio.get_running_loop().call_soon(consumer.on_delivery, delivery)

    def requeue(self, queue: _Queue, stored: _Stored) -> None:
        limit = queue.spec.delivery_limit
        if limit is not None and stored.delivery_count > limit:
            self.dead_letter(queue, stored, "delivery_limit")
        else:
            queue.ready.appendleft(stored)

    def dead_letter(self, queue: _Queue, stored: _Stored, reason: str) -> None:
        dlx = queue.spec.dead_letter_exchange
        if dlx is None:
            return
        message = stored.message
        death = {
            "queue": queue.spec.name,
            "reason": reason,
            "exchange": stored.exchange,
            "routing-keys": [stored.routing_key],
            "count": 1,
        }
        headers = dict(message.headers)
        headers["x-death"] = [death, *headers.get("x-death", [])]
        dead = Message(
            body=message.body,
            exchange=dlx,
            routing_key=stored.routing_key,
            headers=headers,
            message_id=message.message_id,
            content_type=message.content_type,
            persistent=message.persistent,
        )
        for name in self.route(dlx, stored.routing_key):
            self.enqueue(name, _Stored(dead, dlx, stored.routing_key))

    def remove_consumer(self, queue: _Queue, consumer: _Consumer) -> None:
        consumer.active = False
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        for stored in reversed(list(consumer.unacked.values())):
            self.requeue(queue, stored)
        consumer.unacked.clear()
        self.dispatch(queue)


class _MemoryLock:
    def __init__(self, broker: MemoryBroker, queue: str) -> None:
        self._broker, self._queue = broker, queue
        self.lost = asyncio.Event()

    async def release(self) -> None:
        if self._broker.held.get(self._queue) is self:
            del self._broker.held[self._queue]


_brokers: dict[str, MemoryBroker] = {}


def broker_for(url: str) -> MemoryBroker:
    """The process-wide broker for a ``memory://name`` URL."""
    return _brokers.setdefault(url, MemoryBroker())


def reset_brokers() -> None:
    """Forget every in-memory broker (for tests)."""
    _brokers.clear()


class _MemorySubscription:
    def __init__(self, broker: MemoryBroker, queue: _Queue, consumer: _Consumer) -> None:
        self._broker, self._queue, self._consumer = broker, queue, consumer

    async def cancel(self) -> None:
        # Like basic.cancel: no new deliveries; unacked ones stay with the caller.
        self._consumer.active = False
        if self._consumer in self._queue.consumers:
            self._queue.consumers.remove(self._consumer)

    async def set_prefetch(self, count: int) -> None:
        self._consumer.prefetch = count
        self._broker.dispatch(self._queue)

    def close(self) -> None:
        self._broker.remove_consumer(self._queue, self._consumer)


class MemoryBus:
    """A :class:`bus_adapters.base.Bus` on an in-process :class:`MemoryBroker`."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.user: str | None = None
        self.broker = broker_for(url)
        self._subscriptions: list[_MemorySubscription] = []
        self._exclusive: list[str] = []
        self._locks: list[_MemoryLock] = []
        self._closed = False

    @property
    def connected(self) -> bool:
        return not self._closed

    @property
    def cluster(self) -> bool:
        return False  # one process is one node

    @property
    def reconnects(self) -> int:
        return 0  # an in-process broker never drops a connection

    async def connect(self) -> None:
        self._closed = False

    async def declare_exchange(self, name: str, kind: str = "topic") -> None:
        existing = self.broker.exchanges.get(name)
        if existing is not None and existing != kind:
            raise BusError(f"PRECONDITION_FAILED - exchange {name!r} is {existing}, not {kind}")
        self.broker.exchanges[name] = kind

    async def declare_queue(self, spec: QueueSpec) -> None:
        existing = self.broker.queues.get(spec.name)
        if existing is None:
            self.broker.queues[spec.name] = _Queue(spec)
        elif existing.spec != spec:
            raise QueueMismatchError(
                f"PRECONDITION_FAILED - queue {spec.name!r} exists with other arguments"
            )

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        if queue not in self.broker.queues or exchange not in self.broker.exchanges:
            raise BusError(f"NOT_FOUND - cannot bind {queue!r} to {exchange!r}")
        bindings = self.broker.bindings.setdefault(exchange, [])
        if (routing_key, queue) not in bindings:
            bindings.append((routing_key, queue))

    async def publish(self, message: Message, *, confirm: bool = True) -> None:
        self._check_open()
        targets = self.broker.route(message.exchange, message.routing_key)
        if not targets:
            if confirm:
                raise UnroutableError(
                    f"no queue for routing key {message.routing_key!r} "
                    f"on exchange {message.exchange or '(default)'!r}"
                )
            return
        expires_at = None if message.expiration is None else time.monotonic() + message.expiration
        for name in targets:
            self.broker.enqueue(
                name, _Stored(message, message.exchange, message.routing_key, expires_at=expires_at)
            )

    async def consume(
        self, queue: str, on_delivery: OnDelivery, prefetch: int
    ) -> _MemorySubscription:
        self._check_open()
        stored_queue = self.broker.queues.get(queue)
        if stored_queue is None:
            raise BusError(f"NOT_FOUND - no queue {queue!r}")
        consumer = _Consumer(next(self.broker.tags), on_delivery, prefetch)
        stored_queue.consumers.append(consumer)
        subscription = _MemorySubscription(self.broker, stored_queue, consumer)
        self._subscriptions.append(subscription)
        self.broker.dispatch(stored_queue)
        return subscription

    async def reply_queue(self, on_delivery: OnDelivery) -> str:
        name = f"hms.reply.{next(self.broker.tags)}"
        await self.declare_queue(QueueSpec(name))
        self._exclusive.append(name)

        def auto_ack(delivery: Delivery) -> None:
            on_delivery(delivery)
            asyncio.get_running_loop().create_task(delivery.ack())

        await self.consume(name, auto_ack, prefetch=0)
        return name

    async def queue_length(self, queue: str) -> int:
        stored = self.broker.queues.get(queue)
        return 0 if stored is None else len(stored.ready)

    async def get(self, queue: str) -> Delivery | None:
        stored_queue = self.broker.queues.get(queue)
        if stored_queue is None or not stored_queue.ready:
            return None
        received: list[Delivery] = []
        consumer = _Consumer(next(self.broker.tags), received.append, prefetch=1)
        stored_queue.consumers.insert(0, consumer)
        stored_queue.next_consumer = 0
        self.broker.dispatch(stored_queue)
        consumer.active = False
        stored_queue.consumers.remove(consumer)
        await asyncio.sleep(0)  # let the scheduled on_delivery run
        if not received:
            return None
        delivery = received[0]
        # Like basic.get: the delivery stays unacked until acked or rejected.
        self._subscriptions.append(_MemorySubscription(self.broker, stored_queue, consumer))
        return delivery

    async def hold(self, queue: str) -> _MemoryLock:
        self._check_open()
        if queue in self.broker.held:
            raise ResourceLockedError(f"another connection holds {queue!r}")
        lock = _MemoryLock(self.broker, queue)
        self.broker.held[queue] = lock
        self._locks.append(lock)
        return lock

    async def close(self) -> None:
        self._closed = True
        for lock in self._locks:
            await lock.release()
            lock.lost.set()
        self._locks.clear()
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()
        for name in self._exclusive:
            self.broker.queues.pop(name, None)
            for bindings in self.broker.bindings.values():
                bindings[:] = [b for b in bindings if b[1] != name]
        self._exclusive.clear()

    def statistics(self) -> dict[str, Any]:
        """Ready and unacked counts per queue, for tests and the demo."""
        return {
            name: {
                "ready": len(queue.ready),
                "unacked": sum(len(c.unacked) for c in queue.consumers),
            }
            for name, queue in self.broker.queues.items()
        }

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("the bus is closed")
