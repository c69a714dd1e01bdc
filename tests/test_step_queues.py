"""Step queue types (HMS_STEP_QUEUE_TYPE) and the poison guard of classic step queues.

A quorum step queue limits deliveries itself (``x-delivery-limit``); a classic one has the
poison guard: a step service asks the engine before it runs a redelivered message, and the
engine, counting deliveries in its store, has it dead-lettered past the limit. Either way a
message that kills its worker on every delivery ends as a failed attempt
(``DeliveryLimitExceeded``) and, attempts exhausted, in its step's ``.dlq`` with a reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import hms_mgmt
from bus_adapters.base import Message, vhost_of
from bus_adapters.memory import MemoryBus
from bus_adapters.rabbitmq import RabbitMQBus
from hms_mgmt.engine.engine import Engine
from hms_mgmt.settings import Settings
from hms_mgmt.store.sqlite import SQLiteStore
from hms_mgmt.topology import (
    DELIVERY_LIMIT,
    declare_core,
    declare_step,
    step_queue,
    step_queue_type,
)
from tests.conftest import ROOT, Processes, rabbitmqctl, wait_until

CRASHING = "crashing.swallow"


def queue_types(vhost: str) -> dict[str, str]:
    out = rabbitmqctl("list_queues", "-p", vhost_of(vhost), "--no-table-headers", "name", "type")
    return dict(line.split("\t") for line in out.strip().splitlines() if "\t" in line)


# -- the setting ----------------------------------------------------------------------------


def test_the_step_queue_type_is_a_setting_checked_with_a_clear_error() -> None:
    assert Settings.from_env({}).step_queue_type is None  # by the broker URL: see below
    assert Settings.from_env({"HMS_STEP_QUEUE_TYPE": "Quorum"}).step_queue_type == "quorum"
    with pytest.raises(ValueError, match="HMS_STEP_QUEUE_TYPE must be classic or quorum"):
        Settings.from_env({"HMS_STEP_QUEUE_TYPE": "lazy"})
    with pytest.raises(ValueError, match="HMS_STEP_QUEUE_TYPE must be one of classic, quorum"):
        step_queue("w", "s", "stream")
    classic, quorum = step_queue("w", "s", "classic"), step_queue("w", "s", "quorum")
    assert not classic.quorum and classic.delivery_limit is None
    assert classic.dead_letter_exchange == quorum.dead_letter_exchange == "hms.dlx"
    assert quorum.quorum and quorum.delivery_limit == DELIVERY_LIMIT


def test_unset_the_step_queues_are_quorum_on_a_cluster_and_classic_on_one_node() -> None:
    one = RabbitMQBus("amqp://guest:guest@127.0.0.1:5672/x")
    three = RabbitMQBus("amqp://guest:guest@a:5672/x,amqp://guest:guest@b:5672/x")
    assert (one.cluster, three.cluster) == (False, True)
    assert step_queue_type(one, None) == "classic" and step_queue_type(three, None) == "quorum"
    assert step_queue_type(three, "classic") == "classic"  # set: as said
    assert step_queue_type(one, "quorum") == "quorum"


async def test_a_daemon_refuses_an_unknown_step_queue_type() -> None:
    for module in ("hms_mgmt.engine", "hms_mgmt.worker"):
        args = ["-m", module] + (["tests.services:crasher"] if module.endswith("worker") else [])
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            env={**os.environ, "HMS_STEP_QUEUE_TYPE": "lazy"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        _, err = await asyncio.wait_for(child.communicate(), timeout=60)
        assert child.returncode == 2, err
        assert b"HMS_STEP_QUEUE_TYPE must be classic or quorum" in err, err


# -- an existing queue keeps its type ----------------------------------------------------------


async def test_an_existing_queue_keeps_its_type_on_the_memory_bus(memory_url: str) -> None:
    bus = MemoryBus(memory_url)
    await declare_core(bus)
    assert await declare_step(bus, "w", "s", queue_type="quorum") == "quorum"
    assert await declare_step(bus, "w", "s", queue_type="classic") == "quorum"
    assert await declare_step(bus, "w", "t", queue_type="classic") == "classic"
    assert await declare_step(bus, "w", "t", queue_type="quorum") == "classic"


@pytest.mark.broker
async def test_a_vhost_with_quorum_step_queues_keeps_them(
    vhost: str, processes: Processes, store_url: str
) -> None:
    """A vhost set up before classic step queues were the default goes on as it was."""
    bus = RabbitMQBus(vhost, name="test-old-topology")
    await bus.connect()
    try:
        await declare_core(bus)
        for step in ("validateApp", "creditCheck", "scheduleInspection", "finalize"):
            assert await declare_step(bus, "grantApproval", step, queue_type="quorum") == "quorum"
        # Declared again as classic: RabbitMQ says PRECONDITION_FAILED, and the queue is kept.
        assert await declare_step(bus, "grantApproval", "creditCheck") == "quorum"
        assert await declare_step(bus, "fresh", "one") == "classic"
    finally:
        await bus.close()
    processes.engine(vhost, store_url, HMS_STEP_QUEUE_TYPE="classic")
    processes.worker(vhost, "tests.services:grant", HMS_STEP_QUEUE_TYPE="classic")
    from tests.services import grant

    mgmt = hms_mgmt.init(service_name="test-client", broker_url=vhost, request_timeout=20)
    mgmt.definitions.update(grant.definitions)
    async with mgmt:
        state = await mgmt.execute("grantApproval", {"n": 1}, timeout=30)
    assert state.status == "succeeded", state.describe()
    types = queue_types(vhost)
    assert types["grantApproval.creditCheck"] == "quorum"
    assert types["badNext.first"] == "classic"  # declared now: the configured type
    assert "step queue kept as it is" in processes.log("worker") + processes.log("engine")


# -- the poison guard, on the engine alone ------------------------------------------------------


async def test_the_engine_counts_redeliveries_and_says_dead_letter_past_the_limit(
    memory_url: str, tmp_path: Path
) -> None:
    engine = Engine(MemoryBus(memory_url), SQLiteStore(f"sqlite:///{tmp_path / 'hms.db'}"))
    running = asyncio.get_running_loop().create_task(engine.run())
    try:
        await wait_until(lambda: engine.ready.is_set(), timeout=10, what="the engine")
        bus = MemoryBus(memory_url)
        mgmt = hms_mgmt.init(service_name="c", broker_url=memory_url, request_timeout=5)
        mgmt.define_workflow("crashing", ["swallow"], retry=hms_mgmt.RetryPolicy(max_attempts=1))
        async with mgmt:
            started = await mgmt.start("crashing", {"poison": True})
            delivery = await wait_until(lambda: bus.get(CRASHING), timeout=5, what="the step")
            await delivery.ack()
            step: dict[str, Any] = json.loads(delivery.body)["steps"][0]
            run = {k: step[k] for k in ("workflow_id", "seq", "attempt", "token")}

            async def ask(delivery_id: str) -> dict[str, Any]:
                answer: dict[str, Any] = await mgmt.request(
                    "redelivered", {**run, "delivery": delivery_id}
                )
                return answer

            verdicts = [await ask(f"d{n}") for n in range(2, DELIVERY_LIMIT + 1)]
            assert [v["verdict"] for v in verdicts] == ["run"] * (DELIVERY_LIMIT - 1)
            assert [v["deliveries"] for v in verdicts] == list(range(2, DELIVERY_LIMIT + 1))
            assert (await ask(f"d{DELIVERY_LIMIT}"))["deliveries"] == DELIVERY_LIMIT  # once
            over = await ask("last")
            assert over["verdict"] == "dead_letter" and over["deliveries"] == DELIVERY_LIMIT + 1
            assert "poison guard" in over["reason"]
            state = await mgmt.wait(started.workflow_id, timeout=10)
            assert state.status == "failed"
            [only] = state.steps
            assert only.error is not None and only.error["type"] == "DeliveryLimitExceeded"
            assert "poison guard" in only.error["message"]
            # Asked again (the worker crashed before its reject): still dead-letter, applied once.
            again = await ask("after")
            assert again["verdict"] == "dead_letter"
            assert len((await mgmt.status(started.workflow_id)).steps) == 1
            with pytest.raises(hms_mgmt.HmsError, match="token does not match"):
                await mgmt.request("redelivered", {**run, "token": "0" * 32, "delivery": "x"})
            # A run whose outcome is in need not run again.
            done = await mgmt.start("crashing", {"poison": False})
            delivery = await wait_until(lambda: bus.get(CRASHING), timeout=5, what="the step")
            step = json.loads(delivery.body)["steps"][0]
            await bus.publish(
                Message(
                    body=json.dumps(
                        {
                            "outcomes": [
                                {
                                    **{k: step[k] for k in ("workflow_id", "seq", "attempt")},
                                    "token": step["token"],
                                    "step": "swallow",
                                    "kind": "succeeded",
                                    "result": {"data": {}},
                                }
                            ]
                        }
                    ).encode(),
                    exchange="hms.results",
                    routing_key="hms.engine.results",
                )
            )
            await delivery.ack()
            assert (await mgmt.wait(done.workflow_id, timeout=10)).status == "succeeded"
            late = await mgmt.request(
                "redelivered",
                {
                    **{k: step[k] for k in ("workflow_id", "seq", "attempt", "token")},
                    "delivery": "late",
                },
            )
            assert late["verdict"] == "skip"
    finally:
        engine.stop()
        await asyncio.wait_for(running, timeout=15)


# -- a handler that kills its worker on every delivery ----------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_message_that_kills_its_worker_every_time_is_dead_lettered(
    vhost: str, processes: Processes, store_url: str, queue_type: str
) -> None:
    processes.engine(vhost, store_url, HMS_STEP_QUEUE_TYPE=queue_type)
    worker = processes.worker(vhost, "tests.services:crasher", HMS_STEP_QUEUE_TYPE=queue_type)
    from tests.services import crasher

    mgmt = hms_mgmt.init(service_name="test-client", broker_url=vhost, request_timeout=20)
    mgmt.definitions.update(crasher.definitions)
    async with mgmt:
        fine = await mgmt.execute("crashing", {"poison": False}, timeout=30)
        assert fine.status == "succeeded", fine.describe()
        assert queue_types(vhost)[CRASHING] == queue_type
        poisoned = await mgmt.start("crashing", {"poison": True})
        crashes = 0
        deadline = time.monotonic() + 120
        while True:
            state = await mgmt.status(poisoned.workflow_id)
            if state.status == "failed":
                break
            assert time.monotonic() < deadline, f"{crashes} crashes, still {state.status}"
            if worker.poll() is not None:  # it crashed on the message: start another
                crashes += 1
                worker = processes.worker(
                    vhost, "tests.services:crasher", HMS_STEP_QUEUE_TYPE=queue_type
                )
            await asyncio.sleep(0.1)
        [run] = state.steps
        assert run.error is not None and run.error["type"] == "DeliveryLimitExceeded", run.error
        assert crashes >= DELIVERY_LIMIT - 1  # ran (and crashed) on the deliveries allowed
        dlq = f"{CRASHING}.dlq"
        bus = RabbitMQBus(vhost, name="test-dlq-read")
        await bus.connect()
        try:
            dead = await wait_until(lambda: bus.get(dlq), timeout=10, what="the DLQ message")
            assert dead.headers["hms-workflow-id"] == poisoned.workflow_id
            assert dead.headers["x-hms-reason"] == "attempts exhausted"
            assert dead.headers["x-hms-error-type"] == "DeliveryLimitExceeded"
            await dead.ack()
        finally:
            await bus.close()
        if queue_type == "classic":  # the guard dead-lettered it: the last delivery ran nothing
            await wait_until(
                lambda: "dead-lettered by the poison guard" in processes.log("worker"),
                timeout=10,
                what="the guard's log line",
            )
            assert worker.poll() is None
        # A step service serves on (on a quorum queue the last crash left none: start one).
        if worker.poll() is not None:
            worker = processes.worker(
                vhost, "tests.services:crasher", HMS_STEP_QUEUE_TYPE=queue_type
            )
        after = await mgmt.execute("crashing", {"poison": False}, timeout=60)
        assert after.status == "succeeded", after.describe()
