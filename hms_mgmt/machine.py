"""The workflow state machine: pure functions from a state and an event to a transition.

Nothing here does I/O or reads the clock: the engine passes ``now`` in, loads
the workflow and its current run, applies the returned :class:`Transition`
to the store in one transaction together with the messages it causes, and
only then acks what it consumed. The same code runs on every bus and store.

Every function takes the workflow and its current (latest) run and leaves
them untouched; the transition carries changed copies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.errors import InvalidStateError
from hms_mgmt.records import ACTIVE_RUN, StepRun, StepStatus, Workflow, WorkflowStatus
from hms_mgmt.wire.codec import MAX_PAYLOAD_BYTES, dumps
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.steps import StepMessage

TIMER_RUN = "run"  # a scheduled run (delayed step, retry backoff) is due
TIMER_DEADLINE = "deadline"  # a started run has not finished in time
TIMER_WAIT = "wait"  # a wait for a signal has run out
TIMER_START = "start"  # a published run has not been started by any step service in time


@dataclass
class DeadLetter:
    """A given-up run whose step message goes into its ``.dlq``."""

    run: StepRun
    workflow: str
    reason: str
    attempts: int
    error: dict[str, Any] | None


@dataclass
class Transition:
    """What an event changed: the new workflow, runs created or changed, history, messages."""

    workflow: Workflow | None = None
    runs: list[StepRun] = field(default_factory=list)
    history: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    steps: list[StepMessage] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.workflow is not None

    @property
    def finished(self) -> bool:
        return self.workflow is not None and self.workflow.terminal

    def note(self, event: str, /, **detail: Any) -> None:
        self.history.append((event, detail))


def start(
    definition: WorkflowDefinition,
    workflow_id: str,
    payload: Any,
    now: float,
    *,
    run_at: float | None = None,
    idempotency_key: str | None = None,
    traceparent: str | None = None,
) -> Transition:
    """A new workflow, its first step published now or scheduled for ``run_at``."""
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
    )
    t = Transition(workflow=workflow)
    t.note("workflow_started", workflow=definition.name, version=definition.version)
    _enter(t, definition, definition.steps[0].name, payload, now, due_at=run_at)
    return t


def apply_outcome(
    workflow: Workflow, run: StepRun, definition: WorkflowDefinition, outcome: Outcome, now: float
) -> Transition:
    """A worker's report on a run; reports on any run but the current active one are ignored."""
    t = Transition()
    stale = _stale_reason(workflow, run, outcome.seq)
    if stale is None and outcome.kind == "started" and run.status != StepStatus.PENDING:
        stale = "run has already started"
    if stale is not None:
        t.note("outcome_ignored", seq=outcome.seq, kind=outcome.kind, reason=stale)
        return t
    wf, current = _copy(workflow, run, t, now)
    if wf.status == WorkflowStatus.PENDING:
        wf.status = WorkflowStatus.RUNNING
    if outcome.kind == "started":
        current.status = StepStatus.RUNNING
        current.started_at = outcome.started_at or now
        if wf.timer_kind == TIMER_START:
            _clear_timer(wf)
        _set_deadline(wf, current, definition, from_time=current.started_at)
        t.note("step_started", seq=current.seq, step=current.step, attempt=current.attempt)
    elif outcome.kind == "heartbeat":
        _set_deadline(wf, current, definition, from_time=now)
    elif outcome.kind == "succeeded":
        current.started_at = outcome.started_at or current.started_at or now
        current.finished_at = outcome.finished_at or now
        _succeed(t, wf, current, definition, outcome.result or {}, outcome.handler, now)
    else:
        current.started_at = outcome.started_at or current.started_at or now
        current.finished_at = outcome.finished_at or now
        _fail(t, wf, current, definition, dict(outcome.error or {}), now)
    return t


def dead_lettered(
    workflow: Workflow,
    run: StepRun,
    definition: WorkflowDefinition,
    seq: int,
    reason: str,
    now: float,
) -> Transition:
    """The broker gave a run's message up (delivery limit): a failed attempt."""
    t = Transition()
    stale = _stale_reason(workflow, run, seq)
    if stale is not None:
        t.note("dead_letter_ignored", seq=seq, reason=stale, broker_reason=reason)
        return t
    wf, current = _copy(workflow, run, t, now)
    current.finished_at = now
    error = {
        "type": "DeliveryLimitExceeded" if reason == "delivery_limit" else "MessageRejected",
        "message": f"the broker dead-lettered the step message ({reason}): "
        "its worker crashed or refused it on every delivery",
        "retryable": True,
    }
    _fail(t, wf, current, definition, error, now)
    return t


