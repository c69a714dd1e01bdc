"""Prometheus metrics of the engine and of step services, each in its own registry.

The engine's are counted from each batch once it is committed (so a batch that
rolls back counts nothing), the step services' from each outcome. Labels are
workflow, step, status or outcome: never a workflow id, whose number is unbounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hms_mgmt.records import TERMINAL, StepStatus, TypePause, WorkflowStatus
from hms_mgmt.store.base import Batch
from hms_mgmt.topology import DEAD_EXCHANGE
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.steps import StepMessage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Steps commonly take 0.1-1 ms of handler time, so the buckets start at 100 us and step
# 1-2.5-5 per decade up to 60 s (with 300 s for the long ones): 19 buckets and +Inf, 20
# series per (workflow, step, outcome).
STEP_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip
# Workflows: a few steps and their messages take a millisecond or more; waits and delays
# make hours. 18 buckets and +Inf per (workflow, status).
WORKFLOW_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600,
)  # fmt: skip
FINISHED_RUNS = frozenset(
    {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.TIMED_OUT, StepStatus.CANCELLED}
)
STATUSES = [str(s) for s in WorkflowStatus]
IN_PROGRESS = [status for status in STATUSES if WorkflowStatus(status) not in TERMINAL]


class _ReadCounter(Collector):
    """A counter kept elsewhere (the bus's reconnects), read at scrape time."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class _ReadGauge(_ReadCounter):
    """A gauge kept elsewhere, read at scrape time."""

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self._name, self._documentation, value=self._read())


