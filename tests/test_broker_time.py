"""Time and waiting on the real RabbitMQ: delays, timers across restarts, cron, signals."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

import hms_mgmt
from tests.conftest import Processes, wait_until

pytestmark = pytest.mark.broker

LATE_BOUND = 0.5  # seconds a timer may fire after it is due, on this 2-core machine


async def test_a_delayed_start_runs_no_earlier_than_due(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    asked = time.time()
    started = await client.start("grantApproval", {"a": 1}, delay=1.5)
    state = await client.status(started.workflow_id)
    assert state.status == "scheduled"
    assert state.current_step == "validateApp"
    assert state.scheduled_at is not None and state.scheduled_at >= asked + 1.5
    assert state.steps[0].status == "scheduled" and state.steps[0].due_at == state.scheduled_at
    done = await client.wait(started.workflow_id, timeout=30)
    assert done.status == "succeeded"
    first = done.steps[0]
    assert first.started_at is not None and first.due_at is not None
    late = first.started_at - first.due_at
    print(f"\ndelayed start ran {late * 1000:.1f} ms after it was due")
    assert 0 <= late < LATE_BOUND


async def test_a_delayed_step_runs_no_earlier_than_due(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    started = await client.start("later", {"delay": 1.0})
    done = await client.wait(started.workflow_id, timeout=30)
    assert done.status == "succeeded"
    first, second = done.steps
    assert second.due_at is not None and first.finished_at is not None
    assert second.due_at >= first.finished_at + 0.99
    assert second.started_at is not None
    late = second.started_at - second.due_at
    print(f"\ndelayed step ran {late * 1000:.1f} ms after it was due")
    assert 0 <= late < LATE_BOUND


async def test_a_timer_due_while_the_engine_is_down_fires_once_after_restart(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str
) -> None:
    engine = processes.engine(vhost, store_url)
    processes.worker(vhost, "tests.services:grant")
    started = await client.start("grantApproval", {"a": 1}, delay=1.0)
    due = (await client.status(started.workflow_id)).scheduled_at
    assert due is not None
    engine.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(engine.wait, 10) == 0
    await wait_until(lambda: time.time() > due + 1.0, timeout=10, what="the timer to come due")
    processes.engine(vhost, store_url)
    done = await client.wait(started.workflow_id, timeout=30)
    assert done.status == "succeeded"
    assert [s.step for s in done.steps] == [
        "validateApp",
        "creditCheck",
        "scheduleInspection",
        "finalize",
    ]
    assert done.steps[0].started_at is not None and done.steps[0].started_at > due + 1.0


async def test_a_cron_schedule_fires_once_per_tick_across_a_restart(
    client: hms_mgmt.Management, processes: Processes, vhost: str, store_url: str
) -> None:
    engine = processes.engine(vhost, store_url)
    processes.worker(vhost, "tests.services:grant")
    yearly = "0 0 1 1 *"  # far off, so no tick can fire between the two calls
    schedule = await client.schedule("grantApproval", cron=yearly, schedule_id="yearly")
    again = await client.schedule("grantApproval", cron=yearly, schedule_id="yearly")
    assert again["next_at"] == schedule["next_at"]  # scheduling again changes nothing
    await client.unschedule("yearly")
    every_two_seconds = "* * * * * */2"
    schedule = await client.schedule(
        "grantApproval", cron=every_two_seconds, payload={"from": "cron"}, schedule_id="every2s"
    )
    assert schedule["next_at"] > time.time() - 0.1

    def ticks() -> list[tuple[str, float]]:
        return [
            (workflow_id, json.loads(detail)["tick"])
            for workflow_id, detail in processes_query(
                store_url, "SELECT workflow_id, detail FROM history WHERE kind = 'scheduled_start'"
            )
        ]

    await wait_until(lambda: len(ticks()) >= 2, timeout=15, what="two ticks")
    engine.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(engine.wait, 10) == 0
    stopped = time.time()
    await wait_until(lambda: time.time() > stopped + 4.5, timeout=10, what="ticks to be missed")
    processes.engine(vhost, store_url)
    await wait_until(
        lambda: any(t > stopped + 4.5 for _, t in ticks()), timeout=15, what="ticks after restart"
    )
    fired = ticks()
    assert len({t for _, t in fired}) == len(fired), f"a tick fired twice: {fired}"
    assert len({w for w, _ in fired}) == len(fired)
    missed = [t for _, t in fired if stopped < t < stopped + 4.0]
    assert len(missed) <= 1, "catch_up=latest starts only the latest missed tick"
    assert all(t % 2 == 0 for _, t in fired)
    await client.unschedule("every2s")
    with pytest.raises(hms_mgmt.ScheduleNotFoundError):
        await client.unschedule("every2s")
    workflow_id = fired[0][0]
    assert (await client.wait(workflow_id, timeout=30)).output["from"] == "cron"


def processes_query(store_url: str, sql: str) -> list[tuple[str, str]]:
    import sqlite3

    path = store_url.removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return list(db.execute(sql))


async def test_signal_after_the_wait_resumes_the_workflow(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    started = await client.start("inspection", {"site": "12 Elm St"})

    async def waiting() -> hms_mgmt.WorkflowState | None:
        state = await client.status(started.workflow_id)
        return state if state.status == "waiting" else None

    state = await wait_until(waiting, timeout=20, what="the workflow to wait")
    assert state.waiting_for is not None and state.waiting_for["event"] == "inspectionReport"
    await client.signal(started.workflow_id, "inspectionReport", {"passed": True})
    done = await client.wait(started.workflow_id, timeout=20)
    assert done.status == "succeeded"
    assert done.output == {"site": "12 Elm St", "report": {"passed": True}}


async def test_a_signal_before_the_wait_is_kept(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    started = await client.start("inspection", {"site": "3 Oak Ave", "sleep": 1.0})
    await client.signal(started.workflow_id, "inspectionReport", {"passed": False})
    state = await client.status(started.workflow_id)
    assert state.status in ("pending", "running")  # the first step is still running
    done = await client.wait(started.workflow_id, timeout=20)
    assert done.status == "succeeded"
    assert done.output["report"] == {"passed": False}


async def test_a_wait_that_times_out_fails_the_workflow(
    client: hms_mgmt.Management, daemons: Processes
) -> None:
    started = await client.start("inspection", {"site": "9 Pine Rd", "timeout": 1.0})
    done = await client.wait(started.workflow_id, timeout=20)
    assert done.status == "failed"
    assert done.error is not None and done.error["type"] == "WaitTimeout"
    assert "inspectionReport" in done.error["message"]
    with pytest.raises(hms_mgmt.InvalidStateError, match="already failed"):
        await client.signal(started.workflow_id, "inspectionReport", {})
    with pytest.raises(hms_mgmt.WorkflowNotFoundError):
        await client.signal("no-such-workflow", "inspectionReport", {})


async def test_idempotent_start(client: hms_mgmt.Management, daemons: Processes) -> None:
    first = await client.start("grantApproval", {"a": 1}, idempotency_key="application-A-17")
    second = await client.start("grantApproval", {"a": 2}, idempotency_key="application-A-17")
    assert second.workflow_id == first.workflow_id
    assert not first.existing and second.existing
    other = await client.start("grantApproval", {"a": 3}, idempotency_key="application-A-18")
    assert other.workflow_id != first.workflow_id
    assert (await client.wait(first.workflow_id, timeout=20)).input == {"a": 1}