def fire_timer(
    workflow: Workflow, run: StepRun, definition: WorkflowDefinition, kind: str, now: float
) -> Transition:
    """A durable timer came due; a timer the workflow no longer has changes nothing."""
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
    wf, current = _copy(workflow, run, t, now)
    _clear_timer(wf)
    if kind == TIMER_RUN:
        current.status = StepStatus.PENDING
        if wf.status == WorkflowStatus.SCHEDULED:
            wf.status = WorkflowStatus.PENDING
        _publish(t, wf, current, definition, now)
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
        _fail(t, wf, current, definition, error, now, status=StepStatus.TIMED_OUT)
    elif kind == TIMER_DEADLINE:
        timeout = definition.timeout_for(current.step) or 0.0
        current.finished_at = now
        error = {
            "type": "StepTimeout",
            "message": f"step {current.step!r} attempt {current.attempt} did not finish "
            f"within {timeout:g}s",
            "retryable": True,
        }
        _fail(t, wf, current, definition, error, now, status=StepStatus.TIMED_OUT)
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
        _give_up(t, wf, current, definition, failure, now, dead_letter=False)
    return t


def cancel(workflow: Workflow, run: StepRun | None, reason: str | None, now: float) -> Transition:
    """Cancel a workflow that has not finished; later outcomes of its run are ignored."""
    if workflow.terminal:
        raise InvalidStateError(
            f"workflow {workflow.id} is already {workflow.status}; cannot cancel it"
        )
    t = Transition()
    wf = replace(workflow, updated_at=now)
    t.workflow = wf
    if run is not None and run.status in ACTIVE_RUN:
        current = replace(run, status=StepStatus.CANCELLED, finished_at=now)
        t.runs.append(current)
    _finish(
        t,
        wf,
        WorkflowStatus.CANCELLED,
        error={"type": "Cancelled", "message": reason or "cancelled"},
    )
    t.note("workflow_cancelled", reason=reason)
    return t


