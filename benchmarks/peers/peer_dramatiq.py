"""Dramatiq peer: a 4-message pipeline on the RabbitMQ broker (pika), default middleware,
worker at the CLI defaults (processes = CPU count, 8 threads each). ``HMS_BENCH_CONFIRMS=1`` sets
``confirm_delivery=True`` (publisher confirms) for the driver and the worker alike. Dramatiq always
publishes persistent messages (delivery_mode=2).

Worker: ``dramatiq peer_dramatiq``.
"""

from __future__ import annotations

import os

import dramatiq
from common import (
    AMQP_URL_ENV,
    STEPS,
    Payload,
    apply_step,
    confirms_enabled,
    signal_done,
)
from dramatiq.brokers.rabbitmq import RabbitmqBroker

broker = RabbitmqBroker(url=os.environ[AMQP_URL_ENV], confirm_delivery=confirms_enabled())
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name=STEPS[0])
def validate_app(payload: Payload) -> Payload:
    return apply_step(payload, STEPS[0])


@dramatiq.actor(actor_name=STEPS[1])
def credit_check(payload: Payload) -> Payload:
    return apply_step(payload, STEPS[1])


@dramatiq.actor(actor_name=STEPS[2])
def schedule_inspection(payload: Payload) -> Payload:
    return apply_step(payload, STEPS[2])


@dramatiq.actor(actor_name=STEPS[3])
def finalize(payload: Payload) -> None:
    signal_done(apply_step(payload, STEPS[3]))


class Client:
    """Starts workflows from the driver."""

    async def open(self) -> None:
        pass

    async def start(self, payload: Payload) -> None:
        dramatiq.pipeline(
            [
                validate_app.message(payload),
                credit_check.message(),
                schedule_inspection.message(),
                finalize.message(),
            ]
        ).run()

    async def close(self) -> None:
        broker.close()
