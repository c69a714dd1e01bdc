"""Follow-ups: what a batch's transitions ask of other workflows, applied in that batch.

A step that starts child workflows, a child that ends, a parent cancelled or retried: each
transition lists what it asks of the other workflows (:data:`~hms_mgmt.machine.FollowUp`).
After the batch's events are applied, the engine (:func:`~hms_mgmt.engine.engine.follow_up`)
loads the workflows those follow-ups name (those it has not loaded already) and applies
them here, round after round (a follow-up may cause more: a grandchild's end ends a child,
which tells its parent), all before the one commit. So a child's end and its parent's
resume, or a parent's cancel and its children's, are one transaction: no crash can come
between them. Pure, like the apply stage that calls it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from hms_mgmt import machine
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.engine.work import Work
from hms_mgmt.machine.transition import (
    CancelChild,
    ChildFinished,
    FollowUp,
    RetryChild,
    StartChild,
)
from hms_mgmt.records import StepRun, Workflow, WorkflowStatus
from hms_mgmt.wire.outcomes import Outcome

if TYPE_CHECKING:
    from hms_mgmt.engine.apply import Applier

FOLLOW_UPS = (StartChild, ChildFinished, CancelChild, RetryChild)


def apply(applier: Applier, event: FollowUp, work: Work, now: float) -> None:
    """One follow-up: on a workflow not there, or no longer in the state it asks for, it
    changes nothing (a child started before, a child finished before its cancel)."""
    found = work.state.get(event.workflow_id)
    if isinstance(event, StartChild):
        if found is not None:  # started before: a child's id is its parent's step run's
            detail = {"parent": event.parent["id"], "reason": "already started"}
            work.batch.history.append((event.workflow_id, now, "child_start_ignored", detail))
            work.count_child(event.parent, -1)  # counted when its start was asked for
            return
        definition = applier.registry.named(event.workflow)
        t = machine.children.started(definition, event, now)
        applier.record(work, t, event.workflow_id, now)
        work.started += 1
        return
    if found is None:
        kind = type(event).__name__
        work.log(
            "warning", "follow-up for a missing workflow", workflow_id=event.workflow_id, kind=kind
        )
        return
    workflow, run = found
    if isinstance(event, ChildFinished):
        definition = applier.registry.of(workflow)
        t = machine.children.child_finished(workflow, run, definition, event, now)
    elif isinstance(event, CancelChild):
        if workflow.terminal:
            return
        t = machine.cancel(workflow, run, event.reason, now)
    else:
        if workflow.status != WorkflowStatus.FAILED or run is None:
            detail = {"reason": f"the child is {workflow.status}, not failed"}
            work.batch.history.append((workflow.id, now, "child_retry_ignored", detail))
            return
        failed = work.failed_run(workflow, run)
        t = machine.retry(workflow, failed, applier.registry.of(workflow), now)
    applier.record(work, t, workflow.id, now)


INVALID_CHILD = "InvalidChild"
"""The error of a step whose handler returned children that cannot start."""


def checked(
    outcome: Outcome,
    definition: WorkflowDefinition,
    known: Collection[str],
    run: StepRun,
    workflow: Workflow,
    families: Mapping[str, int] | None = None,
) -> Outcome:
    """A succeeded outcome whose children cannot start (a workflow not defined, a bad
    shape, nested too deep, a family that would grow too big) becomes a failed one, not
    retried, naming what is wrong: as a bad next_step. ``families``: the size of each
    family, by its root's id, as loaded and grown in this batch."""
    handler = outcome.handler or f"the handler of {definition.name}.{run.step}"
    error_step = definition.on_error is not None and run.step == definition.on_error.name
    problem = machine.children.problem(
        outcome.result or {},
        known,
        handler,
        error_step=error_step,
        depth=machine.children.depth_of(workflow),
        family=(families or {}).get(machine.children.root_of(workflow)),
    )
    if problem is None:
        return outcome
    error = {"type": INVALID_CHILD, "message": problem, "retryable": False}
    return dataclasses.replace(outcome, kind="failed", result=None, error=error)
