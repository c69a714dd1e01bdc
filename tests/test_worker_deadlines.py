"""Step timeouts in the worker, in one process on the in-memory bus: a handler past its
deadline is cancelled (a thread abandoned), its attempt fails and its slot is freed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import hms_mgmt
from hms_mgmt import RetryPolicy, Step
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.steps import StepMessage
from tests.conftest import wait_until

TWICE = RetryPolicy(max_attempts=2, initial_delay=0.05, jitter=False)


@pytest.fixture
async def mgmt(memory_url: str, store_url: str) -> AsyncIterator[hms_mgmt.Management]:
    """One slot: a step that held it forever would stop every other step."""
    m = hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url, concurrency=1)
    outcomes: list[Outcome] = []

    def record(_message: StepMessage, outcome: Outcome) -> None:
        outcomes.append(outcome)

    m.on_outcome = record
    m.outcomes = outcomes  # type: ignore[attr-defined]
    async with m:
        yield m


def failures(m: hms_mgmt.Management) -> list[dict[str, Any]]:
    return [o.error or {} for o in m.outcomes if o.kind == "failed"]  # type: ignore[attr-defined]


async def test_a_hung_async_handler_is_cancelled_at_its_deadline(
    mgmt: hms_mgmt.Management,
) -> None:
    seen: list[str] = []
    mgmt.define_workflow("hung", [Step("hang", timeout=0.5, retry=TWICE)])

    @mgmt.on_step("hung.hang")
    async def hang(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
        return {"data": {"attempt": ctx.attempt}}

    await mgmt.serve()
    started = await mgmt.start("hung", {})
    state = await mgmt.wait(started.workflow_id, timeout=10)
    assert state.status == "succeeded" and state.output == {"attempt": 2}
    assert seen == ["cancelled"]
    [error] = failures(mgmt)
    assert error["type"] == "StepTimeout" and error["retryable"] is True
    assert error["message"] == (
        "step 'hang' attempt 1 did not finish within 0.5s: its handler was cancelled"
    )
    # where it hung, for whoever reads the step's error
    assert "The handler was here when its time ran out" in error["traceback"]
    assert "await asyncio.sleep(3600)" in error["traceback"]
    assert state.steps[0].error is not None and state.steps[0].error["type"] == "StepTimeout"


async def test_a_heartbeat_pushes_the_deadline_out(mgmt: hms_mgmt.Management) -> None:
    # A heartbeat travels worker -> broker -> engine: 0.7 s of slack for it on a loaded machine
    mgmt.define_workflow("beating", [Step("work", timeout=1.0, retry=TWICE)])

    @mgmt.on_step("beating.work")
    async def work(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
        for _ in range(5):  # 1.5 s in all, never 1.0 s without a heartbeat
            await asyncio.sleep(0.3)
            await ctx.heartbeat()
        return {"data": {"attempt": ctx.attempt}}

    await mgmt.serve()
    started = await mgmt.start("beating", {})
    state = await mgmt.wait(started.workflow_id, timeout=10)
    assert state.status == "succeeded" and state.output == {"attempt": 1}
    assert failures(mgmt) == []


async def test_a_handler_that_ignores_its_cancellation_is_left_running_and_frees_its_slot(
    mgmt: hms_mgmt.Management,
) -> None:
    mgmt.define_workflow("stubborn", [Step("refuse", timeout=0.3, retry=TWICE)])
    finished: list[int] = []

    @mgmt.on_step("stubborn.refuse")
    async def refuse(ctx: hms_mgmt.StepContext) -> None:
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(2.0)  # swallows it and carries on: bad manners
            finished.append(ctx.attempt)
        return None

    await mgmt.serve()
    started = await mgmt.start("stubborn", {})
    state = await mgmt.wait(started.workflow_id, timeout=10)
    assert state.status == "succeeded"
    assert [(s.attempt, s.status in ("failed", "timed_out")) for s in state.steps] == [
        (1, True),
        (2, False),
    ]
    assert [e["type"] for e in failures(mgmt)] == ["StepTimeout"]
    await wait_until(lambda: finished == [1], timeout=5, what="the left-over handler to end")


async def test_a_handlers_own_cancelled_error_is_not_a_timeout(mgmt: hms_mgmt.Management) -> None:
    mgmt.define_workflow("flaky", [Step("a", timeout=5, retry=TWICE)])

    @mgmt.on_step("flaky.a")
    async def a(ctx: hms_mgmt.StepContext) -> None:
        if ctx.attempt == 1:
            raise asyncio.CancelledError("a library gave up")
        return None

    await mgmt.serve()
    started = await mgmt.start("flaky", {})
    state = await mgmt.wait(started.workflow_id, timeout=10)
    assert state.status == "succeeded"
    [error] = failures(mgmt)
    assert error["type"] == "RuntimeError" and "a library gave up" in error["message"]


async def test_shutting_down_cancels_a_timed_step_without_reporting_a_timeout(
    mgmt: hms_mgmt.Management,
) -> None:
    mgmt.define_workflow("long", [Step("wait", timeout=30)])
    seen: list[str] = []

    @mgmt.on_step("long.wait")
    async def wait(ctx: hms_mgmt.StepContext) -> None:
        seen.append("started")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    await mgmt.serve()
    started = await mgmt.start("long", {})
    await wait_until(lambda: seen == ["started"], timeout=5)
    worker = mgmt._worker
    worker.shutdown_timeout = 0.2
    await worker.shutdown()
    assert seen == ["started", "cancelled"]
    assert mgmt.outcomes == []  # type: ignore[attr-defined]
    state = await mgmt.status(started.workflow_id)
    assert state.steps[0].status == "running"  # unacked: another worker gets it


async def test_a_hung_thread_handler_is_abandoned_and_its_slot_freed(
    mgmt: hms_mgmt.Management,
) -> None:
    release = threading.Event()
    mgmt.define_workflow("stuck", [Step("block", timeout=0.5, retry=TWICE)])

    @mgmt.on_step("stuck.block")
    def block(ctx: hms_mgmt.StepContext) -> dict[str, Any]:  # a plain function: a thread
        if ctx.attempt == 1:
            release.wait(30)
        return {"data": {"attempt": ctx.attempt, "thread": threading.current_thread().name}}

    try:
        await mgmt.serve()
        started = await mgmt.start("stuck", {})
        state = await mgmt.wait(started.workflow_id, timeout=10)
        assert state.status == "succeeded" and state.output["attempt"] == 2
        assert state.output["thread"].startswith("hms-handler")
        [error] = failures(mgmt)
        assert error["type"] == "StepTimeout"
        assert error["message"] == (
            "step 'block' attempt 1 did not finish within 0.5s; "
            "its thread cannot be stopped and runs on"
        )
        assert "release.wait(30)" in error["traceback"]
        assert (mgmt.abandoned_threads, mgmt.threads_running_past_timeout) == (1, 1)
    finally:
        release.set()
    await wait_until(lambda: mgmt.threads_running_past_timeout == 0, timeout=5)
    assert mgmt.abandoned_threads == 1


async def test_thread_handlers_run_as_many_at_once_as_the_concurrency(
    memory_url: str, store_url: str
) -> None:
    # asyncio's default executor has min(32, CPUs + 4) threads: 6 on two cores.
    many = 12
    barrier = threading.Barrier(many, timeout=10)
    async with hms_mgmt.init(
        service_name="t", broker_url=memory_url, store_url=store_url, concurrency=many
    ) as m:
        m.define_workflow("together", ["meet"])

        @m.on_step("together.meet")
        def meet(ctx: hms_mgmt.StepContext) -> None:
            if ctx.payload.get("meet"):
                barrier.wait()  # BrokenBarrierError unless all of them run at once

        await m.serve()
        warm = await m.start("together", {})  # ends the worker's one-at-a-time probation
        assert (await m.wait(warm.workflow_id, timeout=10)).status == "succeeded"
        ids = [(await m.start("together", {"meet": True})).workflow_id for _ in range(many)]
        states = [await m.wait(i, timeout=20) for i in ids]
    assert [s.status for s in states] == ["succeeded"] * many


async def test_the_deadline_counts_from_the_start_not_from_the_delivery(
    mgmt: hms_mgmt.Management,
) -> None:
    # Two steps queued behind one slot: the second's clock starts when it starts.
    mgmt.define_workflow("queued", [Step("nap", timeout=0.6, retry=TWICE)])

    @mgmt.on_step("queued.nap")
    async def nap(ctx: hms_mgmt.StepContext) -> None:
        await asyncio.sleep(0.4)

    await mgmt.serve()
    begun = time.monotonic()
    ids = [(await mgmt.start("queued", {})).workflow_id for _ in range(2)]
    states = [await mgmt.wait(i, timeout=10) for i in ids]
    assert [s.status for s in states] == ["succeeded", "succeeded"]
    assert failures(mgmt) == []
    assert time.monotonic() - begun >= 0.8  # one after the other


async def test_a_copy_of_a_step_message_that_is_running_here_is_not_run_again(
    memory_url: str, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine sends again what it had not marked sent when it crashed (at least once):
    a copy that comes while its run is running in this step service waits for that run and
    is settled with it, without taking a slot; the handler runs once."""
    mgmt = hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url)
    async with mgmt:
        await _copied(mgmt, monkeypatch)


