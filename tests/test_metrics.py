"""The engine's and step services' Prometheus metrics, counted from batches and outcomes:
buckets that resolve sub-millisecond steps, no ``*_created`` series, text that ``promtool``
accepts."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

import hms_mgmt
from bus_adapters import open_bus
from bus_adapters.base import BusError, Message
from hms_mgmt.engine.api import EngineApi, engine_metrics
from hms_mgmt.engine.engine import Engine
from hms_mgmt.engine.relay import OutboxRelay
from hms_mgmt.errors import StoreError
from hms_mgmt.metrics import EngineMetrics, WorkerMetrics
from hms_mgmt.records import StepRun, StepStatus, Workflow, WorkflowStatus
from hms_mgmt.store import open_store
from hms_mgmt.store.base import Batch, OutboxRow
from hms_mgmt.topology import STEPS_EXCHANGE
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.steps import StepMessage
from tests.conftest import wait_until


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def workflow(status: WorkflowStatus, **changes: object) -> Workflow:
    fields: dict[str, object] = {
        "id": "wf1",
        "name": "w",
        "version": 1,
        "status": status,
        "input": None,
        "created_at": 100.0,
        "updated_at": 100.5,
        **changes,
    }
    return Workflow(**fields)  # type: ignore[arg-type]


def finished_run(started: float, finished: float, status: StepStatus) -> StepRun:
    return StepRun(
        workflow_id="wf1",
        seq=1,
        step="a",
        visit=1,
        attempt=1,
        status=status,
        input=None,
        created_at=started,
        started_at=started,
        finished_at=finished,
    )


def engine_with_steps(*durations: float) -> EngineMetrics:
    metrics = EngineMetrics()
    for duration in durations:
        batch = Batch()
        batch.workflows["wf1"] = workflow(WorkflowStatus.RUNNING)
        batch.runs[("wf1", 1)] = finished_run(10.0, 10.0 + duration, StepStatus.SUCCEEDED)
        metrics.on_batch(batch)
    return metrics


def worker_with_steps(*durations: float) -> WorkerMetrics:
    metrics = WorkerMetrics()
    message = StepMessage("wf1", "w", "a", 1, 1, 1, None)
    for duration in durations:
        outcome = Outcome(
            "wf1", 1, "succeeded", step="a", attempt=1, started_at=5.0, finished_at=5.0 + duration
        )
        metrics.on_outcome(message, outcome)
    return metrics


def test_sub_millisecond_steps_land_in_buckets_of_their_own() -> None:
    # Steps of 0.08, 0.2, 0.4 and 0.9 ms, and one of 45 s: with the old smallest bucket
    # (5 ms) the first four were indistinguishable.
    durations = (0.00008, 0.0002, 0.0004, 0.0009, 45.0)
    labels = (("outcome", "succeeded"), ("step", "a"), ("workflow", "w"))
    for name, text in (
        ("hms_step_duration_seconds", engine_with_steps(*durations).render()),
        ("hms_worker_step_duration_seconds", worker_with_steps(*durations).render()),
    ):
        found = samples(text)

        def bucket(le: str, name: str = name, found: dict = found) -> float:  # type: ignore[type-arg]
            return found[(f"{name}_bucket", tuple(sorted((*labels, ("le", le)))))]

        assert [bucket(le) for le in ("0.0001", "0.00025", "0.0005", "0.001")] == [1, 2, 3, 4]
        assert bucket("30.0") == 4 and bucket("60.0") == 5
        buckets = [key for key in found if key[0] == f"{name}_bucket"]
        assert len(buckets) <= 20, "cardinality: at most 20 series per label set"


def test_no_created_series() -> None:
    for text in (engine_with_steps(0.001).render(), worker_with_steps(0.001).render()):
        assert b"_total" in text and b"_bucket" in text
        assert not [line for line in text.decode().splitlines() if "_created" in line]


def check_with_promtool(text: bytes) -> None:
    """``promtool check metrics``: no errors and no lint warnings (fails without it on CI)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool not found (Debian's prometheus package; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == b"" and checked.stderr.strip() == b"", checked


def test_promtool_accepts_the_metrics() -> None:
    engine = engine_with_steps(0.001, 2.0)
    engine.on_batch(Batch(workflows={"wf1": workflow(WorkflowStatus.SUCCEEDED)}))
    for text in (engine.render(), worker_with_steps(0.001).render()):
        check_with_promtool(text)


# -- a workflow is counted once per status it reaches -------------------------------------


def count(metrics: EngineMetrics, name: str, **labels: str) -> float:
    return samples(metrics.render()).get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_retried_workflow_that_fails_again_is_not_counted_again() -> None:
    metrics = EngineMetrics()

    def commit(wf: Workflow, *history: str) -> None:
        metrics.on_batch(
            Batch(workflows={wf.id: wf}, history=[(wf.id, 1.0, kind, {}) for kind in history])
        )

    commit(workflow(WorkflowStatus.FAILED), "workflow_failed")
    for retries in (1, 2):  # the operator retries it twice, and it fails again each time
        commit(workflow(WorkflowStatus.RUNNING, retries=retries), "workflow_retried")
        commit(workflow(WorkflowStatus.FAILED, retries=retries), "workflow_failed")
    commit(workflow(WorkflowStatus.RUNNING, retries=3), "workflow_retried")
    commit(workflow(WorkflowStatus.SUCCEEDED, retries=3), "workflow_succeeded")

    finished = "hms_workflows_finished_total"
    assert count(metrics, finished, workflow="w", status="failed") == 1
    assert count(metrics, finished, workflow="w", status="succeeded") == 1
    assert count(metrics, "hms_workflows_refailed_total", workflow="w") == 2
    assert count(metrics, "hms_workflow_retries_total", workflow="w") == 3
    duration = "hms_workflow_duration_seconds_count"
    assert count(metrics, duration, workflow="w", status="failed") == 1
    assert count(metrics, duration, workflow="w", status="succeeded") == 1


async def test_retries_through_the_engine_count_one_failed_workflow(
    memory_url: str, store_url: str
) -> None:
    metrics = EngineMetrics()
    attempts: list[int] = []
    async with hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url) as m:
        m.define_workflow("doomed", ["a", "b"], retry=hms_mgmt.RetryPolicy(max_attempts=1))

        @m.on_step("doomed.a")
        async def a(ctx: hms_mgmt.StepContext) -> None:
            attempts.append(ctx.attempt)
            if len(attempts) < 4:
                raise RuntimeError(f"try {len(attempts)}")

        @m.on_step("doomed.b")
        async def b(ctx: hms_mgmt.StepContext) -> None:
            return None

        await m.serve()
        m._hosted.engine.on_commit = metrics.on_batch
        started = await m.start("doomed", {})
        state = await m.wait(started.workflow_id, timeout=10)
        assert state.status == "failed"
        for _ in range(2):  # fails again
            await m.retry(started.workflow_id)
            state = await m.wait(started.workflow_id, timeout=10)
            assert state.status == "failed"
        await m.retry(started.workflow_id)  # and then succeeds
        state = await m.wait(started.workflow_id, timeout=10)
        assert state.status == "succeeded" and len(attempts) == 4

    finished = "hms_workflows_finished_total"
    assert count(metrics, finished, workflow="doomed", status="failed") == 1
    assert count(metrics, finished, workflow="doomed", status="succeeded") == 1
    assert count(metrics, "hms_workflows_refailed_total", workflow="doomed") == 2
    assert count(metrics, "hms_workflow_retries_total", workflow="doomed") == 3
    assert count(metrics, "hms_workflows_started_total", workflow="doomed") == 1