class _Slots(Collector):
    """The concurrency slots of limited steps, read at scrape time: runs out (holding a slot)
    and runs queued for one, by workflow and step (never by key value: unbounded)."""

    def __init__(self, read: Callable[[], dict[tuple[str, str], tuple[int, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        counts = self._read()
        taken = GaugeMetricFamily(
            "hms_step_runs_limited",
            "Runs of a step with a concurrency limit out now (each holding a slot).",
            labels=["workflow", "step"],
        )
        queued = GaugeMetricFamily(
            "hms_step_runs_queued",
            "Runs of a step waiting as queued for a slot of its concurrency limit.",
            labels=["workflow", "step"],
        )
        for (workflow, step), (out, waiting) in sorted(counts.items()):
            taken.add_metric([workflow, step], out)
            queued.add_metric([workflow, step], waiting)
        yield taken
        yield queued


class _TypePauses(Collector):
    """The workflow types (or steps of them, ``step`` empty for the whole type) an operator
    has paused, each with the time it was paused since: read at scrape time, so an alert can
    say that a type has been held too long (``time() - hms_workflow_type_paused_since``)."""

    def __init__(self, read: Callable[[], list[TypePause]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        paused = GaugeMetricFamily(
            "hms_workflow_type_paused_since",
            "Unix time since which a workflow type (step empty) or one of its steps is paused "
            "(pause_type); no series while it is not.",
            labels=["workflow", "step"],
        )
        for pause in sorted(self._read(), key=lambda p: p.key):
            paused.add_metric([pause.workflow, pause.step or ""], pause.since)
        yield paused


class _WithoutCreated(Collector):
    """A registry's metrics without the ``*_created`` samples.

    prometheus_client adds a ``<name>_created`` gauge, the Unix time of a series' first
    use, to every counter and histogram: one more series each, which dashboards do not use.
    ``disable_created_metrics()`` would drop them for the whole process (the step service's
    own metrics too); this drops them from our registries only.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            created = family.name + "_created"
            if any(sample.name == created for sample in family.samples):
                family.samples = [s for s in family.samples if s.name != created]
            yield family


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text of a registry, without ``*_created`` series."""
    return generate_latest(_WithoutCreated(registry))


class _OutboxCollector(Collector):
    """The outbox relay's backlog, read from its own bookkeeping at scrape time."""

    def __init__(self, read: Callable[[], tuple[int, float]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        rows, oldest_age = self._read()
        yield GaugeMetricFamily(
            "hms_outbox_backlog",
            "Outbox rows committed and not yet confirmed by the broker.",
            value=rows,
        )
        yield GaugeMetricFamily(
            "hms_outbox_oldest_age_seconds",
            "Age of the oldest outbox row not yet confirmed by the broker (0 with none).",
            value=oldest_age,
        )


class EngineMetrics:
    def __init__(
        self,
        reconnects: Callable[[], int] = lambda: 0,
        ready: Callable[[], bool] = lambda: True,
        outbox: Callable[[], tuple[int, float]] = lambda: (0, 0.0),
        *,
        active: Callable[[], bool] = lambda: True,
        takeovers: Callable[[], int] = lambda: 0,
        standby: Callable[[], bool] = lambda: False,
        slots: Callable[[], dict[tuple[str, str], tuple[int, int]]] = dict,
        type_pauses: Callable[[], list[TypePause]] = list,
    ) -> None:
        self.registry = registry = CollectorRegistry()
        registry.register(_Slots(slots))
        registry.register(_TypePauses(type_pauses))
        self.started = Counter(
            "hms_workflows_started", "Workflows started.", ["workflow"], registry=registry
        )
        self.finished = Counter(
            "hms_workflows_finished",
            "Workflows that reached succeeded, failed, cancelled or compensated, each counted once per "
            "status: a retried workflow failing again is in hms_workflows_refailed_total.",
            ["workflow", "status"],
            registry=registry,
        )
        self.workflow_duration = Histogram(
            "hms_workflow_duration_seconds",
            "Workflows from their start to the end counted in hms_workflows_finished_total.",
            ["workflow", "status"],
            buckets=WORKFLOW_BUCKETS,
            registry=registry,
        )
        self.workflow_retries = Counter(
            "hms_workflow_retries",
            "Operators' retries of failed workflows (hms workflow retry, a DLQ replay).",
            ["workflow"],
            registry=registry,
        )
        self.resets = Counter(
            "hms_workflow_resets",
            "Operators' resets of workflows to a step (hms workflow reset, client.reset).",
            ["workflow"],
            registry=registry,
        )
        self.refailed = Counter(
            "hms_workflows_refailed",
            "Retried workflows that failed again, once each time.",
            ["workflow"],
            registry=registry,
        )
        self.in_progress = Gauge(
            "hms_workflows_in_progress",
            "Workflows not finished yet (pending, scheduled, running or waiting).",
            registry=registry,
        )
        self.by_status = Gauge(
            "hms_workflows_by_status",
            "Workflows in the store by status (finished ones until retention deletes them).",
            ["status"],
            registry=registry,
        )
        self.stuck = Gauge(
            "hms_steps_stuck",
            "Current step runs waiting longer than HMS_STUCK_AFTER for a step service to start "
            "them.",
            ["workflow", "step"],
            registry=registry,
        )
        self.overdue = Gauge(
            "hms_timers_overdue_seconds",
            "Seconds the most overdue timer (kind: wait, deadline, start, run) of a workflow "
            "is past due and has not fired.",
            ["workflow", "kind"],
            registry=registry,
        )
        self.store_bytes = Gauge(
            "hms_store_bytes", "Bytes the store takes on disk (with its WAL).", registry=registry
        )
        self.step_duration = Histogram(
            "hms_step_duration_seconds",
            "Step runs from their start to their end, as the engine recorded them.",
            ["workflow", "step", "outcome"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "hms_step_retries",
            "Attempts scheduled after a failed or timed-out one.",
            ["workflow", "step"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "hms_dead_letters",
            "Step messages the engine gave up on and put in their .dlq.",
            ["workflow", "step"],
            registry=registry,
        )
        registry.register(
            _ReadCounter(
                "hms_bus_reconnects", "Broker connections re-established after a drop.", reconnects
            )
        )
        registry.register(
            _ReadGauge(
                "hms_engine_ready",
                "1 while the engine is ready (what /readyz answers 200 for), else 0.",
                lambda: int(ready()),
            )
        )
        registry.register(
            _ReadGauge(
                "hms_engine_active",
                "1 while this engine serves the vhost (holds its lock and the store's claim); "
                "0 while it stands by or starts.",
                lambda: int(active()),
            )
        )
        registry.register(
            _ReadGauge(
                "hms_engine_standby",
                "1 while this engine stands by (another serves the vhost), else 0.",
                lambda: int(standby()),
            )
        )
        registry.register(
            _ReadCounter(
                "hms_engine_takeovers",
                "Times this engine took over the vhost and the store from another (after "
                "standing by).",
                takeovers,
            )
        )
        registry.register(_OutboxCollector(outbox))

    def on_batch(self, batch: Batch) -> None:
        """Count what a committed batch did."""
        for workflow in batch.workflows.values():
            # Only a transition puts a workflow in a batch, and none leaves a finished one
            # finished: a terminal workflow here has just finished.
            if not workflow.terminal:
                continue
            if workflow.status == WorkflowStatus.FAILED and workflow.retries:
                # It failed before (only a failed workflow can be retried) and was counted
                # then: counting it again would count one workflow as two failures.
                self.refailed.labels(workflow.name).inc()
                continue
            status = str(workflow.status)
            self.finished.labels(workflow.name, status).inc()
            self.workflow_duration.labels(workflow.name, status).observe(
                max(0.0, workflow.updated_at - workflow.created_at)
            )
        for workflow_id, _at, kind, detail in batch.history:
            if kind == "workflow_started":
                self.started.labels(str(detail.get("workflow"))).inc()
            elif kind == "workflow_retried" and workflow_id in batch.workflows:
                self.workflow_retries.labels(batch.workflows[workflow_id].name).inc()
            elif kind == "workflow_reset" and workflow_id in batch.workflows:
                self.resets.labels(batch.workflows[workflow_id].name).inc()
            elif kind == "retry_scheduled" and workflow_id in batch.workflows:
                self.retries.labels(batch.workflows[workflow_id].name, str(detail["step"])).inc()
        for run in batch.runs.values():
            if run.status not in FINISHED_RUNS or run.started_at is None:
                continue
            owner = batch.workflows.get(run.workflow_id)
            if owner is not None and run.finished_at is not None:
                self.step_duration.labels(owner.name, run.step, str(run.status)).observe(
                    max(0.0, run.finished_at - run.started_at)
                )
        for row in batch.outbox:
            if row.exchange == DEAD_EXCHANGE:
                workflow_name, _, step = row.routing_key.partition(".")
                self.dead_letters.labels(workflow_name, step).inc()

    def set_counts(
        self,
        by_status: dict[str, int],
        stuck: dict[tuple[str, str], int] | None = None,
        store_bytes: int | None = None,
        overdue: dict[tuple[str, str], float] | None = None,
    ) -> None:
        """The gauges read from the store at scrape time."""
        self.in_progress.set(sum(by_status.get(status, 0) for status in IN_PROGRESS))
        for status in STATUSES:  # every status, 0 when none: no series goes stale
            self.by_status.labels(status).set(by_status.get(status, 0))
        if stuck is not None:
            self.stuck.clear()  # a step no longer stuck must not keep its last value
            for (workflow, step), count in stuck.items():
                self.stuck.labels(workflow, step).set(count)
        if store_bytes is not None:
            self.store_bytes.set(store_bytes)
        if overdue is not None:
            self.overdue.clear()  # a timer that fired must not keep its last value
            for (workflow, kind), seconds in overdue.items():
                self.overdue.labels(workflow, kind).set(seconds)

    def render(self) -> bytes:
        return render(self.registry)


class WorkerMetrics:
    def __init__(
        self,
        reconnects: Callable[[], int] = lambda: 0,
        abandoned_threads: Callable[[], int] = lambda: 0,
        threads_running_past_timeout: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry = registry = CollectorRegistry()
        self.steps = Counter(
            "hms_worker_steps",
            "Step runs this process finished, by outcome (succeeded or failed).",
            ["workflow", "step", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "hms_worker_step_duration_seconds",
            "Handler run time of the step runs this process finished.",
            ["workflow", "step", "outcome"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        registry.register(
            _ReadCounter(
                "hms_bus_reconnects", "Broker connections re-established after a drop.", reconnects
            )
        )
        registry.register(
            _ReadCounter(
                "hms_worker_abandoned_threads",
                "Handler threads still running at their step's deadline: the attempt failed, "
                "the thread could not be stopped and ran on.",
                abandoned_threads,
            )
        )
        registry.register(
            _ReadGauge(
                "hms_worker_threads_running_past_timeout",
                "Abandoned handler threads that have not returned yet.",
                threads_running_past_timeout,
            )
        )

    def on_outcome(self, message: StepMessage, outcome: Outcome) -> None:
        labels = (message.workflow, message.step, outcome.kind)
        self.steps.labels(*labels).inc()
        if outcome.started_at is not None and outcome.finished_at is not None:
            self.duration.labels(*labels).observe(
                max(0.0, outcome.finished_at - outcome.started_at)
            )

    def render(self) -> bytes:
        return render(self.registry)
