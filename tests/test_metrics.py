"""The engine's and step services' Prometheus metrics, counted from batches and outcomes:
buckets that resolve sub-millisecond steps, no ``*_created`` series, text that ``promtool``
accepts."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

import hms_mgmt
from hms_mgmt.metrics import EngineMetrics, WorkerMetrics
from hms_mgmt.records import StepRun, StepStatus, Workflow, WorkflowStatus
from hms_mgmt.store.base import Batch
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.steps import StepMessage


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
