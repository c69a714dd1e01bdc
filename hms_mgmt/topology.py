"""The broker topology, declared idempotently by the engine and by workers alike.

Every process declares a queue with the same arguments (RabbitMQ refuses a
re-declaration with different ones), so they all come from here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from bus_adapters.base import AccessRefusedError, Bus, BusError, QueueMismatchError, QueueSpec
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.logs import get_logger

STEPS_EXCHANGE = "hms.steps"
DLX_EXCHANGE = "hms.dlx"  # what the broker dead-letters
DEAD_EXCHANGE = "hms.dead"  # what the engine gives up on
COMMANDS_EXCHANGE = "hms.commands"  # clients' requests (direct): its own exchange, so that
RESULTS_EXCHANGE = "hms.results"  # ... broker permissions can say who may write which
COMMANDS_QUEUE = "hms.engine.commands"
RESULTS_QUEUE = "hms.engine.results"
DEADLETTERS_QUEUE = "hms.engine.deadletters"
ENGINE_LOCK_QUEUE = "hms.engine.lock"  # exclusive: held by the one engine serving the vhost
ENGINE_RECORD_QUEUE = "hms.engine.record"  # the serving engine's record: host, pid, store


log = get_logger("topology")

DELIVERY_LIMIT = 5
"""Deliveries of one step message before it is dead-lettered (a crash loop): by the broker on
a quorum step queue, by the poison guard (the worker asks the engine) on a classic one."""

STEP_QUEUE_TYPES = ("classic", "quorum")
DEFAULT_STEP_QUEUE_TYPE: str | None = None
"""``HMS_STEP_QUEUE_TYPE``, unset: classic on one node, where it delivers sooner (no Raft
write before the delivery); quorum on a cluster (a broker URL naming several nodes), where
a step queue must outlive its node. Both dead-letter a message delivered more than
:data:`DELIVERY_LIMIT` times."""

ENGINE_QUEUES = (COMMANDS_QUEUE, RESULTS_QUEUE, DEADLETTERS_QUEUE)


def check_step_queue_type(queue_type: str | None) -> str | None:
    if queue_type is not None and queue_type not in STEP_QUEUE_TYPES:
        raise ValueError(
            f"HMS_STEP_QUEUE_TYPE must be one of {', '.join(STEP_QUEUE_TYPES)}, not {queue_type!r}"
        )
    return queue_type


def step_queue_type(bus: Bus, configured: str | None) -> str:
    """The step queue type to declare: the configured one, else quorum on a cluster and
    classic on one node."""
    return configured or ("quorum" if bus.cluster else "classic")


def step_queue(workflow: str, step: str, queue_type: str = "classic") -> QueueSpec:
    """A quorum step queue limits deliveries itself; a classic one has the poison guard."""
    quorum = check_step_queue_type(queue_type) == "quorum"
    return QueueSpec(
        f"{workflow}.{step}",
        quorum=quorum,
        dead_letter_exchange=DLX_EXCHANGE,
        delivery_limit=DELIVERY_LIMIT if quorum else None,
    )


def dlq_name(queue: str) -> str:
    return f"{queue}.dlq"


def plain_queue(name: str, bus: Bus, *, max_length: int | None = None) -> QueueSpec:
    """The engine's queues and every ``.dlq``: classic on one node; on a cluster (a broker
    URL naming several nodes) quorum queues, replicated, so that no node's death loses one."""
    return QueueSpec(name, quorum=bus.cluster, max_length=max_length)


