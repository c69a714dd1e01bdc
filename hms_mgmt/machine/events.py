"""The state machine's events: pure functions from a workflow, its current run and an event
to a :class:`~hms_mgmt.machine.transition.Transition`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.errors import InvalidStateError, UnknownStepError
from hms_mgmt.machine import branches, children, compensation
from hms_mgmt.machine.moves import (
    clear_timer,
    compensate_next,
    copy,
    enter,
    fail,
    finish,
    give_up,
    give_up_workflow,
    new_run,
    publish,
    resume,
    set_deadline,
    stale_reason,
    succeed,
)
from hms_mgmt.machine.pause import FROZEN, HELD, while_paused
from hms_mgmt.machine.transition import (
    TIMER_BRANCH,
    TIMER_COMPENSATE,
    TIMER_DEADLINE,
    TIMER_RUN,
    TIMER_START,
    TIMER_WAIT,
    Transition,
)
from hms_mgmt.records import ACTIVE_RUN, StepRun, StepStatus, Workflow, WorkflowStatus, evolve
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.requests import SIGNALS_ON_RESET


def start(
    definition: WorkflowDefinition,
    workflow_id: str,
    payload: Any,
    now: float,
    *,
    run_at: float | None = None,
    idempotency_key: str | None = None,
    traceparent: str | None = None,
    attributes: dict[str, str] | None = None,
    priority: int = 3,
) -> Transition:
    """A new workflow, its first step published now or scheduled for ``run_at``, with its
    business keys (``attributes``) and its ``priority`` (1 first, 5 last)."""
    workflow = Workflow(
        id=workflow_id,
        name=definition.name,
        version=definition.version,
        status=WorkflowStatus.PENDING,
        input=payload,
        created_at=now,
        updated_at=now,
        idempotency_key=idempotency_key,
        traceparent=traceparent,
        priority=priority,
    )
    t = Transition(workflow=workflow, attributes=dict(attributes or {}))
    t.note("workflow_started", workflow=definition.name, version=definition.version)
    enter(t, definition, definition.steps[0].name, payload, now, due_at=run_at)
    return t


def apply_outcome(
    workflow: Workflow, run: StepRun, definition: WorkflowDefinition, outcome: Outcome, now: float
) -> Transition:
    """A worker's report on a run; reports on any run but the current active one are ignored."""
    if workflow.status == WorkflowStatus.PAUSED:  # applied, and what it leads to held
        pause = workflow.pause or {}
        if pause.get("held") == outcome.seq or outcome.seq in pause.get("branches", ()):
            t = Transition()
            t.note("outcome_ignored", seq=outcome.seq, kind=outcome.kind, reason=HELD)
            return t
        return while_paused(
            workflow, now, lambda view: apply_outcome(view, run, definition, outcome, now)
        )
    fanned = branches.outcome(workflow, definition, outcome, now)
    if fanned is not None:  # a fan-out's branch, whatever the workflow's latest run
        return fanned
    t = Transition()
    stale = stale_reason(workflow, run, outcome.seq)
    if stale is None and outcome.kind == "started" and run.status != StepStatus.PENDING:
        stale = "run has already started"
    if stale is not None:
        t.note("outcome_ignored", seq=outcome.seq, kind=outcome.kind, reason=stale)
        return t
    wf, current = copy(workflow, run, t, now)
    if wf.status == WorkflowStatus.PENDING:
        wf.status = WorkflowStatus.RUNNING
    if outcome.kind == "started":
        current.status = StepStatus.RUNNING
        current.started_at = outcome.started_at or now
        if wf.timer_kind == TIMER_START:
            clear_timer(wf)
        set_deadline(wf, current, definition, from_time=current.started_at)
        t.note("step_started", seq=current.seq, step=current.step, attempt=current.attempt)
    elif outcome.kind == "heartbeat":
        set_deadline(wf, current, definition, from_time=now)
    elif outcome.kind == "succeeded":
        current.started_at = outcome.started_at or current.started_at or now
        current.finished_at = outcome.finished_at or now
        succeed(t, wf, current, definition, outcome.result or {}, outcome.handler, now)
    else:
        current.started_at = outcome.started_at or current.started_at or now
        current.finished_at = outcome.finished_at or now
        fail(t, wf, current, definition, dict(outcome.error or {}), now)
    return t


