"""Several broker nodes in one ``HMS_BROKER_URL`` (issue 13): the list is parsed and checked,
passwords never show, a process connects to the first node that answers and moves on to the
next when its connection dies, and nodes that all fail are named in one error."""

from __future__ import annotations

import pytest

import hms_mgmt
from bus_adapters.base import Message, QueueMismatchError, QueueSpec, redact_url, vhost_of
from bus_adapters.nodes import FailoverConnection, connect_plain, split_urls, with_query
from bus_adapters.rabbitmq import RabbitMQBus, connect_error
from hms_mgmt.topology import ENGINE_QUEUES, declare_core, declare_step, dlq_name
from tests.conftest import free_port, rabbitmqctl, wait_until

A = "amqp://hms:s3cret@mq1:5672/grants"
B = "amqp://hms:s3cret@mq2:5673/grants"


def test_a_list_of_urls_is_split_in_order_and_checked() -> None:
    assert split_urls(f" {A} , {B},") == [A, B]
    assert split_urls(A) == [A]
    with pytest.raises(ValueError, match="no broker URL"):
        split_urls(" , ")
    with pytest.raises(ValueError, match="is not amqp://") as bad:
        split_urls(f"{A},http://hms:s3cret@mq2/grants")
    assert "s3cret" not in str(bad.value)
    with pytest.raises(ValueError, match="repeat a node"):
        split_urls(f"{A},{A}")
    with pytest.raises(ValueError, match="different vhosts") as vhosts:
        split_urls(f"{A},amqp://hms:s3cret@mq2:5672/other")
    assert "s3cret" not in str(vhosts.value)
    with pytest.raises(ValueError, match="different users"):
        split_urls(f"{A},amqp://root:s3cret@mq2:5672/grants")


def test_passwords_are_masked_in_every_url_of_a_list() -> None:
    shown = redact_url(f"{A},{B}")
    assert shown == "amqp://hms:***@mq1:5672/grants,amqp://hms:***@mq2:5673/grants"
    assert vhost_of(f"{A},{B}") == "grants"
    bus = RabbitMQBus(f"{A},{B}")
    assert bus.cluster and bus.nodes == 2 and bus.user == "hms"
    assert not RabbitMQBus(A).cluster


def test_a_parameter_goes_into_each_url_unless_it_sets_its_own() -> None:
    assert with_query(f"{A},{B}?heartbeat=7", "heartbeat=3") == (f"{A}?heartbeat=3,{B}?heartbeat=7")
    assert with_query(f"{A}?name=x", "heartbeat=3") == f"{A}?name=x&heartbeat=3"


async def test_nodes_that_all_fail_are_each_named_without_their_passwords() -> None:
    urls = [f"amqp://guest:s3cret@127.0.0.1:{free_port()}/" for _ in range(3)]
    client = hms_mgmt.init(service_name="nodes", broker_url=",".join(urls))
    with pytest.raises(hms_mgmt.BrokerUnavailableError) as caught:
        await client.status("0" * 32)
    await client.close()
    message = str(caught.value)
    assert "no broker node of 3 answered" in message and "s3cret" not in message
    for url in urls:
        assert f"cannot connect to {redact_url(url)}" in message
    assert not caught.value.refused


@pytest.mark.broker
async def test_a_dead_first_node_is_skipped(vhost: str) -> None:
    dead = vhost.replace(":5672/", f":{free_port()}/", 1)
    bus = RabbitMQBus(f"{dead},{vhost}")
    await bus.connect()
    try:
        await bus.declare_queue(QueueSpec("nodes.probe"))
        await bus.publish(Message(body=b"{}", routing_key="nodes.probe"))  # confirmed
        assert await wait_until(lambda: bus.queue_length("nodes.probe"), what="the message") == 1
    finally:
        await bus.close()