async def declare_core(bus: Bus, *, engine: bool = False) -> None:
    """The exchanges and the engine's queues, each with its ``.dlq``.

    Step services and clients declare them too, so that none depends on the engine
    having started first; where a least-privilege broker user may not, they leave it
    to the engine (see "Broker users and permissions" in the README).
    """
    steps: list[Callable[[], Awaitable[None]]] = [
        partial(bus.declare_exchange, STEPS_EXCHANGE, "topic"),
        partial(bus.declare_exchange, DLX_EXCHANGE, "topic"),
        partial(bus.declare_exchange, DEAD_EXCHANGE, "topic"),
        partial(bus.declare_exchange, COMMANDS_EXCHANGE, "direct"),
        partial(bus.declare_exchange, RESULTS_EXCHANGE, "direct"),
    ]
    for name in ENGINE_QUEUES:
        steps += [
            partial(bus.declare_queue, plain_queue(name, bus)),
            partial(bus.declare_queue, plain_queue(dlq_name(name), bus)),
        ]
    steps += [
        partial(bus.bind, DEADLETTERS_QUEUE, DLX_EXCHANGE, "#"),
        partial(bus.bind, COMMANDS_QUEUE, COMMANDS_EXCHANGE, COMMANDS_QUEUE),
        partial(bus.bind, RESULTS_QUEUE, RESULTS_EXCHANGE, RESULTS_QUEUE),
    ]
    if engine:
        steps.append(
            partial(bus.declare_queue, plain_queue(ENGINE_RECORD_QUEUE, bus, max_length=1))
        )
    for step in steps:
        try:
            await step()
        except AccessRefusedError as exc:
            if engine:
                raise
            log.debug("not allowed to declare; the engine declares it", error=str(exc))
        except QueueMismatchError as exc:
            # Clients and step services only publish to these: what type the engine gave
            # them is the engine's business. The engine itself must not run on the wrong one.
            if engine:
                raise QueueMismatchError(_mismatch(bus, exc)) from exc
            log.debug("declared otherwise already; the engine's word stands", error=str(exc))


def _mismatch(bus: Bus, exc: QueueMismatchError) -> str:
    wanted = "quorum (the broker URL names several nodes)" if bus.cluster else "classic"
    return (
        f"{exc}. The engine's queues here must be {wanted}: an empty queue of the other type "
        f"can be deleted (rabbitmqctl delete_queue) and the engine declares it anew; one "
        f"holding messages needs them moved first (shovel)."
    )


async def declare_workflow(
    bus: Bus, definition: WorkflowDefinition, queue_type: str | None = DEFAULT_STEP_QUEUE_TYPE
) -> None:
    """Each step's queue, bound to ``hms.steps``, and its ``.dlq`` bound to ``hms.dead``."""
    for step in definition.all_steps:
        await declare_step(bus, definition.name, step.name, queue_type=queue_type)


async def declare_step(
    bus: Bus,
    workflow: str,
    step: str,
    *,
    engine: bool = True,
    queue_type: str | None = DEFAULT_STEP_QUEUE_TYPE,
) -> str:
    """A step's queue and its ``.dlq``, bound to their exchanges; the queue's type.

    A queue that already exists as the other type keeps it (RabbitMQ cannot change a
    queue's type; a vhost set up with quorum step queues goes on with them): the type
    returned is the one the queue has. A step service declares its queues too, so that it
    can consume before the engine has seen its definitions; the bindings it leaves to the
    engine when the exchanges are not there yet or its broker user may not bind (the engine
    binds them on ``define``).
    """
    queue_type = step_queue_type(bus, queue_type)
    spec = step_queue(workflow, step, queue_type)
    try:
        await bus.declare_queue(spec)
    except QueueMismatchError as exc:
        other = "quorum" if queue_type == "classic" else "classic"
        spec = step_queue(workflow, step, other)
        try:
            await bus.declare_queue(spec)
        except QueueMismatchError:
            raise exc from None  # neither type: another program's queue; say so
        log.info(
            "step queue kept as it is: RabbitMQ cannot change a queue's type",
            queue=spec.name,
            type=other,
            configured=queue_type,
        )
        queue_type = other
    try:
        await bus.declare_queue(plain_queue(dlq_name(spec.name), bus))
    except QueueMismatchError:
        if engine:
            raise
        log.debug("declared otherwise already; the engine's word stands", queue=spec.name)
    for queue, exchange in ((spec.name, STEPS_EXCHANGE), (dlq_name(spec.name), DEAD_EXCHANGE)):
        try:
            await bus.bind(queue, exchange, spec.name)
        except BusError as exc:
            if engine:
                raise
            log.debug("not binding; the engine binds it", queue=queue, error=str(exc))
    return queue_type