# -- readiness, the outbox and overdue timers, read at scrape time ------------------------


class RefusingBus:
    """A bus whose publishes fail while ``refusing`` (a broker that takes nothing)."""

    def __init__(self, bus: Any) -> None:
        self._bus = bus
        self.refusing = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    async def publish(self, message: Message, **kwargs: Any) -> None:
        if self.refusing:
            raise BusError("refused (test)")
        await self._bus.publish(message, **kwargs)


def outbox_row(message_id: str, created_at: float) -> OutboxRow:
    return OutboxRow(message_id, STEPS_EXCHANGE, "w.a", b"{}", {"hms-attempt": 1}, created_at)


async def test_the_relay_counts_rows_until_the_broker_confirms_them() -> None:
    bus = RefusingBus(object())
    published: list[Message] = []

    async def publish(message: Message, **_kwargs: Any) -> None:
        if bus.refusing:
            raise BusError("refused (test)")
        published.append(message)

    bus.publish = publish  # type: ignore[method-assign]
    relay = OutboxRelay(bus)  # type: ignore[arg-type]
    assert relay.backlog(1000.0) == (0, 0.0)
    relay.submit([outbox_row("m1", 990.0), outbox_row("m2", 995.0)])
    assert relay.backlog(1000.0) == (2, 10.0)
    assert relay.backlog(1030.0) == (2, 40.0)  # grows while the broker takes nothing
    bus.refusing = False
    await wait_until(lambda: relay.backlog(1030.0) == (0, 0.0), what="the rows confirmed")
    assert len(published) == 1 and sorted(relay.take_confirmed()) == ["m1", "m2"]


async def test_the_engine_is_ready_in_its_metrics_only_while_readyz_says_so(
    memory_url: str, store_url: str
) -> None:
    engine = Engine(open_bus(memory_url), open_store(store_url))
    metrics = engine_metrics(engine)
    assert samples(metrics.render())[("hms_engine_ready", ())] == 0  # not started
    running = asyncio.ensure_future(engine.run())
    await asyncio.wait_for(engine.ready.wait(), 10)
    assert samples(metrics.render())[("hms_engine_ready", ())] == 1
    engine.health.problem = StoreError("disk full (test)", kind="full")
    assert samples(metrics.render())[("hms_engine_ready", ())] == 0
    assert engine.checks()["store"] is False
    engine.health.problem = None
    engine.stop()
    await running