def retry(
    workflow: Workflow, failed_run: StepRun, definition: WorkflowDefinition, now: float
) -> Transition:
    """Resume a failed workflow from its failed step with a fresh series of attempts."""
    if workflow.status != WorkflowStatus.FAILED:
        raise InvalidStateError(
            f"workflow {workflow.id} is {workflow.status}; only a failed workflow can be retried"
        )
    t = Transition()
    wf = replace(workflow, updated_at=now, status=WorkflowStatus.RUNNING, error=None, output=None)
    t.workflow = wf
    t.note("workflow_retried", step=failed_run.step, from_seq=failed_run.seq)
    _new_run(
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
    t = Transition()
    wf = replace(workflow, updated_at=now)
    t.workflow = wf
    t.note("signal_received", signal=name)
    if wf.status == WorkflowStatus.WAITING and wf.wait is not None and wf.wait["event"] == name:
        _resume(t, wf, definition, data, now)
    else:
        wf.signals = {**wf.signals, name: data}
    return t


# -- the parts ---------------------------------------------------------------


def _stale_reason(workflow: Workflow, run: StepRun, seq: int) -> str | None:
    if workflow.terminal:
        return f"workflow is {workflow.status}"
    if seq != run.seq:
        return f"run {seq} is not the current run ({run.seq})"
    if run.status not in (StepStatus.PENDING, StepStatus.RUNNING):
        return f"run is {run.status}"
    return None


def _copy(workflow: Workflow, run: StepRun, t: Transition, now: float) -> tuple[Workflow, StepRun]:
    wf = replace(workflow, updated_at=now)
    current = replace(run)
    t.workflow = wf
    t.runs.append(current)
    return wf, current


def _succeed(
    t: Transition,
    wf: Workflow,
    run: StepRun,
    definition: WorkflowDefinition,
    result: dict[str, Any],
    handler: str | None,
    now: float,
) -> None:
    data = result.get("data")
    next_step = result.get("next_step")
    if next_step is not None and definition.step(next_step) is None:
        message = (
            f"handler {handler or '?'} of {wf.name}.{run.step} returned next_step {next_step!r}, "
            f"which is not a step of workflow {wf.name!r} (steps: {', '.join(definition.step_names)})"
        )
        _fail(
            t,
            wf,
            run,
            definition,
            {"type": "InvalidNextStep", "message": message, "retryable": False},
            now,
        )
        return
    run.status = StepStatus.SUCCEEDED
    run.output = data
    _clear_timer(wf)
    t.note("step_succeeded", seq=run.seq, step=run.step, attempt=run.attempt)
    error_step = definition.on_error is not None and run.step == definition.on_error.name
    if result.get("complete"):
        _finish(t, wf, WorkflowStatus.SUCCEEDED, output=data)
        return
    if result.get("wait_for"):
        _wait(t, wf, run, definition, result, now)
        return
    if next_step is None:
        if error_step:
            t.note("error_path_finished", step=run.step)
            _finish(t, wf, WorkflowStatus.FAILED, error=wf.error)
            return
        next_step = definition.next_after(run.step)
        if next_step is None:
            _finish(t, wf, WorkflowStatus.SUCCEEDED, output=data)
            return
    if error_step:
        wf.error = None  # the error step chose to carry on
    _enter(t, definition, next_step, data, now, due_at=_due(result, now), workflow=wf)


def _fail(
    t: Transition,
    wf: Workflow,
    run: StepRun,
    definition: WorkflowDefinition,
    error: dict[str, Any],
    now: float,
    *,
    status: StepStatus = StepStatus.FAILED,
) -> None:
    run.status = status
    run.error = error
    _clear_timer(wf)
    policy = definition.policy_for(run.step)
    retryable = bool(error.get("retryable", True)) and not policy.is_non_retryable(
        error.get("types") or [str(error.get("type", ""))]
    )
    t.note(
        "step_timed_out" if status == StepStatus.TIMED_OUT else "step_failed",
        seq=run.seq,
        step=run.step,
        attempt=run.attempt,
        error_type=error.get("type"),
        message=error.get("message"),
    )
    if retryable and run.attempt < policy.max_attempts:
        asked = error.get("retry_delay")
        delay = (
            float(asked)
            if isinstance(asked, int | float) and asked >= 0
            else policy.delay_after(run.attempt, _draw(wf.id, run.seq))
        )
        _new_run(
            t,
            wf,
            definition,
            run.step,
            run.input,
            now,
            visit=run.visit,
            attempt=run.attempt + 1,
            context=run.context,
            due_at=now + delay,
        )
        t.note("retry_scheduled", step=run.step, attempt=run.attempt + 1, delay=round(delay, 3))
        return
    failure = {
        "step": run.step,
        "seq": run.seq,
        "attempts": run.attempt,
        "type": error.get("type"),
        "message": error.get("message"),
        "traceback": error.get("traceback"),
        "reason": "attempts exhausted" if retryable else "not retryable",
    }
    _give_up(t, wf, run, definition, failure, now, dead_letter=True)


def _give_up(
    t: Transition,
    wf: Workflow,
    run: StepRun,
    definition: WorkflowDefinition,
    failure: dict[str, Any],
    now: float,
    *,
    dead_letter: bool,
) -> None:
    error_step = definition.on_error
    if error_step is not None and run.step != error_step.name:
        wf.error = failure
        t.note("error_path", step=error_step.name, failed_step=failure["step"])
        _new_run(
            t,
            wf,
            definition,
            error_step.name,
            run.input,
            now,
            visit=wf.visits.get(error_step.name, 0) + 1,
            attempt=1,
            context={"error": failure},
        )
        return
    if wf.error is not None and run.step == getattr(error_step, "name", None):
        failure = {**wf.error, "error_path": failure}
    _finish(t, wf, WorkflowStatus.FAILED, error=failure)
    if dead_letter:
        t.dead_letters.append(
            DeadLetter(run, wf.name, str(failure.get("reason")), run.attempt, run.error)
        )


def _wait(
    t: Transition,
    wf: Workflow,
    run: StepRun,
    definition: WorkflowDefinition,
    result: dict[str, Any],
    now: float,
) -> None:
    event = str(result["wait_for"])
    next_step = result.get("next_step") or definition.next_after(run.step)
    timeout = result.get("timeout")
    wf.wait = {
        "event": event,
        "next_step": next_step,
        "data": result.get("data"),
        "until": None if timeout is None else now + float(timeout),
        "since": now,
    }
    t.note("waiting", event=event, until=wf.wait["until"])
    if event in wf.signals:
        signals = dict(wf.signals)
        data = signals.pop(event)
        wf.signals = signals
        _resume(t, wf, definition, data, now)
        return
    wf.status = WorkflowStatus.WAITING
    if timeout is not None:
        wf.timer_at, wf.timer_kind = now + float(timeout), TIMER_WAIT


def _resume(
    t: Transition, wf: Workflow, definition: WorkflowDefinition, signal_data: Any, now: float
) -> None:
    assert wf.wait is not None
    wait, wf.wait = wf.wait, None
    _clear_timer(wf)
    wf.status = WorkflowStatus.RUNNING
    t.note("resumed", event=wait["event"])
    next_step = wait["next_step"]
    if next_step is None:
        _finish(t, wf, WorkflowStatus.SUCCEEDED, output=wait["data"])
        return
    size = len(dumps(wait["data"])) + len(dumps(signal_data))
    if size > MAX_PAYLOAD_BYTES:  # the next step's message could not carry both
        failure = {
            "type": "PayloadError",
            "message": f"the data of {wait['event']!r} and of the wait before it come to "
            f"{size} bytes of JSON; a step message carries at most {MAX_PAYLOAD_BYTES}",
            "step": next_step,
            "reason": "payload too large",
        }
        _finish(t, wf, WorkflowStatus.FAILED, error=failure)
        return
    _enter(
        t, definition, next_step, wait["data"], now, workflow=wf, context={"signal": signal_data}
    )


def _enter(
    t: Transition,
    definition: WorkflowDefinition,
    step: str,
    payload: Any,
    now: float,
    *,
    due_at: float | None = None,
    workflow: Workflow | None = None,
    context: dict[str, Any] | None = None,
) -> None:
    """Go into a step afresh (a new visit, attempt 1)."""
    wf = workflow or t.workflow
    assert wf is not None
    _new_run(
        t,
        wf,
        definition,
        step,
        payload,
        now,
        visit=wf.visits.get(step, 0) + 1,
        attempt=1,
        context=context,
        due_at=due_at,
    )


def _new_run(
    t: Transition,
    wf: Workflow,
    definition: WorkflowDefinition,
    step: str,
    payload: Any,
    now: float,
    *,
    visit: int,
    attempt: int,
    context: dict[str, Any] | None = None,
    due_at: float | None = None,
) -> None:
    wf.seq += 1
    wf.visits = {**wf.visits, step: visit}
    run = StepRun(
        workflow_id=wf.id,
        seq=wf.seq,
        step=step,
        visit=visit,
        attempt=attempt,
        status=StepStatus.PENDING,
        input=payload,
        created_at=now,
        context=context,
    )
    t.runs.append(run)
    if due_at is not None and due_at > now:
        run.status = StepStatus.SCHEDULED
        run.due_at = due_at
        wf.timer_at, wf.timer_kind = due_at, TIMER_RUN
        if wf.status == WorkflowStatus.PENDING and wf.seq == 1:
            wf.status = WorkflowStatus.SCHEDULED
        t.note("step_scheduled", seq=run.seq, step=step, attempt=attempt, due_at=due_at)
        return
    _publish(t, wf, run, definition, now)


def step_message(wf: Workflow, run: StepRun, definition: WorkflowDefinition) -> StepMessage:
    """The message that asks a step service to run ``run`` (also the copy for its ``.dlq``)."""
    return StepMessage(
        workflow_id=wf.id,
        workflow=wf.name,
        step=run.step,
        seq=run.seq,
        visit=run.visit,
        attempt=run.attempt,
        payload=run.input,
        timeout=definition.timeout_for(run.step),
        context=run.context,
        traceparent=wf.traceparent,
        schedule_to_start=definition.schedule_to_start_for(run.step),
    )


def _publish(
    t: Transition, wf: Workflow, run: StepRun, definition: WorkflowDefinition, now: float
) -> None:
    step = step_message(wf, run, definition)
    if step.schedule_to_start is not None:
        wf.timer_at, wf.timer_kind = now + step.schedule_to_start, TIMER_START
    t.steps.append(step)
    t.note("step_published", seq=run.seq, step=run.step, attempt=run.attempt)


def _set_deadline(
    wf: Workflow, run: StepRun, definition: WorkflowDefinition, *, from_time: float
) -> None:
    timeout = definition.timeout_for(run.step)
    if timeout is not None:
        run.deadline_at = from_time + timeout
        wf.timer_at, wf.timer_kind = run.deadline_at, TIMER_DEADLINE


def _clear_timer(wf: Workflow) -> None:
    wf.timer_at = wf.timer_kind = None


def _finish(
    t: Transition,
    wf: Workflow,
    status: WorkflowStatus,
    *,
    output: Any = None,
    error: dict[str, Any] | None = None,
) -> None:
    wf.status = status
    wf.output = output
    wf.error = error
    wf.wait = None
    _clear_timer(wf)
    t.note(
        f"workflow_{status}",
        output=output is not None,
        error=None if error is None else error.get("type"),
    )


def _due(result: dict[str, Any], now: float) -> float | None:
    if result.get("run_at") is not None:
        return float(result["run_at"])
    if result.get("delay"):
        return now + float(result["delay"])
    return None


def _draw(workflow_id: str, seq: int) -> float:
    """A number in [0, 1) fixed by the run, so jitter is reproducible."""
    digest = hashlib.blake2b(f"{workflow_id}:{seq}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
