"""The broker topology, declared idempotently by the engine and by workers alike.

Every process declares a queue with the same arguments (RabbitMQ refuses a
re-declaration with different ones), so they all come from here.
"""

from __future__ import annotations

from bus_adapters.base import Bus, QueueSpec
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.messages import (
    COMMANDS_QUEUE,
    DEAD_EXCHANGE,
    DEADLETTERS_QUEUE,
    DLX_EXCHANGE,
    RESULTS_QUEUE,
    STEPS_EXCHANGE,
)

DELIVERY_LIMIT = 5
"""Deliveries of one step message before the broker dead-letters it (a crash loop)."""

ENGINE_QUEUES = (COMMANDS_QUEUE, RESULTS_QUEUE, DEADLETTERS_QUEUE)


def step_queue(workflow: str, step: str) -> QueueSpec:
    return QueueSpec(
        f"{workflow}.{step}",
        quorum=True,
        dead_letter_exchange=DLX_EXCHANGE,
        delivery_limit=DELIVERY_LIMIT,
    )


def dlq_name(queue: str) -> str:
    return f"{queue}.dlq"


async def declare_core(bus: Bus) -> None:
    """The exchanges and the engine's queues, each with its ``.dlq``."""
    await bus.declare_exchange(STEPS_EXCHANGE, "topic")
    await bus.declare_exchange(DLX_EXCHANGE, "topic")
    await bus.declare_exchange(DEAD_EXCHANGE, "topic")
    for name in ENGINE_QUEUES:
        await bus.declare_queue(QueueSpec(name))
        await bus.declare_queue(QueueSpec(dlq_name(name)))
    await bus.bind(DEADLETTERS_QUEUE, DLX_EXCHANGE, "#")


async def declare_workflow(bus: Bus, definition: WorkflowDefinition) -> None:
    """Each step's quorum queue, bound to ``hms.steps``, and its ``.dlq`` bound to ``hms.dead``."""
    for step in definition.all_steps:
        await declare_step(bus, definition.name, step.name)


async def declare_step(bus: Bus, workflow: str, step: str) -> None:
    spec = step_queue(workflow, step)
    await bus.declare_queue(spec)
    await bus.bind(spec.name, STEPS_EXCHANGE, spec.name)
    await bus.declare_queue(QueueSpec(dlq_name(spec.name)))
    await bus.bind(dlq_name(spec.name), DEAD_EXCHANGE, spec.name)
