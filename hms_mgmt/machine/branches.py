"""Fan-out and join: a step runs several branches at once, then one join step after them.

A handler returns ``{"fan_out": [{"step": S, "data": D}, ...], "join": J}`` or
``{"map": {"step": S, "items": [...]}, "join": J}``, with ``tolerate`` (how many branches
may give up, 0 by default) and ``max_concurrency`` (how many are out at once, all by
default). The group lives in the workflow's row (``Workflow.branches``): each branch's
latest run as JSON (a branch not yet published is ``waiting``, with no run row yet),
beside the step runs written as rows like any other. The workflow row is what the engine
loads, caches and writes with every event, so every branch's state comes with it: no
extra read, and a crash between any two transitions reloads the same group.

The rules, one per event:

- the fan-out's outcome records the group and publishes up to ``max_concurrency``
  branches, all in its transaction; each branch is its own run (a new ``seq``), with its
  own attempts and its step's retry policy, and an idempotency key ending in its index;
- a branch's outcome is accepted while its run is out (published or started), whatever
  the workflow's latest run; a duplicated or stale one is ignored, as for any run. As one
  finishes, the next waiting branch is published. Retries' backoffs and runs' deadlines
  are one workflow timer (``branch``), due at the earliest of them;
- the join runs in the transaction that records the last branch's outcome, once:
  ``{"results": [output or None, in item order], "errors": [{"index", "step", "error"}]}``.
  Empty items go straight to the join;
- when more than ``tolerate`` branches have given up, the branches not yet started are
  cancelled, the workflow takes ``on_error`` or fails (or compensates) with
  ``BranchesFailed``; a running branch's late outcome is recorded in its run but changes
  nothing else;
- ``retry(id)`` then re-runs the branches that failed or were cancelled (same index, same
  idempotency key, a fresh series of attempts) and keeps the outputs that succeeded;
- ``cancel`` (and ``reset``) cancel every branch that is out or waiting.
"""

from __future__ import annotations

from typing import Any

from hms_mgmt.definitions import Step, WorkflowDefinition
from hms_mgmt.errors import InvalidStateError
from hms_mgmt.machine.moves import (
    enter,
    give_up,
    give_up_workflow,
    retry_delay,
    step_message,
)
from hms_mgmt.machine.transition import TIMER_BRANCH, DeadLetter, Transition
from hms_mgmt.records import StepRun, StepStatus, Workflow, WorkflowStatus, evolve
from hms_mgmt.wire.codec import MAX_PAYLOAD_BYTES, dumps
from hms_mgmt.wire.outcomes import Outcome

MAX_BRANCHES = 1000
"""The most branches one fan-out or map may have."""
BRANCHES_FAILED = "BranchesFailed"
"""The error of a fan-out more of whose branches gave up than it tolerates."""
INVALID_FAN_OUT = "InvalidFanOut"
"""The error of a step whose handler returned a fan-out that cannot run."""
WAITING = "waiting"  # a branch not yet published (over max_concurrency): no run yet
OPEN, JOINED, FAILED, CANCELLED = "open", "joined", "failed", "cancelled"
OUT = frozenset({StepStatus.PENDING, StepStatus.SCHEDULED, StepStatus.RUNNING})
GAVE_UP = frozenset({StepStatus.FAILED, StepStatus.TIMED_OUT})
KEYS = ("fan_out", "map")
BRANCH_KEYS = frozenset({"step", "data"})
"""The keys of one branch of a ``fan_out``; any other is refused (InvalidFanOut)."""
MAP_KEYS = frozenset({"step", "items"})
"""The keys of a ``map``; any other is refused (InvalidFanOut)."""


def requested(result: dict[str, Any]) -> bool:
    return any(result.get(key) is not None for key in KEYS)