def dead_lettered(
    workflow: Workflow,
    run: StepRun,
    definition: WorkflowDefinition,
    seq: int,
    reason: str,
    now: float,
) -> Transition:
    """The broker gave a run's message up (delivery limit), or the poison guard did
    (``poison_guard``, on a classic step queue): a failed attempt."""
    if workflow.status == WorkflowStatus.PAUSED:
        if (workflow.pause or {}).get("held") == seq:
            t = Transition()
            t.note("dead_letter_ignored", seq=seq, reason=HELD, broker_reason=reason)
            return t
        return while_paused(
            workflow, now, lambda view: dead_lettered(view, run, definition, seq, reason, now)
        )
    error = {
        "type": "DeliveryLimitExceeded"
        if reason in ("delivery_limit", "poison_guard")
        else "MessageRejected",
        "message": f"the broker dead-lettered the step message ({reason}): "
        "its worker crashed or refused it on every delivery"
        if reason != "poison_guard"
        else "the step message was delivered more times than its limit without an outcome "
        "(poison guard): its worker crashed on every delivery",
        "retryable": True,
    }
    t = Transition()
    stale = stale_reason(workflow, run, seq)
    if stale is not None:
        t.note("dead_letter_ignored", seq=seq, reason=stale, broker_reason=reason)
        return t
    fanned = branches.dead_lettered(workflow, definition, seq, error, now)
    if fanned is not None:
        return fanned
    wf, current = copy(workflow, run, t, now)
    current.finished_at = now
    fail(t, wf, current, definition, error, now)
    return t


def fire_timer(
    workflow: Workflow, run: StepRun, definition: WorkflowDefinition, kind: str, now: float
) -> Transition:
    """A durable timer came due; a timer the workflow no longer has changes nothing."""
    if workflow.status == WorkflowStatus.PAUSED:  # a run's deadline still runs; the rest froze
        if kind in FROZEN:
            return Transition()
        return while_paused(
            workflow, now, lambda view: fire_timer(view, run, definition, kind, now)
        )
    if kind == TIMER_BRANCH:
        return branches.fire(workflow, definition, now)
    t = Transition()
    if workflow.terminal or workflow.timer_kind != kind or workflow.timer_at is None:
        return t  # a timer left over from an earlier state
    if workflow.timer_at > now:
        return t
    due = (
        (kind == TIMER_RUN and run.status == StepStatus.SCHEDULED)
        or (kind == TIMER_START and run.status == StepStatus.PENDING)
        or (kind == TIMER_DEADLINE and run.status in (StepStatus.PENDING, StepStatus.RUNNING))
        or (
            kind == TIMER_WAIT
            and workflow.status == WorkflowStatus.WAITING
            and workflow.wait is not None
        )
    )
    if not due:
        return t
    wf, current = copy(workflow, run, t, now)
    clear_timer(wf)
    if kind == TIMER_RUN:
        current.status = StepStatus.PENDING
        if wf.status == WorkflowStatus.SCHEDULED:
            wf.status = WorkflowStatus.PENDING
        publish(t, wf, current, definition, now)
    elif kind == TIMER_START:
        waited = definition.schedule_to_start_for(current.step) or 0.0
        current.finished_at = now
        error = {
            "type": "ScheduleToStartTimeout",
            "message": f"step {current.step!r} attempt {current.attempt} was not started by any "
            f"step service within {waited:g}s (is one serving {wf.name}.{current.step}, and "
            "does it have free slots?)",
            "retryable": True,
        }
        fail(t, wf, current, definition, error, now, status=StepStatus.TIMED_OUT)
    elif kind == TIMER_DEADLINE:
        timeout = definition.timeout_for(current.step) or 0.0
        current.finished_at = now
        error = {
            "type": "StepTimeout",
            "message": f"step {current.step!r} attempt {current.attempt} did not finish "
            f"within {timeout:g}s",
            "retryable": True,
        }
        fail(t, wf, current, definition, error, now, status=StepStatus.TIMED_OUT)
    else:
        assert wf.wait is not None
        event = wf.wait["event"]
        wf.wait = None
        failure = {
            "type": "WaitTimeout",
            "message": f"signal {event!r} did not arrive in time",
            "step": current.step,
            "seq": current.seq,
            "attempts": current.attempt,
            "reason": "wait timed out",
        }
        t.note("wait_timed_out", event=event)
        give_up(t, wf, current, definition, failure, now, dead_letter=False)
    return t