def _connection_pids(vhost: str, name: str) -> list[str]:
    listed = rabbitmqctl("list_connections", "pid", "vhost", "client_properties", "-q")
    return [
        line.split("\t", 1)[0]
        for line in listed.splitlines()
        if f"\t{vhost}\t" in line and name in line
    ]


@pytest.mark.broker
async def test_a_dropped_connection_reconnects_to_the_next_node(vhost: str) -> None:
    """The same broker under two names stands for two nodes: when the connection to the
    first is closed by the broker, the robust connection comes back on the second, and its
    consumer with it."""
    name = vhost.rsplit("/", 1)[1].split("?")[0]
    other = vhost.replace("127.0.0.1", "localhost", 1)
    bus = RabbitMQBus(f"{vhost},{other}", name="nodes-failover")
    await bus.connect()
    try:
        await bus.declare_queue(QueueSpec("nodes.work"))
        got: list[bytes] = []
        await bus.consume("nodes.work", lambda d: got.append(d.body), prefetch=10)
        consume = bus._consume_connection
        assert isinstance(consume, FailoverConnection) and consume.url.host == "127.0.0.1"
        pids = await wait_until(lambda: _connection_pids(name, f"{bus.name}:consume"))
        rabbitmqctl("close_connection", pids[0], "test: node gone")
        await wait_until(
            lambda: consume.url.host == "localhost" and bus.connected,
            timeout=30,
            what="a reconnect to the second node",
        )
        await bus.publish(Message(body=b'{"n": 1}', routing_key="nodes.work"))
        await wait_until(lambda: got, timeout=15, what="the consumer restored")
        assert got == [b'{"n": 1}'] and bus.reconnects >= 1
    finally:
        await bus.close()


def _queue_types(vhost: str) -> dict[str, str]:
    name = vhost.rsplit("/", 1)[1].split("?")[0]
    listed = rabbitmqctl("list_queues", "-p", name, "name", "type", "-q")
    return dict(line.split("\t")[:2] for line in listed.splitlines() if "\t" in line)


@pytest.mark.broker
async def test_on_several_nodes_the_engine_queues_are_quorum_queues(vhost: str) -> None:
    """A URL naming several nodes makes every queue a workflow depends on a quorum queue: the
    engine's, their ``.dlq`` and the steps' ``.dlq``. A process given one node of it still
    works (it only publishes there); an engine given one node refuses, and says why."""
    cluster = f"{vhost},{vhost.replace('127.0.0.1', 'localhost', 1)}"
    engine = RabbitMQBus(cluster)
    await engine.connect()
    try:
        await declare_core(engine, engine=True)
        await declare_step(engine, "grant", "check")
    finally:
        await engine.close()
    types = _queue_types(vhost)
    for queue in (*ENGINE_QUEUES, *(dlq_name(q) for q in ENGINE_QUEUES)):
        assert types[queue] == "quorum", queue
    assert types["grant.check.dlq"] == types["grant.check"] == "quorum"
    assert types["hms.engine.record"] == "quorum"

    one = RabbitMQBus(vhost)
    await one.connect()
    try:
        await declare_core(one)  # a client or a step service: the engine's word stands
        await declare_step(one, "grant", "check", engine=False)
        with pytest.raises(QueueMismatchError, match="must be classic"):
            await declare_core(one, engine=True)
    finally:
        await one.close()
    assert _queue_types(vhost)["hms.engine.commands"] == "quorum"


@pytest.mark.broker
async def test_a_plain_connection_starts_at_the_node_it_is_told(vhost: str) -> None:
    """The engine's lock connection goes first to the node its other connections are on."""
    both = f"{vhost},{vhost.replace('127.0.0.1', 'localhost', 1)}"
    for start, host in ((0, "127.0.0.1"), (1, "localhost"), (2, "127.0.0.1")):
        connection = await connect_plain(
            both, name="nodes-plain", explain=connect_error, start=start
        )
        try:
            assert connection.url.host == host
        finally:
            await connection.close()