async def _copied(mgmt: hms_mgmt.Management, monkeypatch: pytest.MonkeyPatch) -> None:
    from bus_adapters.base import Message
    from bus_adapters.memory import MemoryBus

    sent = MemoryBus.publish

    async def twice(self: MemoryBus, message: Message, *, confirm: bool = True) -> None:
        await sent(self, message, confirm=confirm)
        if message.routing_key == "copied.work":  # as a restarted engine's outbox would
            await sent(self, message, confirm=confirm)

    monkeypatch.setattr(MemoryBus, "publish", twice)
    runs: list[int] = []
    mgmt.define_workflow("copied", ["work"])
    mgmt.define_workflow("plain", ["warm"])

    @mgmt.on_step("copied.work")
    async def work(ctx: hms_mgmt.StepContext) -> None:
        runs.append(ctx.attempt)
        worker = mgmt._worker  # until the copy has come in, so that it comes while this runs
        await wait_until(lambda: worker.stats["copies"] >= 1, timeout=10, what="the copy")

    @mgmt.on_step("plain.warm")
    async def warm(ctx: hms_mgmt.StepContext) -> None:
        return None

    await mgmt.serve()
    warmed = await mgmt.start("plain", {})  # off probation: more than one delivery at once
    assert (await mgmt.wait(warmed.workflow_id, timeout=10)).status == "succeeded"
    started = await mgmt.start("copied", {})
    state = await mgmt.wait(started.workflow_id, timeout=10)
    assert state.status == "succeeded" and len(state.steps) == 1
    assert runs == [1]
    assert mgmt._worker.stats["copies"] == 1


