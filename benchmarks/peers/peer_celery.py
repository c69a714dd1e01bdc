"""Celery peer: a 4-link chain, ``acks_late=True``, prefork at the default concurrency (CPU
count), no result backend, no publisher confirms and persistent messages (both Celery defaults).

Worker: ``celery -A peer_celery worker --loglevel=WARNING``.
"""

from __future__ import annotations

import os

from celery import Celery, chain
from common import AMQP_URL_ENV, STEPS, Payload, apply_step, signal_done

app = Celery("peer_celery", broker=os.environ[AMQP_URL_ENV])
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    result_backend=None,
    broker_connection_retry_on_startup=True,
)


@app.task(name=STEPS[0])
def validate_app(payload: Payload) -> Payload:
    return apply_step(payload, STEPS[0])


@app.task(name=STEPS[1])
def credit_check(payload: Payload) -> Payload:
    return apply_step(payload, STEPS[1])


@app.task(name=STEPS[2])
def schedule_inspection(payload: Payload) -> Payload:
    return apply_step(payload, STEPS[2])


@app.task(name=STEPS[3])
def finalize(payload: Payload) -> None:
    signal_done(apply_step(payload, STEPS[3]))


class Client:
    """Starts workflows from the driver."""

    async def open(self) -> None:
        pass

    async def start(self, payload: Payload) -> None:
        chain(
            validate_app.s(payload),
            credit_check.s(),
            schedule_inspection.s(),
            finalize.s(),
        ).apply_async()

    async def close(self) -> None:
        pass
