"""A publish the broker nacks: the RabbitMQ adapter confirms the next one on a fresh channel.

On a cluster, a channel whose first publish to a quorum queue fell in that queue's leader
election (a node killed) went on nacking every publish to the queue, while a new channel on
the same node was acked (tests/cluster, the node-kill case). Here a queue full under
``x-overflow: reject-publish`` nacks on demand, on the machine's broker.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import pytest

from bus_adapters.base import Message, PublishNotConfirmedError
from bus_adapters.rabbitmq import RabbitMQBus
from tests.conftest import wait_until

pytestmark = pytest.mark.broker

QUEUE = "nacks.full"


async def _declare_full_at_one(url: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(
            QUEUE, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
    finally:
        await connection.close()


def _renewals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "broker.channel_renewed"]


async def test_a_nacked_publish_is_retried_on_a_fresh_confirming_channel(
    vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nacks renew the confirming channel once (however many publishes were nacked
    together), the old channel is closed once settled, and the next publish is confirmed on
    the new one."""
    caplog.set_level(logging.INFO, logger="bus_adapters.rabbitmq")
    await _declare_full_at_one(vhost)
    bus = RabbitMQBus(vhost, name="nacks")
    await bus.connect()
    try:
        await bus.publish(Message(body=b'{"n": 1}', routing_key=QUEUE))  # the queue is full
        first = bus._confirmed
        assert first is not None

        nacked = await asyncio.gather(
            *(bus.publish(Message(body=b'{"n": 2}', routing_key=QUEUE)) for _ in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(e, PublishNotConfirmedError) for e in nacked), nacked
        assert bus._confirmed is not None and bus._confirmed is not first
        renewed = _renewals(caplog)
        assert len(renewed) == 1, renewed
        assert renewed[0].__dict__["routing_key"] == QUEUE
        await wait_until(lambda: first.is_closed, timeout=10, what="the nacking channel closed")

        delivery = await bus.get(QUEUE)  # room for one again
        assert delivery is not None
        await delivery.ack()
        second = bus._confirmed
        await bus.publish(Message(body=b'{"n": 3}', routing_key=QUEUE))
        assert bus._confirmed is second and len(_renewals(caplog)) == 1
    finally:
        await bus.close()
