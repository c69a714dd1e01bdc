"""The engine's trace spans: one per batch on each traced workflow it changed."""

from __future__ import annotations

from hms_mgmt import tracing
from hms_mgmt.store.base import Batch


def record_spans(batch: Batch, start_ns: int, end_ns: int) -> None:
    """A span of this batch's work on each traced workflow it changed, under the workflow's
    trace context (the client's ``hms.start`` span): the outcomes, timers and requests
    applied and the steps published, from the batch's start to its commit. Called only when
    an SDK records spans (:func:`hms_mgmt.tracing.recording`)."""
    events: dict[str, list[str]] = {}
    published: dict[str, list[str]] = {}
    for workflow_id, _at, kind, detail in batch.history:
        events.setdefault(workflow_id, []).append(kind)
        if kind == "step_published":
            published.setdefault(workflow_id, []).append(str(detail.get("step")))
    for workflow in batch.workflows.values():
        if workflow.traceparent is None:
            continue
        tracing.record_span(
            workflow.traceparent,
            f"hms.engine {workflow.name}",
            {
                "hms.workflow": workflow.name,
                "hms.workflow_id": workflow.id,
                "hms.status": str(workflow.status),
                "hms.events": events.get(workflow.id, []),
                "hms.steps_published": published.get(workflow.id, []),
            },
            start_ns,
            end_ns,
        )