def problem(
    result: dict[str, Any], definition: WorkflowDefinition, handler: str, *, error_step: bool
) -> str | None:
    """Why a result's fan-out cannot run, naming the handler and what is wrong; None if it
    can. Checked when the outcome is applied, like a bad ``next_step``."""
    if not requested(result):
        return None
    if all(result.get(key) is not None for key in KEYS):
        return f"{handler} returned both 'fan_out' and 'map'; a step does one or the other"
    if error_step:
        return f"{handler} returned a fan-out, but an error step cannot fan out"
    for key in ("next_step", "wait_for", "complete", "delay", "run_at", "child"):
        if result.get(key):
            return f"{handler} returned both a fan-out and {key!r}; a fan-out goes on to its join"
    ordinary = [s.name for s in definition.steps]
    steps = ", ".join(ordinary)
    join = result.get("join")
    if not isinstance(join, str) or join not in ordinary:
        return (
            f"{handler} returned join {join!r}, which is not a step of workflow "
            f"{definition.name!r} (steps: {steps})"
        )
    for key, least in (("tolerate", 0), ("max_concurrency", 1)):
        value = result.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < least
        ):
            return f"{handler} returned {key} {value!r}; it must be a whole number >= {least}"
    specs = _specs(result)
    if isinstance(specs, str):
        return f"{handler} returned a bad {specs}"
    if len(specs) > MAX_BRANCHES:
        return (
            f"{handler} returned {len(specs)} branches; a fan-out or map has at most "
            f"{MAX_BRANCHES} (the cap on branches)"
        )
    for index, (step, _) in enumerate(specs):
        if step not in ordinary:
            return (
                f"{handler} returned branch {index} of step {step!r}, which is not a step of "
                f"workflow {definition.name!r} (steps: {steps})"
            )
    return None


def _specs(result: dict[str, Any]) -> list[tuple[str, Any]] | str:
    """Each branch's step and payload, in order; or what is wrong with their shape."""
    fan_out = result.get("fan_out")
    if fan_out is not None:
        if not isinstance(fan_out, list):
            return "fan_out: it must be a list of {'step': ..., 'data': ...}"
        specs = []
        for index, spec in enumerate(fan_out):
            if not isinstance(spec, dict) or not isinstance(spec.get("step"), str):
                return f"fan_out: branch {index} must be a dict with a 'step' name"
            unknown = set(spec) - BRANCH_KEYS
            if unknown:
                return (
                    f"fan_out: branch {index} has unknown keys {sorted(unknown)}; "
                    f"expected {sorted(BRANCH_KEYS)}"
                )
            specs.append((spec["step"], spec.get("data")))
        return specs
    mapping = result["map"]
    if (
        not isinstance(mapping, dict)
        or not isinstance(mapping.get("step"), str)
        or not isinstance(mapping.get("items"), list)
    ):
        return "map: it must be {'step': name, 'items': [...]}"
    unknown = set(mapping) - MAP_KEYS
    if unknown:
        return f"map: it has unknown keys {sorted(unknown)}; expected {sorted(MAP_KEYS)}"
    return [(mapping["step"], item) for item in mapping["items"]]


def fan_out_static(
    t: Transition,
    wf: Workflow,
    definition: WorkflowDefinition,
    group: list[Step],
    payload: Any,
    now: float,
) -> None:
    """The workflow enters a Parallel group of its definition: its steps are the branches,
    each with ``payload``, joined by the step after the group."""
    assert group[0].parallel is not None
    name, tolerate, limit = group[0].parallel
    join = definition.next_after(group[-1].name)
    assert join is not None  # checked when the definition was built
    result = {
        "fan_out": [{"step": step.name, "data": payload} for step in group],
        "join": join,
        "tolerate": tolerate,
        "max_concurrency": limit,
    }
    fan_out(t, wf, definition, result, now, origin=name, seq=wf.seq)


def fan_out(
    t: Transition,
    wf: Workflow,
    definition: WorkflowDefinition,
    result: dict[str, Any],
    now: float,
    *,
    origin: str,
    seq: int,
) -> None:
    """Step ``origin`` (run ``seq``, succeeded) fans out, or the workflow enters a Parallel
    group (``origin`` its first step): record the group, publish what may be out."""
    specs = _specs(result)
    assert not isinstance(specs, str)  # checked by problem() first
    visits: dict[str, int] = {}
    for step, _ in specs:  # one visit per step per fan-out: the index tells branches apart
        visits.setdefault(step, wf.visits.get(step, 0) + 1)
    wf.visits = {**wf.visits, **visits}
    wf.branches = {
        "step": origin,
        "seq": seq,
        "join": result["join"],
        "tolerate": int(result.get("tolerate") or 0),
        "max_concurrency": int(result.get("max_concurrency") or MAX_BRANCHES),
        "state": OPEN,
        "branches": [
            {"step": step, "input": data, "visit": visits[step], "status": WAITING, "seq": None}
            for step, data in specs
        ],
    }
    t.note("fanned_out", step=origin, seq=seq, branches=len(specs), join=result["join"])
    _advance(t, wf, definition, now)


