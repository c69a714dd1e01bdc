"""The engine daemon and a step service as separate processes, on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

import hms_mgmt
from bus_adapters.base import Message
from bus_adapters.rabbitmq import RabbitMQBus
from tests.conftest import Processes, wait_until
from tests.services import GRANT

pytestmark = pytest.mark.broker


async def run_grants(client: hms_mgmt.Management, count: int) -> list[hms_mgmt.WorkflowState]:
    started = await asyncio.gather(
        *(
            client.start("grantApproval", {"application_id": f"A-{n}", "pad": "x" * 150})
            for n in range(count)
        )
    )
    return list(await asyncio.gather(*(client.wait(s.workflow_id, timeout=60) for s in started)))


async def test_200_grants_through_the_daemon(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    await run_grants(client, 5)  # warm up: every process connected
    began = time.perf_counter()
    states = await run_grants(client, 200)
    took = time.perf_counter() - began
    print(f"\n200 grant workflows through the engine daemon: {took:.2f}s ({200 / took:.0f}/s)")
    assert len({s.workflow_id for s in states}) == 200
    for state in states:
        assert state.status == "succeeded", state.describe()
        assert [(s.step, s.attempt, s.status) for s in state.steps] == [
            (step, 1, "succeeded") for step in GRANT
        ]
        assert [s.seq for s in state.steps] == [1, 2, 3, 4]
        assert state.output is not None and state.output["finalize"] == 1
    assert "Traceback" not in daemons.log("engine")


async def test_state_survives_an_engine_restart(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str
) -> None:
    engine = processes.engine(vhost, store_url)
    processes.worker(vhost, "tests.services:grant")
    done = await run_grants(client, 3)
    began = time.monotonic()
    engine.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(engine.wait, 10) == 0
    assert time.monotonic() - began < 10
    assert "engine stopped" in processes.log("engine")
    # Started while the engine is down: the request waits for it.
    pending = asyncio.ensure_future(client.start("grantApproval", {"while": "down"}))
    await asyncio.sleep(0.5)
    assert not pending.done()
    processes.engine(vhost, store_url)
    started = await pending
    for state in done:
        again = await client.status(state.workflow_id)
        assert again.status == "succeeded" and [s.step for s in again.steps] == GRANT
    assert (await client.wait(started.workflow_id, timeout=30)).status == "succeeded"


async def test_errors_are_refused_where_they_happen(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    with pytest.raises(hms_mgmt.UnknownWorkflowError, match="'loanApproval' is not defined"):
        await client.start("loanApproval", {})
    with pytest.raises(
        hms_mgmt.WorkflowNotFoundError, match="no workflow with id 'does-not-exist'"
    ):
        await client.status("does-not-exist")
    with pytest.raises(hms_mgmt.PayloadError, match="not JSON-serialisable"):
        await client.start("grantApproval", {"at": time})
    started = await client.start("badNext", {"a": 1})
    state = await client.wait(started.workflow_id, timeout=30)
    assert state.status == "failed"
    error = state.steps[0].error or {}
    assert error["type"] == "ValueError"
    assert "next_step 'payOut'" in error["message"] and "jump_nowhere" in error["message"]
    assert len(state.steps) == 1


async def _dlq_length(bus: RabbitMQBus, queue: str) -> int:
    return await bus.queue_length(queue)


async def test_undecodable_messages_are_dead_lettered_while_the_engine_serves(
    client: hms_mgmt.Management, daemons: Processes, vhost: str
) -> None:
    await run_grants(client, 1)  # queues declared, everything up
    bus = RabbitMQBus(vhost, name="test-garbage")
    await bus.connect()
    try:
        garbage: list[tuple[str, str, bytes, str]] = [
            ("hms.steps", "grantApproval.creditCheck", b"\xff\xfe not utf-8", "application/json"),
            (
                "hms.steps",
                "grantApproval.finalize",
                b'{"steps": [{"workflow_id": "x"}]}',
                "application/json",
            ),
            ("", "hms.engine.results", b"{not json", "application/json"),
            ("", "hms.engine.commands", b'{"type": "start"}', "text/plain"),
        ]
        for exchange, key, body, content_type in garbage:
            await bus.publish(
                Message(body, exchange=exchange, routing_key=key, content_type=content_type)
            )
        for queue in (
            "grantApproval.creditCheck.dlq",
            "grantApproval.finalize.dlq",
            "hms.engine.results.dlq",
            "hms.engine.commands.dlq",
        ):
            await wait_until(
                lambda q=queue: _is_one(bus, q), timeout=20, what=f"one message in {queue}"
            )
        dead = await bus.get("grantApproval.finalize.dlq")
        assert dead is not None
        assert "field 'workflow' is missing" in dead.headers["x-hms-reason"]
        assert dead.headers["x-hms-queue"] == "grantApproval.finalize"
        await dead.reject(requeue=True)
        states = await run_grants(client, 3)
        assert all(s.status == "succeeded" for s in states)
    finally:
        await bus.close()
    assert daemons.children[0].poll() is None and daemons.children[1].poll() is None


async def _is_one(bus: RabbitMQBus, queue: str) -> Any:
    return await bus.queue_length(queue) == 1


async def test_sigterm_lets_a_running_handler_finish(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str
) -> None:
    processes.engine(vhost, store_url)
    worker = processes.worker(vhost, "tests.services:grant")
    started = await client.start("slow", {"seconds": 2.0})

    async def running() -> bool:
        state = await client.status(started.workflow_id)
        return state.steps[0].status == "running"

    await wait_until(running, timeout=20, what="the slow step reported running")
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 20) == 0
    state = await client.status(started.workflow_id)
    assert state.steps[0].status == "succeeded"  # finished and reported before exiting
    assert [s.step for s in state.steps] == ["nap", "after"]
    processes.worker(vhost, "tests.services:grant")
    assert (await client.wait(started.workflow_id, timeout=30)).status == "succeeded"


async def test_a_worker_runs_steps_concurrently_once_off_probation(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    await run_grants(client, 1)  # the step service has handled a message: probation is over
    began = time.monotonic()
    started = await asyncio.gather(*(client.start("slow", {"seconds": 1.0}) for _ in range(8)))
    states = await asyncio.gather(*(client.wait(s.workflow_id, timeout=30) for s in started))
    took = time.monotonic() - began
    assert all(s.status == "succeeded" for s in states)
    assert took < 4.0, f"eight 1-second steps took {took:.1f}s: they ran one at a time"