async def test_outbox_age_grows_while_the_broker_takes_nothing(
    memory_url: str, store_url: str
) -> None:
    async with hms_mgmt.init(service_name="t", broker_url=memory_url, store_url=store_url) as m:
        m.define_workflow("w", ["a"])

        @m.on_step("w.a")
        async def a(ctx: hms_mgmt.StepContext) -> None:
            return None

        await m.serve()
        engine = m._hosted.engine
        metrics = engine_metrics(engine)
        async with TestClient(TestServer(EngineApi(engine, metrics).app())) as http:

            async def scrape() -> dict[str, float]:
                response = await http.get("/metrics")
                text = await response.read()
                found = samples(text)
                return {name: value for (name, labels), value in found.items() if not labels}

            before = await scrape()
            assert before["hms_engine_ready"] == 1
            assert before["hms_outbox_backlog"] == 0 == before["hms_outbox_oldest_age_seconds"]

            refusing = RefusingBus(engine.relay._bus)
            engine.relay._bus = refusing
            started = await m.start("w", {})
            stalled = await wait_until(
                lambda: _stalled(scrape), what="an outbox row older than 0.3 s"
            )
            assert stalled["hms_outbox_backlog"] == 1
            later = await wait_until(
                lambda: _older(scrape, stalled["hms_outbox_oldest_age_seconds"]),
                what="the age to grow",
            )
            assert later["hms_outbox_backlog"] == 1

            refusing.refusing = False
            state = await m.wait(started.workflow_id, timeout=10)
            assert state.status == "succeeded"
            after = await scrape()
            assert after["hms_outbox_backlog"] == 0 == after["hms_outbox_oldest_age_seconds"]
            check_with_promtool(await (await http.get("/metrics")).read())


async def _stalled(scrape: Any) -> dict[str, float] | None:
    found: dict[str, float] = await scrape()
    return found if found["hms_outbox_oldest_age_seconds"] > 0.3 else None


async def _older(scrape: Any, than: float) -> dict[str, float] | None:
    found: dict[str, float] = await scrape()
    return found if found["hms_outbox_oldest_age_seconds"] > than else None


async def test_overdue_timers_are_read_from_the_store(memory_url: str, store_url: str) -> None:
    now = 10_000.0
    store = open_store(store_url)
    await store.open()
    try:
        batch = Batch()
        for wf_id, kind, at in (
            ("late-wait", "wait", now - 90),
            ("later-wait", "wait", now - 30),
            ("late-deadline", "deadline", now - 5),
            ("future", "wait", now + 100),
        ):
            batch.workflows[wf_id] = workflow(
                WorkflowStatus.WAITING, id=wf_id, timer_at=at, timer_kind=kind
            )
        batch.workflows["done"] = workflow(WorkflowStatus.SUCCEEDED, id="done")
        await store.commit(batch)
        engine = Engine(open_bus(memory_url), store, clock=lambda: now)
        overdue = await engine.overdue_timers()
        assert overdue == {("w", "wait"): 90.0, ("w", "deadline"): 5.0}
    finally:
        await store.close()

    metrics = EngineMetrics()
    metrics.set_counts({}, overdue=overdue)
    name = "hms_timers_overdue_seconds"
    assert count(metrics, name, workflow="w", kind="wait") == 90.0
    metrics.set_counts({}, overdue={})  # the timers fired: no series left behind
    assert not [key for key in samples(metrics.render()) if key[0] == name]


def test_workflows_by_status_has_every_status() -> None:
    metrics = EngineMetrics()
    metrics.set_counts({"running": 2, "waiting": 1, "succeeded": 5})
    name = "hms_workflows_by_status"
    assert count(metrics, name, status="running") == 2
    assert count(metrics, name, status="succeeded") == 5
    assert count(metrics, name, status="pending") == 0  # present, not missing
    assert count(metrics, "hms_workflows_in_progress") == 3
    metrics.set_counts({"succeeded": 8})  # they all finished: running drops to 0
    assert count(metrics, name, status="running") == 0
    check_with_promtool(metrics.render())


def test_limited_steps_show_their_runs_out_and_queued() -> None:
    counts = {("grant", "check"): (5, 3), ("grant", "inspect"): (1, 0)}
    text = EngineMetrics(slots=lambda: counts).render().decode()
    assert 'hms_step_runs_limited{step="check",workflow="grant"} 5.0' in text
    assert 'hms_step_runs_queued{step="check",workflow="grant"} 3.0' in text
    assert 'hms_step_runs_queued{step="inspect",workflow="grant"} 0.0' in text


def test_paused_workflow_types_show_since_when() -> None:
    """A type pause (or a step's) is a series with the time it began; none without one."""
    from hms_mgmt.records import TypePause

    pauses = [
        TypePause("grant", "check", 1700000000.0, "bureau down"),
        TypePause("audit", None, 5.0),
    ]
    text = EngineMetrics(type_pauses=lambda: pauses).render().decode()
    assert 'hms_workflow_type_paused_since{step="check",workflow="grant"} 1.7e+09' in text
    assert 'hms_workflow_type_paused_since{step="",workflow="audit"} 5.0' in text
    assert "hms_workflow_type_paused_since{" not in EngineMetrics().render().decode()
    check_with_promtool(EngineMetrics(type_pauses=lambda: pauses).render())
