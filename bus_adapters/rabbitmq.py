"""The RabbitMQ adapter, on aio-pika's robust connections.

Publishing and consuming use separate connections, so a memory or disk alarm
that blocks publishers cannot stall acks. Publishes are persistent, mandatory
and confirmed; a returned message raises :class:`UnroutableError`. Consumers
ack manually. Robust connections restore channels, declarations and consumers
after a reconnect; deliveries unacked at the drop are redelivered.

A nacked publish replaces the confirming channel with a fresh one: on a cluster, a channel
that first published to a quorum queue while its leader was being re-elected (a node killed)
can go on nacking every publish to that queue for good (RabbitMQ 3.10), while a new channel
on the same node is acked at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import DeliveryError, PublishError

from bus_adapters import nodes
from bus_adapters.base import (
    AccessRefusedError,
    BrokerConnectError,
    BusError,
    Delivery,
    Message,
    OnDelivery,
    PublishNotConfirmedError,
    QueueMismatchError,
    QueueSpec,
    ResourceLockedError,
    UnroutableError,
    redact_url,
    vhost_of,
)

PUBLISH_TIMEOUT = 30.0
# Standard-library logging, as a library logs: the daemons render it as their own lines
# (JSON with HMS_LOG_FORMAT=json), and a program using the SDK keeps its own set-up.
log = logging.getLogger("bus_adapters.rabbitmq")


def queue_arguments(spec: QueueSpec) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    if spec.quorum:
        arguments["x-queue-type"] = "quorum"
    if spec.dead_letter_exchange is not None:
        arguments["x-dead-letter-exchange"] = spec.dead_letter_exchange
        if spec.quorum:
            # Dead-lettering is at most once without this pair (RabbitMQ 3.10).
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
    if spec.delivery_limit is not None:
        arguments["x-delivery-limit"] = spec.delivery_limit
    if spec.max_length is not None:
        arguments["x-max-length"] = spec.max_length
    return arguments


def _refusal(what: str, exc: Exception) -> BusError:
    """A broker error as ours: a missing permission is told apart from other trouble."""
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return AccessRefusedError(f"{what}: access refused by the broker: {exc}")
    return BusError(f"{what}: {exc}")


def connect_error(url: str, exc: BaseException) -> BrokerConnectError:
    """A failed connection as one sentence an operator can act on, naming the URL without its
    password: a refused login and a missing vhost are told apart from a broker that is down."""
    where = redact_url(url)
    user = unquote(urlsplit(url).username or "guest")
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return BrokerConnectError(
            f"the broker at {where} refused the login of user {user!r}: wrong user name or "
            f"password (ACCESS_REFUSED)",
            refused=True,
        )
    if isinstance(exc, aiormq.exceptions.ProtocolSyntaxError) and "Connection.Close" in str(exc):
        # RabbitMQ answers Connection.Open with Connection.Close (530 NOT_ALLOWED) when the vhost
        # is missing or the user has no permissions on it; aiormq reports only "wrong frame".
        return BrokerConnectError(
            f"vhost {vhost_of(url)!r} does not exist or access refused for user {user!r} "
            f"({where}): create it, or grant the user permissions on it "
            f"(rabbitmqctl add_vhost / set_permissions)",
            refused=True,
        )
    reason = str(exc) or type(exc).__name__
    return BrokerConnectError(f"cannot connect to {where}: {reason}")


def _describe(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _RabbitLock:
    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self._connection = connection
        self.lost = asyncio.Event()
        connection.close_callbacks.add(self._on_close)

    def _on_close(self, *_: Any) -> None:
        self.lost.set()

    async def release(self) -> None:
        self._connection.close_callbacks.discard(self._on_close)
        if not self._connection.is_closed:
            with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, RuntimeError):
                await self._connection.close()


def _plain(value: Any) -> Any:
    """Header values as JSON-friendly Python values (bytes become text)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _delivery(message: AbstractIncomingMessage, queue: str) -> Delivery:
    async def ack() -> None:
        try:
            await message.ack()
        except Exception as exc:  # a closed channel: the broker requeues it anyway
            raise BusError(f"ack failed: {exc!r}") from exc

    async def reject(requeue: bool) -> None:
        try:
            await message.reject(requeue=requeue)
        except Exception as exc:
            raise BusError(f"reject failed: {exc!r}") from exc

    return Delivery(
        body=message.body,
        queue=queue,
        routing_key=message.routing_key or "",
        exchange=message.exchange or "",
        headers=_plain(dict(message.headers or {})),
        message_id=message.message_id,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        redelivered=bool(message.redelivered),
        _ack=ack,
        _reject=reject,
        user_id=message.user_id,
    )


