"""taskiq peer: taskiq-aio-pika broker at its defaults (quorum queue, persistent messages, publisher
confirms awaited per publish, qos 10), worker at the CLI defaults (2 processes). taskiq has no chain
primitive, so each step kicks the next one itself; no result backend.

Worker: ``taskiq worker peer_taskiq:broker --log-level WARNING``.
"""

from __future__ import annotations

import os

from common import AMQP_URL_ENV, STEPS, Payload, apply_step, signal_done_async
from taskiq_aio_pika import AioPikaBroker

broker = AioPikaBroker(url=os.environ[AMQP_URL_ENV])


@broker.task(task_name=STEPS[0])
async def validate_app(payload: Payload) -> None:
    await credit_check.kiq(apply_step(payload, STEPS[0]))


@broker.task(task_name=STEPS[1])
async def credit_check(payload: Payload) -> None:
    await schedule_inspection.kiq(apply_step(payload, STEPS[1]))


@broker.task(task_name=STEPS[2])
async def schedule_inspection(payload: Payload) -> None:
    await finalize.kiq(apply_step(payload, STEPS[2]))


@broker.task(task_name=STEPS[3])
async def finalize(payload: Payload) -> None:
    await signal_done_async(apply_step(payload, STEPS[3]))


class Client:
    """Starts workflows from the driver (one publish, awaited until confirmed, per workflow)."""

    async def open(self) -> None:
        await broker.startup()

    async def start(self, payload: Payload) -> None:
        await validate_app.kiq(payload)

    async def close(self) -> None:
        await broker.shutdown()