def is_open(workflow: Workflow) -> bool:
    return workflow.branches is not None and workflow.branches["state"] == OPEN


def owns(workflow: Workflow, seq: int) -> int | None:
    """The index of the branch whose latest run is ``seq``, if any."""
    group = workflow.branches
    if group is None:
        return None
    for index, entry in enumerate(group["branches"]):
        if entry.get("seq") == seq:
            return index
    return None


def stale_reason(workflow: Workflow, seq: int) -> str | None:
    """None if ``seq`` is a branch's run that is out (an outcome for it is accepted)."""
    index = owns(workflow, seq)
    assert index is not None and workflow.branches is not None
    status = workflow.branches["branches"][index]["status"]
    if status in (StepStatus.PENDING, StepStatus.RUNNING):
        return None
    return f"branch {index} run is {status}"


def outcome(
    workflow: Workflow, definition: WorkflowDefinition, report: Outcome, now: float
) -> Transition | None:
    """A worker's report on a branch's run; None when ``report.seq`` is no branch's run."""
    index = owns(workflow, report.seq)
    if index is None:
        return None
    t = Transition()
    group = workflow.branches
    assert group is not None
    run = _run(workflow, index)
    stale = stale_reason(workflow, report.seq)
    if stale is None and report.kind == "started" and run.status != StepStatus.PENDING:
        stale = "run has already started"
    if stale is None and (
        workflow.terminal
        or group["state"] != OPEN
        or workflow.status == WorkflowStatus.COMPENSATING
    ):
        if report.kind in ("started", "heartbeat"):
            stale = f"the fan-out is {group['state']}"
        else:
            _late(t, workflow, index, report, now)
            return t
    if stale is not None:
        t.note("outcome_ignored", seq=report.seq, kind=report.kind, reason=stale)
        return t
    wf = evolve(workflow, updated_at=now)
    t.workflow = wf
    wf.branches = _copy(group)
    if wf.status == WorkflowStatus.PENDING:  # a Parallel group first in its workflow
        wf.status = WorkflowStatus.RUNNING
    if report.kind == "started":
        run.status = StepStatus.RUNNING
        run.started_at = report.started_at or now
        _deadline(run, definition, run.started_at)
        t.note("step_started", seq=run.seq, step=run.step, attempt=run.attempt, branch=index)
        _save(t, wf, index, run)
        _arm(wf)
        return t
    if report.kind == "heartbeat":
        _deadline(run, definition, now)
        _save(t, wf, index, run)
        _arm(wf)
        return t
    run.started_at = report.started_at or run.started_at or now
    run.finished_at = report.finished_at or now
    if report.kind == "succeeded":
        result = report.result or {}
        run.status = StepStatus.SUCCEEDED
        run.output = result.get("data")
        t.note("step_succeeded", seq=run.seq, step=run.step, attempt=run.attempt, branch=index)
        ignored = sorted(k for k in result if k not in ("data", "attributes") and result[k])
        if ignored:
            t.note("branch_result_ignored", seq=run.seq, fields=ignored)
        if result.get("attributes"):
            t.attributes.update(result["attributes"])
        _save(t, wf, index, run)
    else:
        _failed(t, wf, definition, index, run, dict(report.error or {}), now)
    _advance(t, wf, definition, now)
    return t


def dead_lettered(
    workflow: Workflow, definition: WorkflowDefinition, seq: int, error: dict[str, Any], now: float
) -> Transition | None:
    """The broker (or the poison guard) gave a branch's message up: a failed attempt."""
    if owns(workflow, seq) is None:
        return None
    report = Outcome(workflow_id=workflow.id, seq=seq, kind="failed", error=error)
    return outcome(workflow, definition, report, now)


