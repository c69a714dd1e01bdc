"""The whole flow on the in-memory bus: engine, step service and client in one process."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

import hms_mgmt
from bus_adapters.base import Message
from bus_adapters.memory import MemoryBus
from hms_mgmt.bounds import MAX_DELAY
from hms_mgmt.client import Client
from tests.conftest import wait_until

GRANT = ["validateApp", "creditCheck", "scheduleInspection", "finalize"]


@pytest.fixture
async def mgmt(memory_url: str, store_url: str) -> AsyncIterator[hms_mgmt.Management]:
    m = hms_mgmt.init(service_name="test", broker_url=memory_url, store_url=store_url)
    m.define_workflow("grantApproval", GRANT)
    calls: list[str] = []

    for step in GRANT:

        async def handler(ctx: hms_mgmt.StepContext, step: str = step) -> dict[str, Any]:
            calls.append(f"{ctx.step}:{ctx.attempt}:{ctx.idempotency_key}")
            return {"data": {**ctx.payload, step: True}}

        m.on_step(f"grantApproval.{step}", handler)
    m.calls = calls  # type: ignore[attr-defined]
    async with m:
        yield m


async def test_a_grant_succeeds_with_four_step_runs_in_order(mgmt: hms_mgmt.Management) -> None:
    await mgmt.serve()
    started = await mgmt.start("grantApproval", {"application_id": "A-17"})
    assert isinstance(started.workflow_id, str)
    state = await mgmt.wait(started.workflow_id, timeout=10)
    assert state.status == "succeeded"
    assert [s.step for s in state.steps] == GRANT
    assert all(s.status == "succeeded" and s.attempt == 1 for s in state.steps)
    assert state.output == {"application_id": "A-17", **dict.fromkeys(GRANT, True)}
    assert state.steps[1].input == {"application_id": "A-17", "validateApp": True}
    assert mgmt.calls[0] == f"validateApp:1:{started.workflow_id}:validateApp:1"  # type: ignore[attr-defined]
    again = await mgmt.status(started.workflow_id)
    assert again == state


async def test_start_returns_before_any_step_runs(mgmt: hms_mgmt.Management) -> None:
    started = await mgmt.start("grantApproval", {"n": 1})
    state = await mgmt.status(started.workflow_id)
    assert state.status == "pending"
    assert [(s.step, s.status) for s in state.steps] == [("validateApp", "pending")]
    with pytest.raises(TimeoutError):
        await mgmt.wait(started.workflow_id, timeout=0.3)


async def test_unknown_workflow_is_refused_naming_it(mgmt: hms_mgmt.Management) -> None:
    with pytest.raises(hms_mgmt.UnknownWorkflowError, match="'loanApproval' is not defined"):
        await mgmt.start("loanApproval", {})


async def test_unknown_workflow_id_is_a_clear_error(mgmt: hms_mgmt.Management) -> None:
    with pytest.raises(hms_mgmt.WorkflowNotFoundError, match="no workflow with id 'nope'"):
        await mgmt.status("nope")
    with pytest.raises(hms_mgmt.WorkflowNotFoundError):
        await mgmt.wait("nope", timeout=5)


async def test_a_payload_that_is_not_json_is_refused_before_sending(
    mgmt: hms_mgmt.Management, memory_url: str
) -> None:
    with pytest.raises(hms_mgmt.PayloadError, match="not JSON-serialisable"):
        await mgmt.start("grantApproval", {"when": object()})
    # Refused before anything is sent, or even connected:
    queues = MemoryBus(memory_url).statistics()
    assert queues.get("hms.engine.commands", {"ready": 0})["ready"] == 0


async def test_a_next_step_outside_the_workflow_fails_the_step(
    memory_url: str, store_url: str
) -> None:
    async with hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url) as m:
        m.define_workflow("grantApproval", GRANT)

        @m.on_step("grantApproval.validateApp")
        async def validate(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
            return {"next_step": "payOut", "data": ctx.payload}

        await m.serve()
        started = await m.start("grantApproval", {"a": 1})
        state = await m.wait(started.workflow_id, timeout=10)
    assert state.status == "failed"
    assert len(state.steps) == 1 and state.steps[0].status == "failed"
    error = state.steps[0].error or {}
    assert "'payOut'" in error["message"] and "validate" in error["message"]
    assert state.error is not None and state.error["reason"] == "not retryable"


async def test_start_with_the_same_request_twice_makes_one_workflow(
    mgmt: hms_mgmt.Management,
) -> None:
    client = await mgmt._connect()
    fields = {"workflow_id": "fixed-id-1", "workflow": "grantApproval", "payload": {}}
    first = await client.request("start", fields, request_id="fixed-id-1")
    second = await client.request("start", fields, request_id="fixed-id-1")
    assert first == {"workflow_id": "fixed-id-1", "existing": False}
    assert second == {"workflow_id": "fixed-id-1", "existing": True}
    state = await mgmt.status("fixed-id-1")
    assert len(state.steps) == 1


async def test_undecodable_messages_are_dead_lettered_and_the_engine_keeps_serving(
    mgmt: hms_mgmt.Management, memory_url: str
) -> None:
    await mgmt.serve()
    bus = MemoryBus(memory_url)
    await bus.publish(Message(b"\xff not json", routing_key="hms.engine.results"))
    await bus.publish(Message(b"{}", routing_key="hms.engine.commands", content_type="text/plain"))
    await bus.publish(
        Message(b"[1]", exchange="hms.steps", routing_key="grantApproval.creditCheck")
    )
    stats = bus.statistics
    await wait_until(lambda: stats()["hms.engine.results.dlq"]["ready"] == 1, what="results dlq")
    await wait_until(lambda: stats()["hms.engine.commands.dlq"]["ready"] == 1, what="commands dlq")
    await wait_until(
        lambda: stats()["grantApproval.creditCheck.dlq"]["ready"] == 1, what="step dlq"
    )
    dead = await bus.get("grantApproval.creditCheck.dlq")
    assert dead is not None and "not an object" in dead.headers["x-hms-reason"]
    started = await mgmt.start("grantApproval", {"still": "serving"})
    assert (await mgmt.wait(started.workflow_id, timeout=10)).status == "succeeded"


async def test_a_request_the_engine_cannot_read_is_answered_at_once(
    mgmt: hms_mgmt.Management,
) -> None:
    client = await mgmt._connect()
    with pytest.raises(hms_mgmt.InvalidMessageError, match="unknown request type 'explode'"):
        await client.request("explode", {}, timeout=5)


async def test_one_bad_event_never_holds_up_the_others(
    mgmt: hms_mgmt.Management, memory_url: str
) -> None:
    await mgmt.serve()
    client = await mgmt._connect()
    bus = MemoryBus(memory_url)
    poison = b'{"workflow_id": "w", "seq": 1, "kind": "succeeded", "result": {"data": 1, "delay": "soon"}}'
    await bus.publish(Message(b'{"outcomes": [' + poison + b"]}", routing_key="hms.engine.results"))
    with pytest.raises(hms_mgmt.DefinitionError, match="malformed definition"):
        await client.request("define", {"definition": {"name": "x", "steps": ["a"]}}, timeout=5)
    with pytest.raises(hms_mgmt.DefinitionError, match="no next tick"):
        await mgmt.schedule("grantApproval", cron="0 0 30 2 *")
    with pytest.raises(hms_mgmt.InvalidMessageError, match="not a workflow status"):
        await client.request("list", {"status": {"a": 1}}, timeout=5)
    started = await mgmt.start("grantApproval", {"still": "serving"})
    assert (await mgmt.wait(started.workflow_id, timeout=10)).status == "succeeded"
    await wait_until(
        lambda: bus.statistics()["hms.engine.results.dlq"]["ready"] == 1, what="poison in dlq"
    )


async def test_a_refused_start_stays_refused_when_asked_again(mgmt: hms_mgmt.Management) -> None:
    client = await mgmt._connect()
    fields = {"workflow_id": "early-1", "workflow": "notYetDefined", "payload": {}}
    with pytest.raises(hms_mgmt.UnknownWorkflowError):
        await client.request("start", fields, request_id="early-1")
    mgmt.define_workflow("notYetDefined", ["a"])
    await mgmt.schedules()  # a round trip: the definition, sent before it, is in
    with pytest.raises(hms_mgmt.UnknownWorkflowError):
        await client.request("start", fields, request_id="early-1")
    other = await mgmt.start("notYetDefined", {})
    assert other.workflow_id != "early-1"


async def test_status_of_a_workflow_larger_than_a_message(memory_url: str, store_url: str) -> None:
    async with hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url) as m:
        m.define_workflow("big", ["a", "b", "c"])
        for step in ("a", "b", "c"):

            async def handler(ctx: hms_mgmt.StepContext, step: str = step) -> dict[str, Any]:
                return {"data": {step: "x" * 400_000}}

            m.on_step(f"big.{step}", handler)
        await m.serve()
        started = await m.start("big", {})
        state = await m.wait(started.workflow_id, timeout=10)
    assert state.status == "succeeded"
    assert len(state.steps[2].input["b"]) == 400_000  # a reply of about 2.4 MB arrived whole


async def test_a_handler_whose_own_code_is_cancelled_fails_its_attempt(
    memory_url: str, store_url: str
) -> None:
    import asyncio

    async with hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url) as m:
        m.define_workflow(
            "flaky", ["a"], retry=hms_mgmt.RetryPolicy(initial_delay=0.05, jitter=False)
        )

        @m.on_step("flaky.a")
        async def a(ctx: hms_mgmt.StepContext) -> None:
            if ctx.attempt == 1:
                raise asyncio.CancelledError("a library gave up")
            return None

        await m.serve()
        started = await m.start("flaky", {})
        state = await m.wait(started.workflow_id, timeout=10)
    assert state.status == "succeeded"
    assert [(s.attempt, s.status) for s in state.steps] == [(1, "failed"), (2, "succeeded")]


# -- bad input is refused where it first can be ------------------------------------------------


async def test_the_client_refuses_bad_times_ids_and_keys_before_sending(memory_url: str) -> None:
    bus = MemoryBus(memory_url)
    client = Client(bus)
    calls = [
        (client.start("w", {}, delay=math.inf), "delay must be seconds from 0 to 315360000"),
        (client.start("w", {}, delay=math.nan), "not nan"),
        (client.start("w", {}, delay=1e308), r"not 1e\+308"),
        (client.start("w", {}, run_at=math.nan), "run_at must be a Unix timestamp"),
        (client.start("w", {}, run_at=time.time() + MAX_DELAY + 3600), "10 years from now"),
        (client.start("w", {}, run_at=datetime(9999, 1, 1, tzinfo=UTC)), "253370764800"),
        (client.start("w", {}, idempotency_key="a\nb"), r"'a\\nb' must be 1-200 printable"),
        (client.start("w", {}, idempotency_key="x" * 201), "1-200 printable"),
        (client.status("line\nbreak\x1b[31m"), r"'line\\nbreak\\x1b\[31m' is not a valid id"),
        (client.wait("../../etc/passwd", timeout=1), "'../../etc/passwd' is not a valid id"),
        (client.cancel("a b"), "not a valid id"),
        (client.retry(""), "not a valid id"),
        (client.signal("ok\n", "go"), "not a valid id"),
        (client.schedule("w", cron="* * * * *", schedule_id="-w"), "cannot name workflows"),
    ]
    for call, message in calls:
        with pytest.raises(hms_mgmt.PayloadError, match=message):
            await asyncio.wait_for(call, 2)
    assert bus.statistics().get("hms.engine.commands", {}).get("ready", 0) == 0
    with pytest.raises(hms_mgmt.EngineUnavailableError):  # a good request does go out
        await client.start("w", {}, delay=MAX_DELAY, timeout=0.2)
    assert bus.statistics()["hms.engine.commands"]["ready"] == 1
    await client.close()


async def test_the_engine_refuses_raw_requests_with_bad_times_ids_and_keys(
    mgmt: hms_mgmt.Management, memory_url: str
) -> None:
    client = await mgmt._connect()
    start = {"workflow_id": "wf-raw", "workflow": "grantApproval", "payload": {}}
    for fields, message in (
        ({**start, "delay": 1e308}, "field 'delay' must be seconds .* not 1e\\+308"),
        ({**start, "delay": MAX_DELAY + 1}, f"not {MAX_DELAY + 1}"),
        ({**start, "run_at": -5}, "field 'run_at' must be a Unix timestamp .* not -5"),
        ({**start, "run_at": 1e300}, "not 1e\\+300"),
        ({**start, "idempotency_key": "k\x1b"}, "'idempotency_key' 'k\\\\x1b' must be 1-200"),
        ({**start, "workflow_id": "line\nbreak\x1b[31m"}, "is not a valid id: ids are"),
        ({**start, "workflow_id": "../../etc/passwd"}, "'../../etc/passwd' is not a valid id"),
        ({"workflow_id": "a/b"}, "'a/b' is not a valid id"),
    ):
        kind = "start" if "workflow" in fields else "status"
        with pytest.raises(hms_mgmt.InvalidMessageError, match=message):
            await client.request(kind, fields, timeout=5)
    assert await client.list() == []  # nothing was stored

    bus = MemoryBus(memory_url)
    wide = (
        b'{"requests": [{"type": "start", "request_id": "r1", "workflow_id": "wf-wide",'
        b' "workflow": "grantApproval", "payload": {"n": 18446744073709551616}}]}'
    )
    await bus.publish(Message(wide, routing_key="hms.engine.commands"))
    outcome = b'{"outcomes": [{"workflow_id": "../x", "seq": 1, "kind": "heartbeat"}]}'
    await bus.publish(Message(outcome, routing_key="hms.engine.results"))
    stats = bus.statistics
    # the refused requests above are dead-lettered too, besides being answered
    await wait_until(lambda: stats()["hms.engine.commands.dlq"]["ready"] == 9, what="commands dlq")
    await wait_until(lambda: stats()["hms.engine.results.dlq"]["ready"] == 1, what="results dlq")
    reasons = []
    while (dead := await bus.get("hms.engine.commands.dlq")) is not None:
        reasons.append(dead.headers["x-hms-reason"])
    [wide_reason] = [r for r in reasons if "18446744073709551616" in r]
    assert "outside 64 bits" in wide_reason
    dead = await bus.get("hms.engine.results.dlq")
    assert dead is not None and "'../x' is not a valid id" in dead.headers["x-hms-reason"]
    assert await client.list() == []


async def test_a_handler_asking_for_an_unbounded_delay_fails_its_step_clearly(
    memory_url: str, store_url: str
) -> None:
    async with hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url) as m:
        m.define_workflow("later", ["a", "b"], retry=hms_mgmt.RetryPolicy(max_attempts=1))
        m.define_workflow("again", ["a"], retry=hms_mgmt.RetryPolicy(max_attempts=1))
        ran_b: list[str] = []

        @m.on_step("later.a")
        async def later_a(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
            return {"data": 1, "delay": float(ctx.payload["delay"])}

        @m.on_step("later.b")
        async def later_b(ctx: hms_mgmt.StepContext) -> None:
            ran_b.append(ctx.workflow_id)

        @m.on_step("again.a")
        async def again_a(ctx: hms_mgmt.StepContext) -> None:
            raise hms_mgmt.Retry("later, please", delay=math.inf)

        await m.serve()
        for delay in ("inf", "nan", "1e308"):  # as text: JSON has no inf or nan
            started = await m.start("later", {"delay": delay})
            state = await m.wait(started.workflow_id, timeout=10)
            assert state.status == "failed" and len(state.steps) == 1
            error = state.steps[0].error or {}
            assert "later_a" in error["message"] and f"delay {float(delay)!r}" in error["message"]
            assert state.error is not None and state.error["reason"] == "not retryable"
        started = await m.start("again", {})
        state = await m.wait(started.workflow_id, timeout=10)
        assert state.status == "failed"
        error = state.steps[0].error or {}
        assert error["type"] == "ValueError" and "Retry delay must be seconds" in error["message"]
        assert ran_b == []


async def test_datetimes_in_a_start_payload_are_refused_naming_the_field(
    mgmt: hms_mgmt.Management, memory_url: str
) -> None:
    when = datetime(2026, 5, 1, 9, 30)  # naive: orjson would have sent "2026-05-01T09:30:00"
    for value, kind in ((when, "datetime"), (when.date(), "date"), (when.time(), "time")):
        with pytest.raises(hms_mgmt.PayloadError) as caught:
            await mgmt.start("grantApproval", {"applicant": {"dates": [1, value]}})
        message = str(caught.value)
        assert f"payload['applicant']['dates'][1] is a {kind}" in message
        assert ".isoformat()" in message
    queues = MemoryBus(memory_url).statistics()
    assert queues.get("hms.engine.commands", {"ready": 0})["ready"] == 0


async def test_a_handler_returning_a_datetime_fails_its_step_naming_the_field(
    memory_url: str, store_url: str
) -> None:
    async with hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url) as m:
        m.define_workflow("book", ["visit"])

        @m.on_step("book.visit")
        async def visit(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
            return {"data": {"booked_for": datetime(2026, 5, 1, 9, 30)}}

        await m.serve()
        started = await m.start("book", {})
        state = await m.wait(started.workflow_id, timeout=10)
    assert state.status == "failed" and len(state.steps) == 1
    error = state.steps[0].error or {}
    assert error["type"] == "PayloadError"
    assert "result['data']['booked_for'] is a datetime" in error["message"]
    assert ".isoformat()" in error["message"] and "visit" in error["message"]
    assert state.error is not None and state.error["reason"] == "not retryable"


# -- business keys (attributes) ------------------------------------------------------------


async def test_business_keys_from_the_start_and_a_handler_are_searchable(
    memory_url: str, store_url: str
) -> None:
    async with hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url) as m:
        m.define_workflow("grantApproval", ["validateApp", "finalize"])

        @m.on_step("grantApproval.validateApp")
        async def validate(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
            return {"data": ctx.payload, "attributes": {"region": ctx.payload["region"]}}

        @m.on_step("grantApproval.finalize")
        async def finalize(ctx: hms_mgmt.StepContext) -> hms_mgmt.StepResult:
            return hms_mgmt.StepResult.complete(ctx.payload, attributes={"outcome": "approved"})

        # before any step runs: a search right after the start finds the workflow
        first = await m.start(
            "grantApproval", {"region": "north"}, attributes={"application_id": "A-17"}
        )
        found = await m.list(attributes={"application_id": "A-17"})
        assert [w["workflow_id"] for w in found] == [first.workflow_id]
        assert found[0]["attributes"] == {"application_id": "A-17"}
        await m.serve()
        others = [
            await m.start("grantApproval", {"region": r}, attributes={"application_id": a})
            for a, r in (("A-18", "north"), ("A-19", "south"))
        ]
        for started in (first, *others):
            assert (await m.wait(started.workflow_id, timeout=10)).status == "succeeded"
        state = await m.status(first.workflow_id)
        assert state.attributes == {
            "application_id": "A-17",
            "region": "north",
            "outcome": "approved",
        }
        found = await m.list(attributes={"application_id": "A-17"})
        assert [w["workflow_id"] for w in found] == [first.workflow_id]  # exactly one
        north = await m.list(attributes={"region": "north"})
        assert {w["workflow_id"] for w in north} == {first.workflow_id, others[0].workflow_id}
        both = await m.list(attributes={"region": "north", "application_id": "A-18"})
        assert [w["workflow_id"] for w in both] == [others[0].workflow_id]
        assert await m.list(attributes={"application_id": "A-99"}) == []
        assert await m.list(attributes={"region": "north"}, status="failed") == []
        executed = await m.execute(
            "grantApproval", {"region": "east"}, attributes={"application_id": "A-20"}, timeout=10
        )
        assert executed.attributes["application_id"] == "A-20"


async def test_a_handler_returning_bad_attributes_fails_its_step_naming_the_key(
    memory_url: str, store_url: str
) -> None:
    async with hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url) as m:
        m.define_workflow("w", ["a"])

        @m.on_step("w.a")
        async def a(ctx: hms_mgmt.StepContext) -> dict[str, Any]:
            return {"data": 1, "attributes": {"bad.key": "x"}}

        await m.serve()
        started = await m.start("w", {})
        state = await m.wait(started.workflow_id, timeout=10)
    assert state.status == "failed" and state.attributes == {}
    error = state.steps[0].error or {}
    assert "'bad.key' is not a valid key" in error["message"] and "returned" in error["message"]
    assert len(state.steps) == 1  # not retried: the same code would return the same


async def test_bad_attributes_are_refused_by_the_client_and_the_engine(
    mgmt: hms_mgmt.Management, memory_url: str
) -> None:
    for attributes, message in (
        ({"bad key": "x"}, "key 'bad key' is not a valid key"),
        ({"k": "x" * 201}, "of key 'k' must be a string of 1-200 printable"),
        ({"k": 17}, "value 17 of key 'k'"),
        ({"k": ""}, "of key 'k' must be a string"),
        ({f"k{i}": "v" for i in range(21)}, "has 21 keys; at most 20"),
        (["k"], "must be a dict of strings to strings"),
    ):
        with pytest.raises(hms_mgmt.PayloadError, match=message):
            await mgmt.start("grantApproval", {}, attributes=attributes)  # type: ignore[arg-type]
        with pytest.raises(hms_mgmt.PayloadError, match=message):
            await mgmt.list(attributes=attributes)  # type: ignore[arg-type]
    client = await mgmt._connect()  # past the client's checks: the engine refuses it too
    start = {"workflow_id": "wf-raw", "workflow": "grantApproval", "attributes": {"a.b": "x"}}
    with pytest.raises(hms_mgmt.InvalidMessageError, match=r"'attributes' key 'a\.b'"):
        await client.request("start", start, timeout=5)
    with pytest.raises(hms_mgmt.InvalidMessageError, match=r"'attributes' key 'a\.b'"):
        await client.request("list", {"attributes": {"a.b": "x"}}, timeout=5)
    assert await client.list() == []
