"""Pausing a workflow: what it holds, and how every event on a paused workflow is applied.

A paused workflow's status is ``paused``; its ``pause`` keeps what it was doing:

- ``status``: the status it goes back to on resume (``pending``, ``scheduled``, ``running``
  or ``waiting``), kept up to date as outcomes arrive while paused;
- ``timer``: its frozen timer, ``{"kind", "remaining"}`` (a delayed or backed-off run, a
  wait's timeout): taken out of the store's timers and re-armed ``remaining`` seconds after
  resume;
- ``held``: the seq of a run whose step message is held, to be published on resume.

A run already out keeps going: its deadline (and its schedule-to-start limit) still runs,
and its outcome is applied. Every event on a paused workflow is applied by the same machine
to the workflow as it would be unpaused (:func:`unpaused`), and what that transition would
publish or arm is then held (:func:`hold`): a paused workflow publishes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.errors import InvalidStateError
from hms_mgmt.machine.moves import clear_timer, publish
from hms_mgmt.machine.transition import (
    TIMER_COMPENSATE,
    TIMER_RUN,
    TIMER_START,
    TIMER_WAIT,
    Transition,
)
from hms_mgmt.records import (
    StepRun,
    StepStatus,
    TypePause,
    Workflow,
    WorkflowStatus,
    branch_of,
    evolve,
)

FROZEN = (TIMER_RUN, TIMER_WAIT, TIMER_COMPENSATE)
"""Timers that freeze while paused: they start new work (a compensation chain's next one
too). A run's deadline and its schedule-to-start limit keep running: they end work out."""
HELD = "run is held while the workflow is paused: its step was never published"


def pause(workflow: Workflow, run: StepRun | None, reason: str | None, now: float) -> Transition:
    """Pause a workflow that has not finished: nothing more is published until resume."""
    if workflow.terminal:
        raise InvalidStateError(
            f"workflow {workflow.id} is already {workflow.status}; cannot pause it"
        )
    if workflow.status == WorkflowStatus.PAUSED:
        raise InvalidStateError(f"workflow {workflow.id} is already paused")
    t = Transition()
    wf = evolve(workflow, updated_at=now)
    t.workflow = wf
    kind, remaining = wf.timer_kind, _remaining(wf, now)
    hold(t, wf, {"since": now, "reason": reason, "held": None}, now)
    t.note(
        "workflow_paused",
        reason=reason,
        status=str(workflow.status),
        timer=kind if kind in FROZEN else None,
        remaining=remaining if kind in FROZEN else None,
    )
    return t


def resume(
    workflow: Workflow, run: StepRun | None, definition: WorkflowDefinition, now: float
) -> Transition:
    """Resume a paused workflow: its frozen timer re-armed with the time it had left, and
    the step message it held published."""
    pause = workflow.pause
    if workflow.status != WorkflowStatus.PAUSED or pause is None:
        raise InvalidStateError(
            f"workflow {workflow.id} is {workflow.status}, not paused; cannot resume it"
        )
    t = Transition()
    wf = evolve(workflow, updated_at=now, status=WorkflowStatus(pause["status"]), pause=None)
    t.workflow = wf
    timer = pause.get("timer")
    released = None
    if timer is not None:
        due = now + float(timer["remaining"])
        wf.timer_at, wf.timer_kind = due, timer["kind"]
        if timer["kind"] == TIMER_WAIT and wf.wait is not None:
            wf.wait = {**wf.wait, "until": due}
        if timer["kind"] == TIMER_RUN and run is not None and run.status == StepStatus.SCHEDULED:
            t.runs.append(evolve(run, due_at=due))
    held = pause.get("held")
    if run is not None and held == run.seq and run.status == StepStatus.PENDING:
        current = evolve(run)
        t.runs.append(current)
        publish(t, wf, current, definition, now)
        released = current.step
    if pause.get("branches"):  # a fan-out's branches it held
        from hms_mgmt.machine.branches import release_held

        release_held(t, wf, definition, pause["branches"])
    t.note(
        "workflow_resumed",
        paused_for=round(now - float(pause.get("since", now)), 3),
        status=str(wf.status),
        released=released,
        timer=None if timer is None else timer["kind"],
    )
    return t


def hold_for_type(t: Transition, wf: Workflow, by: TypePause, now: float) -> None:
    """A transition that would publish a step of a paused type (or of its paused step): the
    workflow is paused (``pause["type"]`` names the type pause) and holds the step; the
    type's resume releases it."""
    hold(t, wf, {"since": now, "reason": by.reason, "held": None, "type": list(by.key)}, now)
    assert wf.pause is not None
    t.note(
        "workflow_paused",
        reason=by.reason,
        type=by.workflow,
        type_step=by.step,
        status=wf.pause["status"],
    )


def paused_by(workflow: Workflow, key: tuple[str, str]) -> bool:
    """Whether the workflow is paused by the type pause ``key`` (and not by an operator)."""
    pause = workflow.pause or {}
    return workflow.status == WorkflowStatus.PAUSED and pause.get("type") == list(key)


def while_paused(
    workflow: Workflow, now: float, apply: Callable[[Workflow], Transition]
) -> Transition:
    """Apply an event to a paused workflow: ``apply`` sees it as it would be unpaused, and
    what the transition would publish or arm is held; a workflow that finishes is no longer
    paused."""
    pause = workflow.pause or {}
    t = apply(unpaused(workflow, now))
    wf = t.workflow
    if wf is None or wf.terminal:
        return t
    hold(t, wf, pause, now)
    return t


def unpaused(workflow: Workflow, now: float) -> Workflow:
    """The workflow as it would be if it had not been paused, its frozen timer re-armed now."""
    pause = workflow.pause or {}
    view = evolve(workflow, status=WorkflowStatus(pause.get("status", "running")), pause=None)
    timer = pause.get("timer")
    if timer is not None:
        view.timer_at, view.timer_kind = now + float(timer["remaining"]), timer["kind"]
    return view


def hold(t: Transition, wf: Workflow, pause: dict[str, Any], now: float) -> None:
    """Pause ``wf`` (a copy the transition carries): hold the step it would publish and
    freeze the timer that would start new work."""
    held = pause.get("held")
    if any(r.seq == held and r.status != StepStatus.PENDING for r in t.runs):
        held = None  # the run it held was cancelled (a cancel with compensate): nothing to hold
    fanned = [s.seq for s in t.steps if branch_of(s.context) is not None]
    held_branches = sorted({*pause.get("branches", []), *fanned})  # a fan-out's, held too
    ordinary = [s for s in t.steps if branch_of(s.context) is None]
    if ordinary:
        held = ordinary[-1].seq  # the workflow's current run: at most one is published
    if t.steps:
        t.steps = []
        t.history = [
            ("step_held", detail) if kind == "step_published" else (kind, detail)
            for kind, detail in t.history
        ]
        if wf.timer_kind == TIMER_START:  # its limit starts when it is published
            clear_timer(wf)
    timer = None
    if wf.timer_kind in FROZEN and wf.timer_at is not None:
        timer = {"kind": wf.timer_kind, "remaining": _remaining(wf, now)}
        clear_timer(wf)
    status = wf.status if wf.status != WorkflowStatus.PAUSED else pause.get("status", "running")
    wf.pause = {**pause, "status": str(status), "timer": timer, "held": held}
    if held_branches:
        wf.pause["branches"] = held_branches
    wf.status = WorkflowStatus.PAUSED


def _remaining(wf: Workflow, now: float) -> float | None:
    return None if wf.timer_at is None else max(0.0, round(wf.timer_at - now, 6))