async def test_a_copy_of_a_step_message_run_and_reported_here_is_acked_not_run(
    memory_url: str, store_url: str
) -> None:
    """A copy that comes after its run was reported (the engine restarted and sent it
    again, while the run went on without it) is acked and not run: beside the runs a
    concurrency limit admits next, it would be one more at once."""
    from bus_adapters.base import Message
    from bus_adapters.memory import MemoryBus

    mgmt = hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url)
    runs: list[int] = []
    mgmt.define_workflow("again", ["work"])

    @mgmt.on_step("again.work")
    async def work(ctx: hms_mgmt.StepContext) -> None:
        runs.append(ctx.attempt)

    async with mgmt:
        bus = MemoryBus(memory_url)
        sent: list[Message] = []
        publish = bus.broker.enqueue

        def keep(queue: str, stored: Any) -> None:
            if queue == "again.work":
                sent.append(stored.message)
            publish(queue, stored)

        bus.broker.enqueue = keep  # type: ignore[method-assign]
        await mgmt.serve()
        started = await mgmt.start("again", {})
        assert (await mgmt.wait(started.workflow_id, timeout=10)).status == "succeeded"
        [message] = sent
        await bus.publish(message)  # the copy, as a restarted engine's outbox sends it
        await wait_until(
            lambda: mgmt._worker.stats["copies"] == 1, timeout=10, what="the copy settled"
        )
        assert runs == [1]
        assert await bus.queue_length("again.work") == 0