def fire(workflow: Workflow, definition: WorkflowDefinition, now: float) -> Transition:
    """The ``branch`` timer: publish each branch whose backoff is over, time out each one
    past its deadline."""
    t = Transition()
    group = workflow.branches
    if (
        group is None
        or group["state"] != OPEN
        or workflow.terminal
        or workflow.timer_kind != TIMER_BRANCH
        or workflow.timer_at is None
        or workflow.timer_at > now
    ):
        return t
    wf = evolve(workflow, updated_at=now)
    t.workflow = wf
    wf.branches = _copy(group)
    for index, entry in enumerate(group["branches"]):
        status = entry["status"]
        if status == StepStatus.SCHEDULED and (entry.get("due_at") or 0) <= now:
            run = _run(wf, index)
            run.status = StepStatus.PENDING
            _publish(t, wf, definition, index, run)
        elif status in (StepStatus.PENDING, StepStatus.RUNNING) and (
            entry.get("deadline_at") is not None and entry["deadline_at"] <= now
        ):
            run = _run(wf, index)
            run.finished_at = now
            timeout = definition.timeout_for(run.step) or 0.0
            error = {
                "type": "StepTimeout",
                "message": f"step {run.step!r} (branch {index}) attempt {run.attempt} did not "
                f"finish within {timeout:g}s",
                "retryable": True,
            }
            _failed(t, wf, definition, index, run, error, now, status=StepStatus.TIMED_OUT)
            if wf.branches["state"] != OPEN:
                break
    _advance(t, wf, definition, now)
    return t


def close(t: Transition, wf: Workflow, now: float, *, why: str, state: str = CANCELLED) -> None:
    """Cancel every branch out or waiting (a cancel, a reset): their outcomes are ignored."""
    group = wf.branches
    if group is None or group["state"] != OPEN:
        return
    wf.branches = _copy(group)
    wf.branches["state"] = state
    cancelled = _cancel(t, wf, now, {StepStatus.RUNNING, *OUT}, why)
    if wf.timer_kind == TIMER_BRANCH:
        wf.timer_at = wf.timer_kind = None
    if cancelled:
        t.note("branches_cancelled", branches=cancelled)


def failed_by_branches(workflow: Workflow) -> bool:
    group = workflow.branches
    error = workflow.error or {}
    return (
        group is not None
        and group["state"] == FAILED
        and error.get("type") == BRANCHES_FAILED
        and error.get("fan_seq") == group["seq"]
    )


def join_too_large(workflow: Workflow) -> bool:
    """Whether the workflow failed because its join's input was over the message limit."""
    group = workflow.branches
    error = workflow.error or {}
    return (
        group is not None
        and error.get("type") == "PayloadError"
        and error.get("fan_seq") == group["seq"]
    )


def retry_group(workflow: Workflow, definition: WorkflowDefinition, now: float) -> Transition:
    """Retry a workflow whose fan-out failed: the branches that gave up or were cancelled
    run again (attempt 1), the outputs that succeeded are kept, and a branch still out
    from before is awaited again."""
    if workflow.status != WorkflowStatus.FAILED or not failed_by_branches(workflow):
        raise InvalidStateError(f"workflow {workflow.id}'s fan-out did not fail")
    group = workflow.branches
    assert group is not None
    t = Transition()
    wf = evolve(
        workflow,
        updated_at=now,
        status=WorkflowStatus.RUNNING,
        error=None,
        output=None,
        retries=workflow.retries + 1,
    )
    t.workflow = wf
    wf.branches = _copy(group)
    wf.branches["state"] = OPEN
    again = []
    for index, entry in enumerate(wf.branches["branches"]):
        if entry["status"] in (*GAVE_UP, StepStatus.CANCELLED, WAITING):
            again.append(index)
            wf.branches["branches"][index] = {k: entry[k] for k in ("step", "input", "visit")} | {
                "status": WAITING,
                "seq": None,
            }
    t.note("workflow_retried", step=group["step"], from_seq=group["seq"], branches=again)
    _advance(t, wf, definition, now)
    return t


def release_held(
    t: Transition, wf: Workflow, definition: WorkflowDefinition, seqs: list[int]
) -> None:
    """A resume publishes the branch runs its pause held (those still pending)."""
    group = wf.branches
    if group is None or group["state"] != OPEN:
        return
    wf.branches = _copy(group)
    for seq in seqs:
        index = owns(wf, seq)
        if index is not None and wf.branches["branches"][index]["status"] == StepStatus.PENDING:
            _publish(t, wf, definition, index, _run(wf, index))


# -- moves --------------------------------------------------------------------------------


def _copy(group: dict[str, Any]) -> dict[str, Any]:
    return {**group, "branches": list(group["branches"])}


def _run(wf: Workflow, index: int) -> StepRun:
    """Branch ``index``'s latest run, from the group (a copy to change)."""
    assert wf.branches is not None
    entry = wf.branches["branches"][index]
    values = {k: v for k, v in entry.items() if k not in ("index",)}
    return StepRun.from_json({**values, "workflow_id": wf.id})