def cancel(
    workflow: Workflow,
    run: StepRun | None,
    reason: str | None,
    now: float,
    *,
    compensate: bool = False,
    definition: WorkflowDefinition | None = None,
    held: int | None = None,
) -> Transition:
    """Cancel a workflow that has not finished; later outcomes of its run are ignored.

    With ``compensate`` (and its ``definition``), it compensates the steps that succeeded
    before it ends (``compensated``), if a step with a compensation was entered. A run of a
    step with a compensation that is out (published or started) is let finish first, so
    that its effect, if it succeeded, is undone too; any other run is cancelled. A paused
    workflow stays paused, its chain held until resume (``held``: the seq of the run a
    pause held unpublished). A plain cancel of a compensating workflow stops its chain:
    ``cancelled``."""
    if workflow.terminal:
        raise InvalidStateError(
            f"workflow {workflow.id} is already {workflow.status}; cannot cancel it"
        )
    if compensate:
        if definition is None:
            raise InvalidStateError("a cancel with compensate needs the workflow's definition")
        status = (workflow.pause or {}).get("status") or workflow.status
        if status == WorkflowStatus.COMPENSATING:
            raise InvalidStateError(
                f"workflow {workflow.id} is already compensating; a cancel without "
                "compensate stops its compensations"
            )
        if workflow.status == WorkflowStatus.PAUSED:
            pause = workflow.pause or {}
            return while_paused(
                workflow,
                now,
                lambda view: cancel(
                    view,
                    run,
                    reason,
                    now,
                    compensate=True,
                    definition=definition,
                    held=pause.get("held"),
                ),
            )
    t = Transition()
    wf = evolve(workflow, updated_at=now)
    t.workflow = wf
    error = {"type": "Cancelled", "message": reason or "cancelled"}
    t.note("workflow_cancelled", reason=reason, compensate=compensate)
    if (
        compensate
        and definition is not None
        and run is not None
        and definition.compensation_of(run.step) is not None
        and compensation.compensated_seq(run) is None
        and not branches.is_open(workflow)  # a fan-out's branches are cancelled, not awaited
        and (
            run.status == StepStatus.RUNNING
            or (run.status == StepStatus.PENDING and held != run.seq)
        )
    ):  # out: its outcome decides whether it is undone; its deadline still runs
        wf.status = WorkflowStatus.COMPENSATING
        wf.error = error
        wf.wait = None
        t.note("compensation_started", error="Cancelled", waiting_for=run.seq)
        return t
    if run is not None and run.status in ACTIVE_RUN:
        current = evolve(run, status=StepStatus.CANCELLED, finished_at=now)
        t.runs.append(current)
    branches.close(t, wf, now, why=f"cancelled: {reason}" if reason else "cancelled")
    if compensate and definition is not None:
        clear_timer(wf)
        give_up_workflow(t, wf, definition, error, now, status=WorkflowStatus.CANCELLED)
    else:
        finish(t, wf, WorkflowStatus.CANCELLED, error=error)
    children.cascade(t, workflow, reason)
    return t


