"""The moves transitions are made of: a step succeeds, fails, retries or gives up; a workflow
enters a step, waits, resumes or finishes. Each changes the copies a transition carries."""

from __future__ import annotations

import hashlib
from typing import Any

from hms_mgmt.definitions import RetryPolicy, WorkflowDefinition
from hms_mgmt.machine import compensation
from hms_mgmt.machine.transition import (
    TIMER_COMPENSATE,
    TIMER_DEADLINE,
    TIMER_RUN,
    TIMER_START,
    TIMER_WAIT,
    DeadLetter,
    Transition,
)
from hms_mgmt.records import StepRun, StepStatus, Workflow, WorkflowStatus, evolve
from hms_mgmt.wire.codec import MAX_PAYLOAD_BYTES, dumps
from hms_mgmt.wire.steps import StepMessage


def stale_reason(workflow: Workflow, run: StepRun, seq: int) -> str | None:
    if workflow.terminal:
        return f"workflow is {workflow.status}"
    if seq != run.seq and workflow.branches is not None:  # a fan-out's branch: any may be out
        from hms_mgmt.machine import branches

        if branches.owns(workflow, seq) is not None:
            return branches.stale_reason(workflow, seq)
    if seq != run.seq:
        return f"run {seq} is not the current run ({run.seq})"
    if run.status not in (StepStatus.PENDING, StepStatus.RUNNING):
        return f"run is {run.status}"
    return None


def copy(workflow: Workflow, run: StepRun, t: Transition, now: float) -> tuple[Workflow, StepRun]:
    wf = evolve(workflow, updated_at=now)
    current = evolve(run)
    t.workflow = wf
    t.runs.append(current)
    return wf, current


def succeed(
    t: Transition,
    wf: Workflow,
    run: StepRun,
    definition: WorkflowDefinition,
    result: dict[str, Any],
    handler: str | None,
    now: float,
) -> None:
    data = result.get("data")
    if compensation.compensated_seq(run) is not None:
        compensated(t, wf, run, result, now)
        return
    if wf.status == WorkflowStatus.COMPENSATING:  # a step out at a cancel with compensate
        drained(t, wf, run, now, output=data)
        return
    next_step = result.get("next_step")
    message = definition.bad_next_step(next_step, handler or f"the handler of {wf.name}.{run.step}")
    if message is not None:
        fail(
            t,
            wf,
            run,
            definition,
            {"type": "InvalidNextStep", "message": message, "retryable": False},
            now,
        )
        return
    from hms_mgmt.machine import branches  # branches builds on these moves

    error_step = definition.on_error is not None and run.step == definition.on_error.name
    fans_out = branches.requested(result)
    if fans_out:
        name = handler or f"the handler of {wf.name}.{run.step}"
        problem = branches.problem(result, definition, name, error_step=error_step)
        if problem is not None:
            error = {"type": branches.INVALID_FAN_OUT, "message": problem, "retryable": False}
            fail(t, wf, run, definition, error, now)
            return
    run.status = StepStatus.SUCCEEDED
    run.output = data
    clear_timer(wf)
    t.note("step_succeeded", seq=run.seq, step=run.step, attempt=run.attempt)
    if result.get("attributes"):  # business keys the handler adds, written with this transition
        t.attributes.update(result["attributes"])
    if fans_out:
        branches.fan_out(t, wf, definition, result, now, origin=run.step, seq=run.seq)
        return
    if result.get("complete"):
        finish(t, wf, WorkflowStatus.SUCCEEDED, output=data)
        return
    if result.get("wait_for"):
        wait(t, wf, run, definition, result, now)
        return
    if result.get("child") is not None:
        from hms_mgmt.machine.children import spawn  # children builds on these moves

        spawn(t, wf, run, definition, result, now)
        return
    if next_step is None:
        if error_step:
            t.note("error_path_finished", step=run.step)
            give_up_workflow(t, wf, definition, wf.error or {}, now)
            return
        next_step = definition.next_after(run.step)
        if next_step is None:
            finish(t, wf, WorkflowStatus.SUCCEEDED, output=data)
            return
    if error_step:
        wf.error = None  # the error step chose to carry on
    enter(t, definition, next_step, data, now, due_at=due(result, now), workflow=wf)