def _save(t: Transition, wf: Workflow, index: int, run: StepRun) -> None:
    """Keep the run in the group and write its row."""
    assert wf.branches is not None
    entry = run.to_json()
    del entry["workflow_id"]
    entry["status"] = str(run.status)
    wf.branches["branches"][index] = entry
    t.runs.append(run)


def _deadline(run: StepRun, definition: WorkflowDefinition, from_time: float) -> None:
    timeout = definition.timeout_for(run.step)
    if timeout is not None:
        run.deadline_at = from_time + timeout


def _publish(
    t: Transition, wf: Workflow, definition: WorkflowDefinition, index: int, run: StepRun
) -> None:
    _save(t, wf, index, run)
    t.steps.append(step_message(wf, run, definition))
    t.note("step_published", seq=run.seq, step=run.step, attempt=run.attempt, branch=index)


def _new_run(
    t: Transition,
    wf: Workflow,
    definition: WorkflowDefinition,
    index: int,
    now: float,
    *,
    attempt: int,
    due_at: float | None = None,
) -> None:
    assert wf.branches is not None
    entry = wf.branches["branches"][index]
    wf.seq += 1
    context = {"branch": {"index": index, "of": wf.branches["step"], "seq": wf.branches["seq"]}}
    run = StepRun(
        workflow_id=wf.id,
        seq=wf.seq,
        step=entry["step"],
        visit=entry["visit"],
        attempt=attempt,
        status=StepStatus.PENDING,
        input=entry["input"],
        created_at=now,
        context=context,
    )
    if due_at is not None and due_at > now:
        run.status, run.due_at = StepStatus.SCHEDULED, due_at
        _save(t, wf, index, run)
        t.note("step_scheduled", seq=run.seq, step=run.step, attempt=attempt, due_at=due_at)
        return
    _publish(t, wf, definition, index, run)


def _failed(
    t: Transition,
    wf: Workflow,
    definition: WorkflowDefinition,
    index: int,
    run: StepRun,
    error: dict[str, Any],
    now: float,
    *,
    status: StepStatus = StepStatus.FAILED,
) -> None:
    """A branch's attempt failed: retried by its step's policy, or it gives up."""
    run.status, run.error = status, error
    _save(t, wf, index, run)
    policy = definition.policy_for(run.step)
    t.note(
        "step_timed_out" if status == StepStatus.TIMED_OUT else "step_failed",
        seq=run.seq,
        step=run.step,
        attempt=run.attempt,
        branch=index,
        error_type=error.get("type"),
        message=error.get("message"),
    )
    delay = retry_delay(policy, error, wf, run)
    if delay is not None:
        _new_run(t, wf, definition, index, now, attempt=run.attempt + 1, due_at=now + delay)
        t.note("retry_scheduled", step=run.step, attempt=run.attempt + 1, delay=round(delay, 3))
        return
    reason = "attempts exhausted" if policy.retries(error) else "not retryable"
    t.dead_letters.append(DeadLetter(run, wf.name, reason, run.attempt, run.error))
    t.note("branch_gave_up", seq=run.seq, step=run.step, branch=index, reason=reason)
    assert wf.branches is not None
    group = wf.branches
    gave_up = [i for i, e in enumerate(group["branches"]) if e["status"] in GAVE_UP]
    if len(gave_up) <= group["tolerate"]:
        return
    group["state"] = FAILED
    cancelled = _cancel(t, wf, now, {StepStatus.PENDING, StepStatus.SCHEDULED}, "a sibling gave up")
    if cancelled:
        t.note("branches_cancelled", branches=cancelled)
    if wf.timer_kind == TIMER_BRANCH:
        wf.timer_at = wf.timer_kind = None
    failure = {
        "type": BRANCHES_FAILED,
        "message": f"{len(gave_up)} of {len(group['branches'])} branches of step "
        f"{group['step']!r} gave up (it tolerates {group['tolerate']}); branch {index} "
        f"({run.step}): {error.get('type')}: {error.get('message')}",
        "step": run.step,
        "seq": run.seq,
        "branch": index,
        "fan_seq": group["seq"],
        "attempts": run.attempt,
        "traceback": error.get("traceback"),
        "reason": f"{len(gave_up)} {'branch' if len(gave_up) == 1 else 'branches'} gave up",
    }
    give_up(t, wf, run, definition, failure, now, dead_letter=False)  # dead-lettered above