def compensate(
    workflow: Workflow,
    run: StepRun | None,
    definition: WorkflowDefinition,
    runs: Iterable[StepRun],
    now: float,
) -> Transition:
    """The ``compensate`` timer fired: start the next compensation (see
    :mod:`~hms_mgmt.machine.compensation`), or end the chain. ``runs``: all the workflow's
    runs, as stored with this batch's changes."""
    t = Transition()
    if (
        workflow.status != WorkflowStatus.COMPENSATING
        or workflow.timer_kind != TIMER_COMPENSATE
        or workflow.timer_at is None
        or workflow.timer_at > now
        or (
            run is not None
            and run.status in ACTIVE_RUN
            and branches.owns(workflow, run.seq) is None  # a failed fan-out's late branch
        )  # is not awaited: its outcome is recorded and ignored
    ):
        return t  # left over from an earlier state, or frozen by a pause
    runs = list(runs)
    wf = evolve(workflow, updated_at=now)
    t.workflow = wf
    clear_timer(wf)
    found = compensation.next_compensation(wf, definition, runs)
    if found is not None:
        step, target, visit, context = found
        too_large = compensation.too_large(step, target)
        if too_large is not None:  # its step message could not carry both
            finish(
                t, wf, WorkflowStatus.FAILED, error=compensation.unsent(wf, step, target, too_large)
            )
            return t
        t.note("compensating", step=step, compensated_step=target.step, compensated_seq=target.seq)
        new_run(t, wf, definition, step, target.input, now, visit=visit, attempt=1, context=context)
    elif run is not None and compensation.compensated_seq(run) is not None:
        t.note("compensation_finished")
        finish(t, wf, WorkflowStatus.COMPENSATED, error=wf.error)
    else:  # no step with a compensation succeeded: it ends as it would have without
        t.note("compensation_finished", nothing=True)
        cancelled = (wf.error or {}).get("type") == "Cancelled"
        status = WorkflowStatus.CANCELLED if cancelled else WorkflowStatus.FAILED
        finish(t, wf, status, error=wf.error)
    return t


def retry(
    workflow: Workflow, failed_run: StepRun, definition: WorkflowDefinition, now: float
) -> Transition:
    """Resume a failed workflow from its failed step with a fresh series of attempts; one
    whose compensation gave up resumes its compensations, from that one."""
    if workflow.status != WorkflowStatus.FAILED:
        raise InvalidStateError(
            f"workflow {workflow.id} is {workflow.status}; only a failed workflow can be retried"
        )
    t = Transition()
    error = workflow.error or {}
    if error.get("reason") == compensation.COMPENSATION_FAILED:
        original = error.get("original")
        wf = evolve(
            workflow,
            updated_at=now,
            status=WorkflowStatus.COMPENSATING,
            error=original if isinstance(original, dict) else None,
            retries=workflow.retries + 1,
        )
        t.workflow = wf
        t.note("workflow_retried", step=error.get("step"), from_seq=error.get("seq"))
        compensate_next(wf, now)
        return t
    if branches.failed_by_branches(workflow):  # its failed branches run again, not its step
        return branches.retry_group(workflow, definition, now)
    if branches.join_too_large(workflow):
        assert workflow.branches is not None
        raise InvalidStateError(
            f"cannot retry workflow {workflow.id}: the outputs of its branches are over the "
            "message limit for its join, and would be again (reset it to step "
            f"{workflow.branches['step']!r} to fan out afresh)"
        )
    if children.failed_by_child(workflow):  # its children are retried, not its step
        return children.retry_parent(workflow, definition, now)
    wf = evolve(
        workflow,
        updated_at=now,
        status=WorkflowStatus.RUNNING,
        error=None,
        output=None,
        retries=workflow.retries + 1,
    )
    t.workflow = wf
    t.note("workflow_retried", step=failed_run.step, from_seq=failed_run.seq)
    new_run(
        t,
        wf,
        definition,
        failed_run.step,
        failed_run.input,
        now,
        visit=failed_run.visit,
        attempt=1,
        context=failed_run.context,
    )
    return t


