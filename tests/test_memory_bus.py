"""The in-memory adapter keeps RabbitMQ's semantics (routing, acks, dead letters)."""

from __future__ import annotations

import asyncio

import pytest

from bus_adapters.base import Delivery, Message, QueueSpec, UnroutableError
from bus_adapters.memory import MemoryBus, topic_matches
from tests.conftest import wait_until


def test_topic_matching() -> None:
    assert topic_matches("a.b", "a.b")
    assert topic_matches("a.*", "a.b")
    assert not topic_matches("a.*", "a.b.c")
    assert topic_matches("#", "a.b.c")
    assert topic_matches("a.#", "a")
    assert not topic_matches("a.b", "a.c")


async def test_unroutable_publishes_raise(memory_url: str) -> None:
    bus = MemoryBus(memory_url)
    await bus.declare_exchange("x", "topic")
    with pytest.raises(UnroutableError, match="no queue for routing key 'nowhere'"):
        await bus.publish(Message(b"{}", exchange="x", routing_key="nowhere"))
    await bus.publish(Message(b"{}", exchange="x", routing_key="nowhere"), confirm=False)


async def test_unacked_deliveries_come_back_when_the_consumer_goes(memory_url: str) -> None:
    bus = MemoryBus(memory_url)
    await bus.declare_queue(QueueSpec("q"))
    await bus.publish(Message(b"1", routing_key="q"))
    got: list[Delivery] = []
    await bus.consume("q", got.append, prefetch=10)
    await wait_until(lambda: got)
    assert not got[0].redelivered
    await bus.close()
    other = MemoryBus(memory_url)
    again: list[Delivery] = []
    await other.consume("q", again.append, prefetch=10)
    await wait_until(lambda: again)
    assert again[0].redelivered and again[0].body == b"1"
    await again[0].ack()
    assert await other.queue_length("q") == 0


async def test_reject_dead_letters_and_the_delivery_limit_applies(memory_url: str) -> None:
    bus = MemoryBus(memory_url)
    await bus.declare_exchange("dlx", "topic")
    await bus.declare_queue(QueueSpec("dead"))
    await bus.bind("dead", "dlx", "#")
    await bus.declare_queue(
        QueueSpec("work", quorum=True, dead_letter_exchange="dlx", delivery_limit=2)
    )
    await bus.publish(Message(b"poison", routing_key="work"))
    await bus.publish(Message(b"bad", routing_key="work"))
    got: list[Delivery] = []
    await bus.consume("work", got.append, prefetch=1)
    await wait_until(lambda: got)
    await got[0].reject(requeue=False)  # rejected: dead-lettered at once
    for _ in range(3):  # requeued until past the limit
        await wait_until(lambda: len(got) >= 2)
        await got[-1].reject(requeue=True)
        got_count = len(got)
        await asyncio.sleep(0)
        if got_count == len(got):
            break
    dead = await bus.get("dead")
    assert dead is not None and dead.headers["x-death"][0]["reason"] == "rejected"
    await dead.ack()
    dead2 = await wait_until(lambda: bus.get("dead"))
    assert dead2.headers["x-death"][0]["reason"] == "delivery_limit"
    assert dead2.body == b"bad"


async def test_redeclaring_a_queue_with_other_arguments_fails(memory_url: str) -> None:
    bus = MemoryBus(memory_url)
    await bus.declare_queue(QueueSpec("q", quorum=True))
    await bus.declare_queue(QueueSpec("q", quorum=True))
    with pytest.raises(Exception, match="PRECONDITION_FAILED"):
        await bus.declare_queue(QueueSpec("q"))