@contextlib.contextmanager
def _as_bus_error(what: str) -> Iterator[None]:
    """aio-pika's and aiormq's many errors (a channel closed by a dropped connection) as ours."""
    try:
        yield
    except BusError:
        raise
    except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError, OSError) as exc:
        raise _refusal(what, exc) from exc


class _RabbitSubscription:
    def __init__(
        self,
        queue: AbstractQueue,
        tag: str,
        channel: AbstractChannel,
        callback: Callable[[AbstractIncomingMessage], Awaitable[None]],
    ) -> None:
        self._queue, self._tag, self._channel, self._callback = queue, tag, channel, callback

    async def cancel(self) -> None:
        if not self._channel.is_closed:
            with contextlib.suppress(TimeoutError, aiormq.exceptions.AMQPError, RuntimeError):
                await self._queue.cancel(self._tag)

    async def set_prefetch(self, count: int) -> None:
        # basic.qos binds only consumers created after it: consume again. Deliveries
        # of the old consumer stay on the channel and are acked there as usual.
        await self._channel.set_qos(prefetch_count=count)
        await self._queue.cancel(self._tag)
        self._tag = await self._queue.consume(self._callback, no_ack=False)


class RabbitMQBus:
    """A :class:`bus_adapters.base.Bus` on RabbitMQ through aio-pika."""

    def __init__(self, url: str, *, name: str = "hms", publish_timeout: float = PUBLISH_TIMEOUT):
        self.url = url  # one node, or several (a cluster): comma-separated
        self.nodes = len(nodes.split_urls(url))
        # A name in the URL (?name=...) wins, so tests can name connections after themselves.
        parts = urlsplit(url.split(",", 1)[0])
        self.name = parse_qs(parts.query).get("name", [name])[0]
        self.user: str | None = unquote(parts.username) if parts.username else "guest"
        self.publish_timeout = publish_timeout
        self._consume_connection: nodes.FailoverConnection | None = None
        self._publish_connection: nodes.FailoverConnection | None = None
        self._confirmed: AbstractChannel | None = None
        self._unconfirmed: AbstractChannel | None = None
        self._declare: AbstractChannel | None = None
        self._get_channel: AbstractChannel | None = None
        self._specs: dict[str, QueueSpec] = {}
        self._exchanges: dict[tuple[bool, str], AbstractExchange] = {}
        self._lock = asyncio.Lock()
        self._renewing = asyncio.Lock()
        self._retiring: set[asyncio.Future[None]] = set()  # nacking channels, closing
        self.reconnects = 0  # connections re-established after a drop (for metrics)
        self._lost_at: dict[str, float] = {}  # connection role -> when it dropped (monotonic)
        self._closing = False

    @property
    def cluster(self) -> bool:
        """Whether the URL names several nodes: then the engine's queues are quorum queues."""
        return self.nodes > 1

    @property
    def connected(self) -> bool:
        """Whether both connections are up right now (for readiness checks)."""
        connections = (self._consume_connection, self._publish_connection)
        return all(c is not None and c.connected.is_set() for c in connections)

    def _watch(self, connection: nodes.FailoverConnection, role: str) -> None:
        """Log a drop of ``connection`` and its recovery as structured events."""

        def lost(_sender: Any, exc: BaseException | None = None, *_: Any) -> None:
            if self._closing or role in self._lost_at:
                return  # our own close, or a failed restore within the same outage
            self._lost_at[role] = time.monotonic()
            log.warning(
                "broker.connection_lost",
                extra={
                    "component": "bus",
                    "connection": f"{self.name}:{role}",
                    "broker": connection.node,
                    "error": _describe(exc),
                },
            )

        def reconnected(*_: Any) -> None:
            self.reconnects += 1
            since = self._lost_at.pop(role, None)
            log.info(
                "broker.reconnected",
                extra={
                    "component": "bus",
                    "connection": f"{self.name}:{role}",
                    "broker": connection.node,
                    "downtime": None if since is None else round(time.monotonic() - since, 3),
                    "reconnects": self.reconnects,  # by this process, over all its connections
                },
            )

        connection.close_callbacks.add(lost)
        connection.reconnect_callbacks.add(reconnected)

    async def connect(self) -> None:
        async with self._lock:
            if self._publish_connection is not None:
                return
            try:
                consume = await nodes.connect_robust(
                    self.url, name=f"{self.name}:consume", explain=connect_error
                )
                self._consume_connection = consume
                publish = await nodes.connect_robust(
                    self.url, name=f"{self.name}:publish", explain=connect_error
                )
                self._publish_connection = publish
            except BrokerConnectError:
                await self._close_connections()
                raise
            self._closing = False
            self._watch(consume, "consume")
            self._watch(publish, "publish")
            self._confirmed = await self._publish_connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._unconfirmed = await self._publish_connection.channel(publisher_confirms=False)

    async def _declare_channel(self) -> AbstractChannel:
        connection = self._require(self._publish_connection)
        if self._declare is None or self._declare.is_closed:
            self._declare = await connection.channel(publisher_confirms=False)
        return self._declare

    async def declare_exchange(self, name: str, kind: str = "topic") -> None:
        channel = await self._declare_channel()
        try:
            await channel.declare_exchange(name, aio_pika.ExchangeType(kind), durable=True)
        except aiormq.exceptions.AMQPError as exc:
            raise _refusal(f"cannot declare exchange {name!r}", exc) from exc

    async def declare_queue(self, spec: QueueSpec) -> None:
        self._specs[spec.name] = spec
        channel = await self._declare_channel()
        try:
            await channel.declare_queue(spec.name, durable=True, arguments=queue_arguments(spec))
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            kind = "quorum" if spec.quorum else "classic"
            raise QueueMismatchError(
                f"queue {spec.name!r} exists with other arguments than a {kind} queue's "
                f"{queue_arguments(spec)}: {exc}"
            ) from exc
        except aiormq.exceptions.AMQPError as exc:
            raise _refusal(f"cannot declare queue {spec.name!r}", exc) from exc

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        channel = await self._declare_channel()
        try:
            declared = await channel.get_queue(queue, ensure=False)
            await declared.bind(exchange, routing_key)
        except aiormq.exceptions.AMQPError as exc:
            raise _refusal(f"cannot bind {queue!r} to {exchange!r}", exc) from exc

    async def _exchange(self, name: str, confirm: bool) -> AbstractExchange:
        key = (confirm, name)
        exchange = self._exchanges.get(key)
        if exchange is None:
            channel = self._require(self._confirmed if confirm else self._unconfirmed)
            if name == "":
                exchange = channel.default_exchange
            else:
                exchange = await channel.get_exchange(name, ensure=False)
            self._exchanges[key] = exchange
        return exchange

    async def publish(self, message: Message, *, confirm: bool = True) -> None:
        channel = self._confirmed if confirm else self._unconfirmed
        exchange = await self._exchange(message.exchange, confirm)
        outgoing = aio_pika.Message(
            message.body,
            headers=message.headers,
            message_id=message.message_id,
            content_type=message.content_type,
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if message.persistent
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
            expiration=message.expiration,
            # Every message names its publisher's user; RabbitMQ refuses a false one, so the
            # engine can tell a client's request from a step service's.
            user_id=message.user_id or self.user,
        )
        try:
            await exchange.publish(
                outgoing,
                message.routing_key,
                mandatory=confirm,
                timeout=self.publish_timeout,
            )
        except PublishError as exc:
            raise UnroutableError(
                f"no queue for routing key {message.routing_key!r} "
                f"on exchange {message.exchange or '(default)'!r}"
            ) from exc
        except DeliveryError as exc:
            await self._renew_confirmed(channel, message.routing_key)
            raise PublishNotConfirmedError(f"the broker refused the message: {exc}") from exc
        except TimeoutError as exc:
            raise PublishNotConfirmedError(
                f"no confirm within {self.publish_timeout:g}s for {message.routing_key!r}"
            ) from exc
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as exc:
            raise BusError(f"publish to {message.routing_key!r} failed: {exc!r}") from exc

    async def _renew_confirmed(self, nacked: AbstractChannel | None, routing_key: str) -> None:
        """A fresh confirming channel in place of ``nacked``, so that the caller's retry goes
        through a channel the broker has no stale state for (see the module's docstring).
        Publishes still in flight on the old one get their confirms (or time out) before it
        is closed. Several publishes nacked together renew it once."""
        async with self._renewing:
            connection = self._publish_connection
            if nacked is None or nacked is not self._confirmed or connection is None:
                return  # renewed already, or closing
            try:
                fresh = await asyncio.wait_for(
                    connection.channel(publisher_confirms=True, on_return_raises=True),
                    timeout=self.publish_timeout,
                )
            except (TimeoutError, aiormq.exceptions.AMQPError, RuntimeError, OSError) as exc:
                log.warning(
                    "broker.channel_renew_failed",
                    extra={
                        "component": "bus",
                        "connection": f"{self.name}:publish",
                        "error": _describe(exc),
                    },
                )
                return  # the next nack tries again
            self._confirmed = fresh
            for key in [key for key in self._exchanges if key[0]]:
                del self._exchanges[key]
            log.warning(
                "broker.channel_renewed",
                extra={
                    "component": "bus",
                    "connection": f"{self.name}:publish",
                    "broker": connection.node,
                    "reason": "a publish was nacked",
                    "routing_key": routing_key,
                },
            )
            retiring = asyncio.ensure_future(self._retire(nacked))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)

    async def _retire(self, channel: AbstractChannel) -> None:
        """Close a replaced channel once its publishes in flight are settled (or timed out)."""
        with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, OSError):
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            pending = list(underlay.confirmations.values())
            waiting = [f for f in pending if isinstance(f, asyncio.Future)]
            if waiting:
                await asyncio.wait(waiting, timeout=self.publish_timeout)
        if not channel.is_closed:
            with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, OSError):
                await channel.close()

    async def consume(
        self, queue: str, on_delivery: OnDelivery, prefetch: int
    ) -> _RabbitSubscription:
        with _as_bus_error(f"cannot consume {queue!r}"):
            return await self._consume(queue, on_delivery, prefetch)

    async def _consume(
        self, queue: str, on_delivery: OnDelivery, prefetch: int
    ) -> _RabbitSubscription:
        connection = self._require(self._consume_connection)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        # Declared (not just looked up) on this channel, so that the robust connection
        # declares it again and restores the consumer after a reconnect.
        spec = self._specs.get(queue)
        if spec is None:
            declared = await channel.declare_queue(queue, passive=True)
        else:
            declared = await channel.declare_queue(
                queue, durable=True, arguments=queue_arguments(spec)
            )

        async def callback(message: AbstractIncomingMessage) -> None:
            on_delivery(_delivery(message, queue))

        tag = await declared.consume(callback, no_ack=False)
        return _RabbitSubscription(declared, tag, channel, callback)

    async def reply_queue(self, on_delivery: OnDelivery) -> str:
        with _as_bus_error("cannot declare a reply queue"):
            return await self._reply_queue(on_delivery)

    async def _reply_queue(self, on_delivery: OnDelivery) -> str:
        connection = self._require(self._consume_connection)
        channel = await connection.channel()
        # Our own name rather than a server-named one: a robust connection
        # re-declares it under the same name after a reconnect.
        label = re.sub(r"[^A-Za-z0-9_.:-]", "-", self.name)[:80]
        name = f"hms.reply.{label}.{uuid.uuid4().hex[:12]}"
        queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)

        async def callback(message: AbstractIncomingMessage) -> None:
            on_delivery(_delivery(message, name))

        await queue.consume(callback, no_ack=True)
        return name

    async def queue_length(self, queue: str) -> int:
        with _as_bus_error(f"cannot count {queue!r}"):
            return await self._queue_length(queue)

    async def _queue_length(self, queue: str) -> int:
        connection = self._require(self._publish_connection)
        channel = await connection.channel(publisher_confirms=False)
        try:
            declared = await channel.declare_queue(queue, passive=True)
            result = declared.declaration_result
            return int(result.message_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0
        finally:
            if not channel.is_closed:
                await channel.close()

    async def get(self, queue: str) -> Delivery | None:
        with _as_bus_error(f"cannot get from {queue!r}"):
            return await self._get(queue)

    async def _get(self, queue: str) -> Delivery | None:
        connection = self._require(self._consume_connection)
        if self._get_channel is None or self._get_channel.is_closed:
            self._get_channel = await connection.channel()
        declared = await self._get_channel.get_queue(queue, ensure=False)
        try:
            message = await declared.get(no_ack=False, fail=False)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        return None if message is None else _delivery(message, queue)

    async def hold(self, queue: str) -> _RabbitLock:
        # A plain connection, not a robust one: a robust one would quietly declare the queue
        # again after a drop, while another process may hold it by then.
        # On the node the other connections are on: not again and again on a dead first one.
        on = self._publish_connection
        connection = await nodes.connect_plain(
            nodes.with_query(self.url, "heartbeat=10"),
            name=f"{self.name}:lock",
            explain=connect_error,
            start=0 if on is None else on.index,
        )
        try:
            channel = await connection.channel()
            await channel.declare_queue(queue, exclusive=True, durable=False)
        except aiormq.exceptions.ChannelLockedResource as exc:
            await connection.close()
            raise ResourceLockedError(f"another connection holds {queue!r}") from exc
        except (aiormq.exceptions.AMQPError, OSError) as exc:
            await connection.close()
            raise _refusal(f"cannot declare {queue!r}", exc) from exc
        return _RabbitLock(connection)

    async def close(self) -> None:
        self._closing = True  # no broker.connection_lost for our own close
        async with self._lock:
            await self._close_connections()

    async def _close_connections(self) -> None:
        for retiring in list(self._retiring):
            retiring.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for connection in (self._consume_connection, self._publish_connection):
            if connection is not None and not connection.is_closed:
                with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, RuntimeError):
                    await connection.close()
        self._consume_connection = self._publish_connection = None
        self._confirmed = self._unconfirmed = self._declare = self._get_channel = None
        self._exchanges.clear()

    @staticmethod
    def _require(thing: Any) -> Any:
        if thing is None:
            raise BusError("the bus is not connected")
        return thing