def signal(
    workflow: Workflow,
    run: StepRun,
    definition: WorkflowDefinition,
    name: str,
    data: Any,
    now: float,
) -> Transition:
    """Deliver a signal: resume a workflow waiting for it, or keep it for a wait to come."""
    if workflow.terminal:
        raise InvalidStateError(
            f"workflow {workflow.id} is already {workflow.status}; cannot signal it"
        )
    if workflow.status == WorkflowStatus.PAUSED:  # kept; a wait it ends holds its next step
        return while_paused(
            workflow, now, lambda view: signal(view, run, definition, name, data, now)
        )
    t = Transition()
    wf = evolve(workflow, updated_at=now)
    t.workflow = wf
    t.note("signal_received", signal=name)
    if wf.status == WorkflowStatus.WAITING and wf.wait is not None and wf.wait["event"] == name:
        resume(t, wf, definition, data, now)
    else:
        wf.signals = {**wf.signals, name: data}
    return t


def reset(
    workflow: Workflow,
    run: StepRun | None,
    definition: WorkflowDefinition,
    to_step: str,
    last: StepRun | None,
    now: float,
    *,
    data: Any = None,
    has_data: bool = False,
    signals: str = "keep",
    reason: str | None = None,
) -> Transition:
    """Go back to ``to_step`` (whatever the workflow's status): a new visit of it, with a new
    idempotency key, with ``data`` or the input of its last run (``last``). The current run,
    if still out, is cancelled: its late outcome is ignored. Kept signals are kept, or
    dropped (``signals="drop"``). A paused workflow stays paused, the new run held."""
    if workflow.status == WorkflowStatus.PAUSED:
        return while_paused(
            workflow,
            now,
            lambda view: reset(
                view,
                run,
                definition,
                to_step,
                last,
                now,
                data=data,
                has_data=has_data,
                signals=signals,
                reason=reason,
            ),
        )
    ordinary = [step.name for step in definition.steps]
    if to_step not in ordinary:
        what = (
            "its compensation step"
            if definition.is_compensation(to_step)
            else "its error step"
            if to_step in definition.step_names
            else "no step"
        )
        raise UnknownStepError(
            f"cannot reset workflow {workflow.id} to {to_step!r}: {definition.name} "
            f"v{definition.version} has {what} {to_step!r}; its steps are {', '.join(ordinary)}"
        )
    if signals not in SIGNALS_ON_RESET:
        raise InvalidStateError(f"signals must be 'keep' or 'drop', not {signals!r}")
    context: dict[str, Any] | None = None
    if has_data:
        payload = data
    elif last is not None:
        payload, context = last.input, last.context
    elif to_step == definition.steps[0].name:
        payload = workflow.input
    else:
        raise InvalidStateError(
            f"step {to_step!r} has not run in workflow {workflow.id}, so it has no input to "
            "run it again with: give the data to reset it with"
        )
    t = Transition()
    wf = evolve(
        workflow,
        updated_at=now,
        status=WorkflowStatus.RUNNING,
        output=None,
        error=None,
        wait=None,
        # A failed workflow run again is retried, as far as counting its failures goes: one
        # that fails again is a refailure, not one more failed workflow.
        retries=workflow.retries + (workflow.status == WorkflowStatus.FAILED),
    )
    clear_timer(wf)
    t.workflow = wf
    if signals == "drop":
        wf.signals = {}
    if run is not None and run.status in ACTIVE_RUN:
        t.runs.append(
            evolve(
                run,
                status=StepStatus.CANCELLED,
                finished_at=now,
                error={"type": "Reset", "message": f"superseded by a reset to {to_step!r}"},
            )
        )
    branches.close(t, wf, now, why=f"superseded by a reset to {to_step!r}")
    t.note(
        "workflow_reset",
        to_step=to_step,
        status=str(workflow.status),
        from_seq=workflow.seq,
        data=has_data,
        signals=signals,
        reason=reason,
    )
    enter(t, definition, to_step, payload, now, workflow=wf, context=context)
    if children.waits_for(workflow, workflow.children):  # their outputs would go nowhere
        children.cascade(t, workflow, reason, how=f"reset to {to_step!r}")
    return t
