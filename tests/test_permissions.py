"""Least-privilege broker users, as the README sets them up, on the real RabbitMQ.

Three users per vhost: the engine's (everything), the step services' (their step queues,
outcomes, definitions) and the clients' (requests and their replies). The broker stops what
a user's permissions do not allow; the engine stops what the broker cannot tell apart
(a step service's user may write requests, to define its workflows, but not start or
cancel one), on RabbitMQ's validated ``user_id``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import hms_mgmt
from bus_adapters.base import AccessRefusedError, BusError, Message, QueueSpec
from bus_adapters.rabbitmq import RabbitMQBus
from hms_mgmt.topology import COMMANDS_EXCHANGE, COMMANDS_QUEUE, RESULTS_EXCHANGE, RESULTS_QUEUE
from hms_mgmt.wire.codec import batch_body, dumps
from tests.conftest import Processes, rabbitmqctl, wait_until
from tests.services import grant

pytestmark = pytest.mark.broker

# The permissions the README gives, for a vhost whose workflows' queues are <workflow>.<step>.
SERVICE_QUEUES = r"(?!hms\.)[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+(\.dlq)?"
PERMISSIONS = {
    "engine": (".*", ".*", ".*"),
    "service": (
        rf"^({SERVICE_QUEUES}|hms\.reply\..*)$",
        rf"^({SERVICE_QUEUES}|hms\.commands|hms\.results|hms\.dlx|hms\.reply\..*)$",
        rf"^({SERVICE_QUEUES}|hms\.steps|hms\.dead|hms\.reply\..*)$",
    ),
    "client": (r"^hms\.reply\..*$", r"^(hms\.commands|hms\.reply\..*)$", r"^hms\.reply\..*$"),
}


@dataclass
class Users:
    engine: str
    service: str
    client: str
    names: dict[str, str]


@pytest.fixture
def users(vhost: str) -> Iterator[Users]:
    name = vhost.rsplit("/", 1)[1].split("?")[0]
    suffix = uuid.uuid4().hex[:6]
    names = {role: f"hms-{role}-{suffix}" for role in PERMISSIONS}
    urls = {}
    for role, user in names.items():
        rabbitmqctl("add_user", user, "pw")
        rabbitmqctl("set_permissions", "-p", name, user, *PERMISSIONS[role])
        urls[role] = f"amqp://{user}:pw@127.0.0.1:5672/{name}?name={role}"
    try:
        yield Users(urls["engine"], urls["service"], urls["client"], names)
    finally:
        for user in names.values():
            rabbitmqctl("delete_user", user)


async def test_each_user_may_do_its_part_and_nothing_more(
    processes: Processes, users: Users, store_url: str
) -> None:
    processes.engine(
        users.engine,
        store_url,
        HMS_CLIENT_USERS=users.names["client"],
        HMS_SERVICE_USERS=users.names["service"],
    )
    processes.worker(users.service, "tests.services:grant")
    client = hms_mgmt.init(service_name="clerk", broker_url=users.client, request_timeout=20)
    client.definitions.update(grant.definitions)
    async with client:

        async def defined() -> bool:
            try:
                await client.start("grantApproval", {"application_id": "P-1"})
            except hms_mgmt.UnknownWorkflowError:
                return False
            return True

        await wait_until(defined, timeout=30, interval=0.5, what="the service's definitions")
        started = await client.start("grantApproval", {"application_id": "P-2"})
        state = await client.wait(started.workflow_id, timeout=30)
        assert state.status == "succeeded"

        # A step service's user may define workflows, not start or cancel them: the broker
        # lets it write requests, the engine refuses them on its validated user_id.
        service = hms_mgmt.init(service_name="svc", broker_url=users.service, request_timeout=10)
        async with service:
            with pytest.raises(hms_mgmt.HmsError, match="may not send 'start'"):
                await service.start("grantApproval", {"application_id": "P-3"})
            parked = await client.start("grantApproval", {"application_id": "P-4"}, delay=600)
            with pytest.raises(hms_mgmt.HmsError, match="may not send 'cancel'"):
                await service.cancel(parked.workflow_id)
        assert (await client.status(parked.workflow_id)).status == "scheduled"

    # What the broker itself refuses.
    as_client = RabbitMQBus(users.client, name="client-probe")
    await as_client.connect()
    try:
        outcome = Message(
            batch_body("outcomes", [dumps({"workflow_id": "x", "seq": 1, "kind": "started"})]),
            exchange=RESULTS_EXCHANGE,
            routing_key=RESULTS_QUEUE,
        )
        with pytest.raises(BusError, match="ACCESS_REFUSED"):
            await as_client.publish(outcome)  # a client cannot report outcomes
    finally:
        await as_client.close()
    as_client = RabbitMQBus(users.client, name="client-probe-2")
    await as_client.connect()
    try:
        with pytest.raises(BusError, match="ACCESS_REFUSED"):
            await as_client.consume("grantApproval.creditCheck", lambda d: None, 1)
    finally:
        await as_client.close()
    as_service = RabbitMQBus(users.service, name="service-probe")
    await as_service.connect()
    try:
        impersonation = Message(
            batch_body(
                "requests",
                [dumps({"type": "cancel", "request_id": "r1", "workflow_id": parked.workflow_id})],
            ),
            exchange=COMMANDS_EXCHANGE,
            routing_key=COMMANDS_QUEUE,
            user_id=users.names["client"],  # pretending to be the clerk
        )
        with pytest.raises(BusError, match=r"PRECONDITION_FAILED|user_id"):
            await as_service.publish(impersonation)
        with pytest.raises((AccessRefusedError, BusError)):
            await as_service.declare_queue(QueueSpec("hms.mine"))  # nor make engine queues
    finally:
        await as_service.close()