def _cancel(
    t: Transition, wf: Workflow, now: float, statuses: set[StepStatus], why: str
) -> list[int]:
    """Cancel the waiting branches and those whose run is in ``statuses``."""
    assert wf.branches is not None
    cancelled = []
    for index, entry in enumerate(wf.branches["branches"]):
        if entry["status"] == WAITING:
            wf.branches["branches"][index] = {**entry, "status": str(StepStatus.CANCELLED)}
        elif entry["status"] in statuses:
            run = _run(wf, index)
            run.status, run.finished_at = StepStatus.CANCELLED, now
            run.error = {"type": "Cancelled", "message": why}
            _save(t, wf, index, run)
        else:
            continue
        cancelled.append(index)
    return cancelled


def _advance(t: Transition, wf: Workflow, definition: WorkflowDefinition, now: float) -> None:
    """Publish the waiting branches there is room for, join when all are done, and arm the
    timer for the earliest backoff or deadline."""
    group = wf.branches
    assert group is not None
    if group["state"] != OPEN:
        return
    entries = group["branches"]
    out = sum(1 for e in entries if e["status"] in OUT)
    for index, entry in enumerate(entries):
        if out >= group["max_concurrency"]:
            break
        if entry["status"] == WAITING:
            _new_run(t, wf, definition, index, now, attempt=1)
            out += 1
    if all(e["status"] not in (*OUT, WAITING) for e in group["branches"]):
        _join(t, wf, definition, now)
        return
    _arm(wf)


def _arm(wf: Workflow) -> None:
    group = wf.branches
    assert group is not None
    times = [
        e.get("due_at") if e["status"] == StepStatus.SCHEDULED else e.get("deadline_at")
        for e in group["branches"]
        if e["status"] in OUT
    ]
    due = min((at for at in times if at is not None), default=None)
    if due is not None:
        wf.timer_at, wf.timer_kind = due, TIMER_BRANCH
    elif wf.timer_kind == TIMER_BRANCH:
        wf.timer_at = wf.timer_kind = None


def _join(t: Transition, wf: Workflow, definition: WorkflowDefinition, now: float) -> None:
    group = wf.branches
    assert group is not None
    group["state"] = JOINED
    if wf.timer_kind == TIMER_BRANCH:
        wf.timer_at = wf.timer_kind = None
    entries = group["branches"]
    payload: dict[str, list[Any]] = {
        "results": [
            e.get("output") if e["status"] == StepStatus.SUCCEEDED else None for e in entries
        ],
        "errors": [
            {"index": i, "step": e["step"], "error": e.get("error")}
            for i, e in enumerate(entries)
            if e["status"] != StepStatus.SUCCEEDED
        ],
    }
    t.note("joined", step=group["step"], join=group["join"], errors=len(payload["errors"]))
    size = len(dumps(payload))
    if size > MAX_PAYLOAD_BYTES:  # the join's message could not carry them
        failure = {
            "type": "PayloadError",
            "message": f"the results of the {len(entries)} branches of {group['step']!r} come "
            f"to {size} bytes of JSON; the join's message carries at most {MAX_PAYLOAD_BYTES}",
            "step": group["join"],
            "fan_seq": group["seq"],
            "reason": "payload too large",
        }
        give_up_workflow(t, wf, definition, failure, now)
        return
    enter(t, definition, group["join"], payload, now, workflow=wf)


def _late(t: Transition, workflow: Workflow, index: int, report: Outcome, now: float) -> None:
    """A branch's outcome after its fan-out failed or was cancelled: recorded in its run,
    and nothing else changes."""
    group = workflow.branches
    assert group is not None
    wf = evolve(workflow)
    wf.branches = _copy(group)
    t.workflow = wf
    t.quiet = workflow.terminal
    run = _run(wf, index)
    run.started_at = report.started_at or run.started_at or now
    run.finished_at = report.finished_at or now
    if report.kind == "succeeded":
        run.status, run.output = StepStatus.SUCCEEDED, (report.result or {}).get("data")
    else:
        run.status, run.error = StepStatus.FAILED, dict(report.error or {})
    _save(t, wf, index, run)
    t.note("branch_outcome_late", seq=run.seq, branch=index, kind=report.kind, state=group["state"])