def fail(
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
    clear_timer(wf)
    if wf.status == WorkflowStatus.COMPENSATING and compensation.compensated_seq(run) is None:
        drained(t, wf, run, now, error=error)  # nothing to undo for it, and not retried
        return
    policy = definition.policy_for(run.step)
    t.note(
        "step_timed_out" if status == StepStatus.TIMED_OUT else "step_failed",
        seq=run.seq,
        step=run.step,
        attempt=run.attempt,
        error_type=error.get("type"),
        message=error.get("message"),
    )
    delay = retry_delay(policy, error, wf, run)
    if delay is not None:
        new_run(
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
        "reason": "attempts exhausted" if policy.retries(error) else "not retryable",
    }
    give_up(t, wf, run, definition, failure, now, dead_letter=True)


def give_up(
    t: Transition,
    wf: Workflow,
    run: StepRun,
    definition: WorkflowDefinition,
    failure: dict[str, Any],
    now: float,
    *,
    dead_letter: bool,
) -> None:
    if compensation.compensated_seq(run) is not None:  # a compensation gave up
        finish(t, wf, WorkflowStatus.FAILED, error=compensation.failure(wf, run, failure))
        if dead_letter:
            why = f"{compensation.COMPENSATION_FAILED}: {failure.get('reason')}"
            t.dead_letters.append(DeadLetter(run, wf.name, why, run.attempt, run.error))
        return
    error_step = definition.on_error
    if error_step is not None and run.step != error_step.name:
        wf.error = failure
        t.note("error_path", step=error_step.name, failed_step=failure["step"])
        new_run(
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
    if dead_letter:  # the engine gave up on this run, whether the workflow compensates or not
        t.dead_letters.append(
            DeadLetter(run, wf.name, str(failure.get("reason")), run.attempt, run.error)
        )
    give_up_workflow(t, wf, definition, failure, now)


def give_up_workflow(
    t: Transition,
    wf: Workflow,
    definition: WorkflowDefinition,
    error: dict[str, Any],
    now: float,
    *,
    status: WorkflowStatus = WorkflowStatus.FAILED,
) -> None:
    """The workflow gives up (``failed``, or ``cancelled`` with compensation asked for): it
    goes ``compensating`` if a step with a compensation was entered, the first
    compensation due when its ``compensate`` timer fires; else it ends with ``status``."""
    if not compensation.may_compensate(wf, definition):
        finish(t, wf, status, error=error)
        return
    wf.status = WorkflowStatus.COMPENSATING
    wf.error = error
    wf.output = None
    wf.wait = None
    compensate_next(wf, now)
    t.note("compensation_started", error=error.get("type"), reason=error.get("reason"))


def compensated(
    t: Transition, wf: Workflow, run: StepRun, result: dict[str, Any], now: float
) -> None:
    """A compensation succeeded: the next one is due (when the ``compensate`` timer fires).
    Its handler's ``data`` is its output; what else it returned (``next_step``,
    ``complete``, ``wait_for``, a delay) is ignored, and said so in the history."""
    run.status = StepStatus.SUCCEEDED
    run.output = result.get("data")
    t.note("step_succeeded", seq=run.seq, step=run.step, attempt=run.attempt)
    ignored = sorted(
        key for key in ("next_step", "complete", "wait_for", "delay", "run_at") if result.get(key)
    )
    if ignored:
        t.note("compensation_result_ignored", seq=run.seq, fields=ignored)
    compensate_next(wf, now)


def drained(
    t: Transition,
    wf: Workflow,
    run: StepRun,
    now: float,
    *,
    output: Any = None,
    error: dict[str, Any] | None = None,
) -> None:
    """The outcome of a step that was out when its workflow was cancelled with compensate:
    if it succeeded it is compensated with the rest; a failure is not retried. Either way
    the chain starts now."""
    if error is None:
        run.status = StepStatus.SUCCEEDED
        run.output = output
        t.note("step_succeeded", seq=run.seq, step=run.step, attempt=run.attempt)
    else:
        t.note(
            "step_timed_out" if run.status == StepStatus.TIMED_OUT else "step_failed",
            seq=run.seq,
            step=run.step,
            attempt=run.attempt,
            error_type=error.get("type"),
            message=error.get("message"),
        )
    clear_timer(wf)
    compensate_next(wf, now)


def compensate_next(wf: Workflow, now: float) -> None:
    """Arm the ``compensate`` timer, due at once: the next compensation, or the chain's end."""
    wf.timer_at, wf.timer_kind = now, TIMER_COMPENSATE


def wait(
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
        resume(t, wf, definition, data, now)
        return
    wf.status = WorkflowStatus.WAITING
    if timeout is not None:
        wf.timer_at, wf.timer_kind = now + float(timeout), TIMER_WAIT


def resume(
    t: Transition, wf: Workflow, definition: WorkflowDefinition, signal_data: Any, now: float
) -> None:
    assert wf.wait is not None
    wait, wf.wait = wf.wait, None
    clear_timer(wf)
    wf.status = WorkflowStatus.RUNNING
    t.note("resumed", event=wait["event"])
    next_step = wait["next_step"]
    if next_step is None:
        finish(t, wf, WorkflowStatus.SUCCEEDED, output=wait["data"])
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
        give_up_workflow(t, wf, definition, failure, now)
        return
    enter(t, definition, next_step, wait["data"], now, workflow=wf, context={"signal": signal_data})


def enter(
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
    """Go into a step afresh (a new visit, attempt 1); into a Parallel group, its branches."""
    wf = workflow or t.workflow
    assert wf is not None
    group = definition.parallel_at(step)
    if group is not None:
        from hms_mgmt.machine import branches

        branches.fan_out_static(t, wf, definition, group, payload, now)
        return
    new_run(
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


def new_run(
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
    publish(t, wf, run, definition, now)


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


def publish(
    t: Transition, wf: Workflow, run: StepRun, definition: WorkflowDefinition, now: float
) -> None:
    step = step_message(wf, run, definition)
    if step.schedule_to_start is not None:
        wf.timer_at, wf.timer_kind = now + step.schedule_to_start, TIMER_START
    t.steps.append(step)
    t.note("step_published", seq=run.seq, step=run.step, attempt=run.attempt)


def set_deadline(
    wf: Workflow, run: StepRun, definition: WorkflowDefinition, *, from_time: float
) -> None:
    timeout = definition.timeout_for(run.step)
    if timeout is not None:
        run.deadline_at = from_time + timeout
        wf.timer_at, wf.timer_kind = run.deadline_at, TIMER_DEADLINE


def clear_timer(wf: Workflow) -> None:
    wf.timer_at = wf.timer_kind = None


def finish(
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
    wf.pause = None  # a paused workflow that finishes (cancelled, say) is no longer paused
    clear_timer(wf)
    t.note(
        f"workflow_{status}",
        output=output is not None,
        error=None if error is None else error.get("type"),
    )
    if wf.parent is not None:  # a child workflow: its parent learns of it in this batch
        from hms_mgmt.machine.children import finished

        told = finished(wf)
        if told is not None:
            t.follow.append(told)


def due(result: dict[str, Any], now: float) -> float | None:
    if result.get("run_at") is not None:
        return float(result["run_at"])
    if result.get("delay"):
        return now + float(result["delay"])
    return None


def retry_delay(
    policy: RetryPolicy, error: dict[str, Any], wf: Workflow, run: StepRun
) -> float | None:
    """Seconds before a failed attempt's next one, or None when it is not tried again (the
    error is not retryable, or the attempts are used up). A handler's ``retry_delay`` wins
    over the policy's backoff."""
    if not policy.retries(error) or run.attempt >= policy.max_attempts:
        return None
    asked = error.get("retry_delay")
    if isinstance(asked, int | float) and asked >= 0:
        return float(asked)
    return policy.delay_after(run.attempt, draw(wf.id, run.seq))


def draw(workflow_id: str, seq: int) -> float:
    """A number in [0, 1) fixed by the run, so jitter is reproducible."""
    digest = hashlib.blake2b(f"{workflow_id}:{seq}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
