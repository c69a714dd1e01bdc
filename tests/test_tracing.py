"""Trace context: made by the client, kept by the machine, carried by step messages."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import hms_mgmt
from hms_mgmt import machine, tracing
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.steps import StepMessage
from tests.conftest import wait_until

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
DEFINITION = WorkflowDefinition.build("w", ["a", "b"]).with_version(1)


def test_traceparents_are_checked() -> None:
    assert tracing.valid(TP)
    assert tracing.trace_id(TP) == "0af7651916cd43dd8448eb211c80319c"
    assert tracing.log_fields(TP) == {"trace_id": "0af7651916cd43dd8448eb211c80319c"}
    assert tracing.log_fields(None) == {}
    for bad in (
        None,
        42,
        "",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # no flags
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # unknown version
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
    ):
        assert not tracing.valid(bad), bad
        assert tracing.checked(bad) is None
    fresh = tracing.new_traceparent()
    assert tracing.valid(fresh) and fresh != tracing.new_traceparent()


def test_the_current_opentelemetry_span_becomes_the_traceparent() -> None:
    parent = trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=0x0AF7651916CD43DD8448EB211C80319C,
            span_id=0xB7AD6B7169203331,
            is_remote=True,
            trace_flags=trace.TraceFlags(1),
        )
    )
    with trace.use_span(parent):
        assert tracing.current_traceparent() == TP
    outside = tracing.current_traceparent()
    assert tracing.valid(outside) and tracing.trace_id(outside) != tracing.trace_id(TP)


def test_a_handler_runs_in_a_span_of_the_workflow_trace() -> None:
    with tracing.step_span(TP, "w.a", {"hms.attempt": 1}):
        inside = trace.get_current_span().get_span_context()
    assert f"{inside.trace_id:032x}" == tracing.trace_id(TP)
    assert not trace.get_current_span().get_span_context().is_valid


@pytest.fixture
def without_otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(tracing, "_otel_trace", None)
    yield


def test_without_opentelemetry_a_new_trace_and_no_span(without_otel: None) -> None:
    assert not tracing.otel_available()
    made = tracing.current_traceparent()
    assert tracing.valid(made)
    with tracing.step_span(TP, "w.a", {}):
        assert not trace.get_current_span().get_span_context().is_valid


def test_the_machine_puts_the_workflow_trace_in_every_step() -> None:
    t = machine.start(DEFINITION, "wf1", {"p": 1}, 10.0, traceparent=TP)
    assert t.workflow is not None and t.workflow.traceparent == TP
    assert [s.traceparent for s in t.steps] == [TP]
    first = t.steps[0]
    outcome = Outcome(
        "wf1",
        first.seq,
        "failed",
        step="a",
        attempt=1,
        error={"type": "E", "message": "m", "retryable": False},
    )
    failed = machine.apply_outcome(t.workflow, t.runs[0], DEFINITION, outcome, 11.0)
    assert failed.workflow is not None and failed.workflow.status == "failed"
    again = machine.retry(failed.workflow, failed.runs[0], DEFINITION, 12.0)
    assert [s.traceparent for s in again.steps] == [TP]


def test_step_messages_carry_the_trace_in_the_item_and_the_header() -> None:
    step = StepMessage("wf1", "w", "a", 1, 1, 1, {"p": 1}, traceparent=TP)
    message = step.to_message()
    assert message.headers["traceparent"] == TP
    assert b'"traceparent"' in step.encode()
    assert StepMessage.from_json({**_item(step), "traceparent": TP}).traceparent == TP
    # an invalid one is ignored (W3C), not a reason to refuse the step
    assert StepMessage.from_json({**_item(step), "traceparent": "garbage"}).traceparent is None
    assert "traceparent" not in StepMessage("wf1", "w", "a", 1, 1, 1, None).to_message().headers


def _item(step: StepMessage) -> dict[str, object]:
    import json

    item: dict[str, object] = json.loads(step.encode())
    return item


async def test_the_client_refuses_a_malformed_traceparent(memory_url: str) -> None:
    mgmt = hms_mgmt.init("t", broker_url=memory_url)
    with pytest.raises(hms_mgmt.PayloadError, match="not a W3C traceparent"):
        await asyncio.wait_for(mgmt.start("w", {}, traceparent="nope"), 5)
    await mgmt.close()


def test_the_step_context_names_its_trace_id() -> None:
    ctx = hms_mgmt.StepContext(None, "wf1", "w", "a", 1, 1, 1, traceparent=TP)
    assert ctx.trace_id == tracing.trace_id(TP)
    assert hms_mgmt.StepContext(None, "wf1", "w", "a", 1, 1, 1).trace_id is None


async def test_the_trace_reaches_every_handler_and_survives_an_engine_restart(
    memory_url: str, store_url: str
) -> None:
    seen: list[tuple[str, str | None, str | None]] = []

    def service() -> hms_mgmt.Management:
        m = hms_mgmt.init("t", broker_url=memory_url, store_url=store_url)
        m.define_workflow("w", ["a", "b"])

        async def handler(ctx: hms_mgmt.StepContext) -> dict[str, object]:
            span = trace.get_current_span().get_span_context()
            seen.append((ctx.step, ctx.traceparent, f"{span.trace_id:032x}"))
            return {"data": ctx.payload, "delay": 0.5} if ctx.step == "a" else {"data": 1}

        m.on_step("w.a", handler)
        m.on_step("w.b", handler)
        return m

    first = service()
    await first.serve()
    started = await first.start("w", {"x": 1}, traceparent=TP)
    await wait_until(lambda: len(seen) == 1, what="step a")
    await first.close()  # the engine stops while step b waits for its timer
    second = service()
    await second.serve()
    state = await second.wait(started.workflow_id, timeout=10)
    await second.close()
    assert state.status == "succeeded" and state.traceparent == TP
    assert seen == [("a", TP, tracing.trace_id(TP)), ("b", TP, tracing.trace_id(TP))]


# -- spans, recorded by the OpenTelemetry SDK -----------------------------------------------

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """The SDK's in-memory exporter, behind the process's tracer provider.

    A provider can be set once per process, so the first test sets it and the others
    find it; each test starts with no spans.
    """
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    assert tracing.recording()
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def traced_service(memory_url: str, store_url: str) -> hms_mgmt.Management:
    """Engine, step service and client in one process: their spans go to one exporter."""
    m = hms_mgmt.init("t", broker_url=memory_url, store_url=store_url)
    m.define_workflow("w", ["a", "b"], retry=hms_mgmt.RetryPolicy(initial_delay=0.05, jitter=False))
    failed_once: list[str] = []

    @m.on_step("w.a")
    async def a(ctx: hms_mgmt.StepContext) -> dict[str, object]:
        return {"data": ctx.payload, "delay": 0.05}  # b runs from a timer

    @m.on_step("w.b")
    async def b(ctx: hms_mgmt.StepContext) -> dict[str, object]:
        if not failed_once:  # a retry, after backoff
            failed_once.append(ctx.workflow_id)
            raise RuntimeError("once")
        return {"data": 1}

    return m


def parents(spans: tuple[ReadableSpan, ...]) -> dict[str, int | None]:
    return {
        f"{span.name} {span.context.span_id:016x}": None
        if span.parent is None
        else span.parent.span_id
        for span in spans
    }


async def test_every_exported_span_has_its_parent_exported(
    memory_url: str, store_url: str, exported: InMemorySpanExporter
) -> None:
    async with traced_service(memory_url, store_url) as m:
        await m.serve()
        assert not trace.get_current_span().get_span_context().is_valid  # no ambient span
        started = await m.start("w", {"x": 1})
        state = await m.wait(started.workflow_id, timeout=10)
        assert state.status == "succeeded" and len(state.steps) == 3
    spans = exported.get_finished_spans()
    ids = {span.context.span_id for span in spans}
    orphans = {name: parent for name, parent in parents(spans).items() if parent not in ids}
    # the one span whose parent is not exported is the start, and it has none
    assert len(orphans) == 1, orphans
    [(root, none)] = orphans.items()
    assert root.startswith("hms.start w ") and none is None, orphans
    names = sorted(span.name for span in spans)
    assert names.count("hms.start w") == 1
    assert names.count("w.a") == 1 and names.count("w.b") == 2  # b failed once
    assert names.count("hms.engine w") >= 4  # start, a's outcome, b's timer, b's outcomes
    assert len({span.context.trace_id for span in spans}) == 1
    [start] = [span for span in spans if span.name == "hms.start w"]
    assert state.traceparent == (
        f"00-{start.context.trace_id:032x}-{start.context.span_id:016x}"
        f"-{int(start.context.trace_flags):02x}"
    )  # the start span's context is what the workflow carries
    published = [
        step
        for span in spans
        if span.name == "hms.engine w"
        for step in (span.attributes or {}).get("hms.steps_published", ())
    ]
    assert published == ["a", "b", "b"]


async def test_a_start_inside_a_span_nests_under_it_and_a_given_traceparent_is_kept(
    memory_url: str, store_url: str, exported: InMemorySpanExporter
) -> None:
    async with traced_service(memory_url, store_url) as m:
        await m.serve()
        with trace.get_tracer("test").start_as_current_span("caller") as caller:
            inside = await m.start("w", {})
        given = await m.start("w", {}, traceparent=TP)  # the caller's own parent: no start span
        for started in (inside, given):
            assert (await m.wait(started.workflow_id, timeout=10)).status == "succeeded"
    spans = exported.get_finished_spans()
    [start] = [span for span in spans if span.name == "hms.start w"]
    assert start.parent is not None and start.parent.span_id == caller.get_span_context().span_id
    theirs = [span for span in spans if f"{span.context.trace_id:032x}" == tracing.trace_id(TP)]
    assert theirs and all(
        span.parent is not None and f"{span.parent.span_id:016x}" == TP.split("-")[2]
        for span in theirs
    )
